"""A model whose backend stub was killed: the client names it, the pipeline stops loudly.

Issue (hardening): after ``kill -9`` of a model's Python stub processes,
Triton 2.51 keeps the model READY and answers every request after 1.00 s
with gRPC ``INTERNAL`` "Stub process '<model>_0_<n>' is not healthy."
(measured here); a replay against it skipped every event as "deadline" and
exited 0. Here a logistic model (built by ``tests.helpers``) is served over
gRPC with LocalTriton's stub watchdog off (it would reload the model: that is
the server's half of the fix), its stubs are killed once for the module, and
then: the client raises
:class:`ModelNotReadyError` saying what to do, the pipeline stops at that
error or after ``max_consecutive_failed_requests`` deadlines, and ``setsuna
replay`` exits non-zero with the reason on stderr.
"""

from __future__ import annotations

import os
import select
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from setsuna import cli
from setsuna.client import Client, ClientSettings
from setsuna.errors import ModelNotReadyError
from setsuna.features import FeatureEngine, default_spec
from setsuna.market import BarRecords, ReplayFeed, datasets
from setsuna.pipeline import Pipeline, PipelineSettings
from setsuna.policy import ThresholdPolicy
from setsuna.server import LocalTriton
from tests.helpers import build_logistic_models

pytest.importorskip("pandas")
SPEC = default_spec()
MODEL = "doomed"
#: Longer than Triton's 1 s stub health check, so its error reaches the client.
PATIENT_MS = 5_000.0


@dataclass
class Dead:
    server: LocalTriton
    records: BarRecords
    symbols: tuple[str, ...]
    bars_csv: Path


def stub_pids(server_pid: int, model: str) -> list[int]:
    """Children of the server whose argv[1] is ``.../<model>/<version>/model.py``."""
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:  # gone meanwhile
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        path = Path(os.fsdecode(argv[1])) if len(argv) > 1 else Path()
        if parent == server_pid and path.name == "model.py" and path.parent.parent.name == model:
            found.append(int(entry.name))
    return found


def kill_9(pids: list[int]) -> None:
    """SIGKILL each process and return once each has exited (pidfds, no polling)."""
    fds = [os.pidfd_open(pid) for pid in pids]
    try:
        for pid in pids:
            os.kill(pid, signal.SIGKILL)
        for fd in fds:
            ready, _, _ = select.select([fd], [], [], 30.0)
            assert ready, "a killed stub did not exit"
    finally:
        for fd in fds:
            os.close(fd)


@pytest.fixture(scope="module")
def dead(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Dead]:
    root = tmp_path_factory.mktemp("dead_model")
    rng = np.random.default_rng(3)
    w = (rng.normal(size=len(SPEC)) * 0.01).astype(np.float32)
    x = rng.normal(size=(300, len(SPEC))).astype(np.float32)
    repo = build_logistic_models(root, {MODEL: w}, x)
    frame = datasets.eurusd().iloc[:400]
    bars_csv = root / "eurusd.csv"
    frame.to_csv(bars_csv, index=False)
    feed = ReplayFeed.from_frame(frame)
    # Without LocalTriton's stub watchdog: the model stays dead and READY, as Triton
    # alone leaves it (and as it is between a death and a reload that may fail).
    with LocalTriton.on_free_ports(repo, log_path=root / "triton.log", watchdog=False) as server:
        with Client(server.grpc_url) as client:  # alive before the kill
            client.infer(MODEL, np.zeros((1, len(SPEC)), np.float32))
        assert server.pid is not None
        pids = stub_pids(server.pid, MODEL)
        assert pids, "found no triton_python_backend_stub for the model"
        kill_9(pids)
        yield Dead(server, np.array(feed.records), feed.symbols, bars_csv)


def _pipeline(dead: Dead, client: Client, settings: PipelineSettings) -> Pipeline:
    engine = FeatureEngine(SPEC, dead.symbols)
    return Pipeline(engine, client, ThresholdPolicy(len(dead.symbols)), settings)


def test_the_client_calls_a_dead_stub_not_ready_and_says_what_to_do(dead: Dead) -> None:
    x = np.zeros((1, len(SPEC)), np.float32)
    with Client(dead.server.grpc_url, settings=ClientSettings(deadline_ms=PATIENT_MS)) as c:
        assert c.model_ready(MODEL)  # the defect: Triton still says READY
        with pytest.raises(ModelNotReadyError, match=r"backend process died.*reload the model"):
            c.infer(MODEL, x)


def test_the_pipeline_stops_at_the_first_answer_of_a_dead_stub(dead: Dead) -> None:
    with Client(dead.server.grpc_url) as c:
        pipe = _pipeline(dead, c, PipelineSettings(MODEL, deadline_ms=PATIENT_MS))
        summary = pipe.run(dead.records)
    assert summary.stopped is not None and "ModelNotReadyError" in summary.stopped
    assert summary.skipped["model_not_ready"] == 1 and summary.requests == 0


def test_the_pipeline_stops_after_consecutive_deadlines(dead: Dead) -> None:
    """At a deadline under Triton's 1 s health check, a dead model is only timeouts."""
    settings = PipelineSettings(MODEL, deadline_ms=50, max_consecutive_failed_requests=5)
    with Client(dead.server.grpc_url) as c:
        summary = _pipeline(dead, c, settings).run(dead.records)
    assert summary.stopped is not None, "a run that skipped every request did not stop"
    assert "5 requests in a row failed" in summary.stopped
    # Mostly deadlines; a request queued behind the dead instances may be refused instead.
    failed = summary.skipped.get("deadline", 0) + summary.skipped.get("overloaded", 0)
    assert failed == 5 and summary.requests == 0


def test_replay_exits_non_zero_and_says_why_on_stderr(
    dead: Dead, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = cli.main(
        [
            "replay",
            "--model",
            MODEL,
            "--data",
            str(dead.bars_csv),
            "--url",
            dead.server.grpc_url,
            "--audit",
            str(tmp_path / "audit.db"),
            "--deadline-ms",
            "50",
            "--max-consecutive-failed-requests",
            "5",
        ]
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "the run stopped" in err and "5 requests in a row failed" in err
