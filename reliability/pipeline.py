"""Probes of the tick-to-signal pipeline: a full audit disk, a model whose stub died.

One server (watchdog off, so a killed model stays dead and READY, as Triton
2.51 alone leaves it) serves two logistic models over the default feature
set: ``durable`` scores real bars (EURUSD hourly, S&P 500 and NASDAQ daily),
``doomed`` has its stubs killed.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import subprocess
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from reliability import models, procs
from reliability.harness import Lab, Outcome, probe, shared
from reliability.report import Probe
from setsuna.audit import AuditLog, AuditSettings
from setsuna.client import Client
from setsuna.errors import AuditError
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import BarRecords, ReplayFeed, datasets
from setsuna.pipeline import Decisions, Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.server import LocalTriton

SPEC: Final = default_spec()
#: A deadline longer than Triton's 1 s stub health check, so its error reaches the client.
PATIENT_MS: Final = 5_000.0
Key = tuple[str, int, str]  # request id, event time, symbol


@dataclass
class Served:
    server: LocalTriton
    records: BarRecords
    symbols: tuple[str, ...]


def run(lab: Lab) -> list[Probe]:
    with shared("the pipeline server", lambda: _start(lab), lambda s: s.server.stop()) as s:
        return [
            probe(
                "7",
                "audit DB on a full disk",
                "decisions passed to a sink without an audit row: 0; the run stops with "
                "AuditFullError as its reason",
                lambda: _full_disk(lab, s.get()),
            ),
            probe(
                "10a",
                "pipeline vs a dead model (watchdog off), default 50 ms deadline",
                "the run stops with a reason ('N requests in a row failed'), 0 decisions; "
                "not 'skipped everything, finished'",
                lambda: _dead_model(
                    s.get(), PipelineSettings("doomed"), "requests in a row failed"
                ),
            ),
            probe(
                "10b",
                "pipeline vs a dead model, 5 s deadline",
                "the run stops at the first answer with ModelNotReadyError (the stub died)",
                lambda: _dead_model(
                    s.get(),
                    PipelineSettings("doomed", deadline_ms=PATIENT_MS),
                    "ModelNotReadyError",
                ),
            ),
        ]


def _start(lab: Lab) -> Served:
    import pandas as pd

    rng = np.random.default_rng(7)
    weights = {
        m: (rng.normal(size=len(SPEC)) * 0.01).astype(np.float32) for m in ("durable", "doomed")
    }
    repo = models.logistic_models(lab.path("pipeline"), weights)
    frame = pd.concat([datasets.eurusd(), datasets.sp500(), datasets.nasdaq()], ignore_index=True)
    feed = ReplayFeed.from_frame(frame)
    server = procs.start(repo, lab.root / "pipeline" / "triton.log", watchdog=False)
    try:
        with Client(server.grpc_url) as client:  # alive before the kill
            client.infer("doomed", np.zeros((1, len(SPEC)), np.float32))
        assert server.pid is not None
        procs.kill_9(procs.stub_pids(server.pid, "doomed"))
    except BaseException:
        server.stop()
        raise
    return Served(server, np.array(feed.records), feed.symbols)


# -- 7: the audit on a full disk -----------------------------------------------------------


@contextlib.contextmanager
def _small_disk(lab: Lab) -> Iterator[tuple[Path, AuditSettings, str]]:
    """A 1 MiB tmpfs for the audit DB when root may mount one; else a capped DB."""
    folder = lab.path("audit")
    mnt = lab.path("audit", "small")
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)],
            capture_output=True,
            check=False,
        ).returncode
        == 0
    )
    try:
        if mounted:
            yield mnt / "audit.db", AuditSettings(), "1 MiB tmpfs"
        else:
            capped = AuditSettings(max_db_bytes=128 * 1024)
            yield folder / "audit.db", capped, "max_db_bytes=128 KiB (no tmpfs: not root)"
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=False, capture_output=True)


def _audited(db: Path) -> Counter[Key]:
    """The committed rows, read as a crash-recovering reader would."""
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


def _full_disk(lab: Lab, s: Served) -> Outcome:
    received: list[Key] = []
    with _small_disk(lab) as (db, settings, how):
        with Client(s.server.grpc_url) as client:
            log = AuditLog(db, feature_names=SPEC.names, settings=settings)
            pipe = Pipeline(
                FeatureEngine(SPEC, s.symbols),
                client,
                ThresholdPolicy(len(s.symbols)),
                PipelineSettings("durable"),
                audit=log,
                sinks=(lambda d: received.extend(_keys(d, s.symbols)),),
            )
            summary = pipe.run(s.records)
            with contextlib.suppress(AuditError):
                log.close()
        audited = _audited(db)
    lost = sum((Counter(received) - audited).values())
    held = summary.skipped.get("audit_failed", 0)
    stopped = summary.stopped or ""
    ok = (
        bool(audited)
        and lost == 0
        and summary.decisions == len(received)
        and "AuditFullError" in stopped
        and held > 0
    )
    return Outcome(
        f"{how}: {sum(audited.values())} rows committed, {len(received)} decisions passed on, "
        f"{lost} of them without a row; {held} held back (audit_failed); run stopped: "
        f"{stopped[:150]!r}",
        ok,
        {
            "decisions_lost": lost,
            "rows_committed": sum(audited.values()),
            "decisions_passed_on": len(received),
            "held_back": held,
        },
    )


# -- 10: a dead model ------------------------------------------------------------------------


def _dead_model(s: Served, settings: PipelineSettings, reason: str) -> Outcome:
    records = s.records[:400]
    with Client(s.server.grpc_url) as client:
        engine = FeatureEngine(SPEC, s.symbols)
        pipe = Pipeline(engine, client, ThresholdPolicy(len(s.symbols)), settings)
        summary = pipe.run(records)
    stopped = summary.stopped or ""
    return Outcome(
        f"stopped: {stopped[:140]!r}; {summary.decisions} decisions, skipped "
        f"{dict(summary.skipped)}",
        reason in stopped and summary.decisions == 0,
        {"decisions": summary.decisions, "stopped": bool(stopped)},
    )
