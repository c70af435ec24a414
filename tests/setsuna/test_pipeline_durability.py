"""Nothing leaves the pipeline unrecorded: a really full disk, and a kill -9 mid-run.

Issue (hardening): the pipeline handed decisions to its sinks before their
audit commit, so a full disk let thousands of decisions through with no row.
Here a logistic model (built by ``tests.helpers``) is served over gRPC and
scores real bars (EURUSD hourly, S&P 500 and NASDAQ daily); sinks note what
they were handed, and the audit database is read back afterwards: every
decision a sink received must have its committed row (request id, event
time, symbol), and a decision without a row must never have reached a sink.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from setsuna.audit import AuditLog, AuditSettings
from setsuna.client import Client
from setsuna.errors import AuditError
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import BarRecords, ReplayFeed, datasets
from setsuna.pipeline import Decisions, Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

pytest.importorskip("pandas")
SPEC = default_spec()
MODEL = "durable"
#: Decisions the killed child must have passed on before the kill (a mid-run kill).
KILL_AFTER_REQUESTS = 300

Key = tuple[str, int, str]  # request id, event time, symbol


@dataclass
class Served:
    server: LocalTriton
    records: BarRecords
    symbols: tuple[str, ...]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    import pandas as pd

    root = tmp_path_factory.mktemp("durability")
    rng = np.random.default_rng(7)
    w = (rng.normal(size=len(SPEC)) * 0.01).astype(np.float32)
    x = rng.normal(size=(300, len(SPEC))).astype(np.float32)
    repo = build_logistic_models(root, {MODEL: w}, x)
    feed = ReplayFeed.from_frame(
        pd.concat([datasets.eurusd(), datasets.sp500(), datasets.nasdaq()], ignore_index=True)
    )
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log") as server:
        yield Served(server, np.array(feed.records), feed.symbols)


def _audited(db: Path) -> Counter[Key]:
    """The committed rows of an audit database, read as a crash-recovering reader would."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute("SELECT request_id, event_ns, symbol FROM decisions").fetchall()
    finally:
        con.close()
    return Counter((str(r), int(t), str(s)) for r, t, s in rows)


def _keys(d: Decisions, symbols: tuple[str, ...]) -> list[Key]:
    return [
        (d.request_id, int(t), symbols[i])
        for t, i in zip(d.event_ns.tolist(), d.symbol_ids.tolist(), strict=True)
    ]


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: the audit database really runs out of disk, mid-run."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root): {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("limit", ["tmpfs_1MiB", "max_db_bytes"])
def test_a_full_disk_passes_on_no_decision_without_its_row(
    served: Served, tmp_path: Path, request: pytest.FixtureRequest, limit: str
) -> None:
    if limit == "tmpfs_1MiB":
        db = request.getfixturevalue("full_disk") / "audit.db"
        settings = AuditSettings()
    else:
        db = tmp_path / "audit.db"
        settings = AuditSettings(max_db_bytes=128 * 1024)
    received: list[Key] = []
    engine = FeatureEngine(SPEC, served.symbols)
    with Client(served.server.grpc_url) as client:
        log = AuditLog(db, feature_names=SPEC.names, settings=settings)
        pipe = Pipeline(
            engine,
            client,
            ThresholdPolicy(len(served.symbols)),
            PipelineSettings(MODEL),
            audit=log,
            sinks=(lambda d: received.extend(_keys(d, served.symbols)),),
        )
        summary = pipe.run(served.records)
        with contextlib.suppress(AuditError):
            log.close()
    assert summary.stopped is not None and "AuditFullError" in summary.stopped, summary.stopped
    audited = _audited(db)
    assert audited, "the disk filled before the first commit: make it larger"
    # Every decision handed on has its row, and every decision without one stayed in.
    assert Counter(received) == audited
    assert summary.decisions == len(received) == log.recorded
    assert summary.skipped["audit_failed"] == log.lost > 0


CHILD = """
import os, sys
import numpy as np
from setsuna.audit import AuditLog
from setsuna.client import Client
from setsuna.features import FeatureEngine, default_spec
from setsuna.pipeline import Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy

url, model, db, sink_path, records_path, *symbols = sys.argv[1:]
spec = default_spec()
out = open(sink_path, "a")


def sink(d):
    names = [symbols[i] for i in d.symbol_ids.tolist()]
    out.write("".join(f"{d.request_id} {t} {s}\\n" for t, s in zip(d.event_ns.tolist(), names)))
    out.flush()
    os.fsync(out.fileno())
    sys.stdout.write("passed on\\n")
    sys.stdout.flush()


with Client(url) as client, AuditLog(db, feature_names=spec.names) as log:
    engine = FeatureEngine(spec, tuple(symbols))
    pipe = Pipeline(
        engine, client, ThresholdPolicy(len(symbols)), PipelineSettings(model),
        audit=log, sinks=(sink,),
    )
    pipe.run(np.load(records_path))
"""


def test_kill_9_mid_run_leaves_every_passed_on_decision_audited(
    served: Served, tmp_path: Path
) -> None:
    records = tmp_path / "records.npy"
    np.save(records, served.records)
    db, sink = tmp_path / "audit.db", tmp_path / "sink.txt"
    argv = [served.server.grpc_url, MODEL, str(db), str(sink), str(records), *served.symbols]
    errors = tmp_path / "child.err"
    with errors.open("w") as err:
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, *argv], stdout=subprocess.PIPE, stderr=err, text=True
        )
    assert child.stdout is not None
    try:
        for _ in range(KILL_AFTER_REQUESTS):
            ready, _, _ = select.select([child.stdout], [], [], 120.0)
            line = child.stdout.readline() if ready else ""
            assert line, f"the child stopped passing decisions on: {errors.read_text()[-2000:]}"
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
    assert child.returncode == -signal.SIGKILL  # killed mid-run, not finished
    passed_on = Counter(
        (r, int(t), s) for r, t, s in (line.split() for line in sink.read_text().splitlines())
    )
    audited = _audited(db)
    assert sum(passed_on.values()) >= KILL_AFTER_REQUESTS
    missing = passed_on - audited
    assert not missing, f"{sum(missing.values())} decisions passed on without a row"
