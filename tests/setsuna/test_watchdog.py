"""ModelWatchdog against the real ``tritonserver`` 2.51: kill -9 stubs, watch it recover.

No mocks: the stubs are real processes and the kills are real SIGKILLs. The
stubs are found with ``ps --ppid`` (not the watchdog's own /proc reader), so
the watchdog is checked against an independent view. One module-scoped
server serves every test; each test kills only the model it owns, and the
waits are conditions with a deadline, never a wall-time verdict.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from setsuna import seal
from setsuna.errors import ConfigError, ServerError
from setsuna.server import LocalTriton, find_tritonserver
from setsuna.watchdog import ModelWatchdog, WatchdogSettings

try:
    find_tritonserver()
except ServerError as exc:  # pragma: no cover - CI without the serve extra
    pytest.skip(f"no tritonserver: {exc}", allow_module_level=True)

import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

CONFIG = """\
backend: "python"
max_batch_size: 8
input [ {{ name: "features" data_type: TYPE_FP32 dims: [ 4 ] }} ]
output [ {{ name: "score" data_type: TYPE_FP32 dims: [ 4 ] }} ]
instance_group [ {{ kind: KIND_CPU count: {count} }} ]
"""

IDENTITY_PY = """\
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "features").as_numpy()
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", x)]))
        return out
"""

BROKEN_PY = """\
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("watchdog-reload-sentinel")

    def execute(self, requests):
        return []
"""

ENSEMBLE_CONFIG = """\
platform: "ensemble"
max_batch_size: 8
input [ { name: "features" data_type: TYPE_FP32 dims: [ 4 ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 4 ] } ]
ensemble_scheduling { step [ {
  model_name: "member" model_version: -1
  input_map { key: "features" value: "features" }
  output_map { key: "score" value: "score" }
} ] }
"""

# Each test owns one model; "member" (behind the ensemble "pair") is never killed.
MODELS = {
    "solo": 1,
    "duo": 2,
    "fragile": 1,
    "crashy": 1,
    "orphan": 1,
    "bystander": 1,
    "member": 1,
}
ROW = np.arange(4, dtype=np.float32).reshape(1, 4)
DEADLINE_S = 60.0


def write_model(repo: Path, name: str, code: str, count: int = 1) -> None:
    """A model folder, sealed as the build seals it: the stub guard loads nothing else."""
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    (repo / name / "config.pbtxt").write_text(CONFIG.format(count=count))
    (repo / name / "1" / "model.py").write_text(code)
    seal.seal_model(repo / name)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalTriton]:
    repo = tmp_path_factory.mktemp("repo")
    for name, count in MODELS.items():
        write_model(repo, name, IDENTITY_PY, count)
    (repo / "pair" / "1").mkdir(parents=True)  # an ensemble: no model.py, no stub
    (repo / "pair" / "config.pbtxt").write_text(ENSEMBLE_CONFIG)
    with LocalTriton.on_free_ports(
        repo, log_path=repo.parent / "triton.log", watchdog=False
    ) as srv:
        yield srv


# ------------------------------------------------------------------ helpers


def _children(server: LocalTriton) -> list[tuple[int, str, str]]:
    """(pid, state, args) of every child of the server, as ``ps`` reports them."""
    done = subprocess.run(
        ["ps", "-ww", "-o", "pid=,stat=,args=", "--ppid", str(server.pid)],
        capture_output=True,
        text=True,
        check=False,
    )
    rows = []
    for line in done.stdout.splitlines():
        pid, state, args = [*line.split(None, 2), ""][:3]
        rows.append((int(pid), state, args))
    return rows


def stub_pids(server: LocalTriton, model: str) -> list[int]:
    """Live stubs of ``model``: argv[1] is .../<model>/<version>/model.py."""
    return sorted(
        pid
        for pid, state, args in _children(server)
        if not state.startswith("Z") and f"/{model}/1/model.py " in args
    )


def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout_s:.0f} s: {what}")
        time.sleep(0.05)


def kill(server: LocalTriton, pids: list[int]) -> None:
    """SIGKILL the stubs and wait until ps shows them dead (zombie or gone)."""
    assert pids
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: not set(pids) & {p for p, s, _ in _children(server) if not s.startswith("Z")},
        f"stubs {pids} dead",
    )


def client(server: LocalTriton) -> Any:
    return grpcclient.InferenceServerClient(server.grpc_url)


def infer(server: LocalTriton, model: str) -> Any:
    with client(server) as c:
        inp = grpcclient.InferInput("features", list(ROW.shape), "FP32")
        inp.set_data_from_numpy(ROW)
        return c.infer(model, [inp], client_timeout=30).as_numpy("score")


def ready(server: LocalTriton, model: str) -> bool:
    with client(server) as c:
        return bool(c.is_model_ready(model))


def index_state(server: LocalTriton, model: str) -> str:
    with client(server) as c:
        index = c.get_model_repository_index(headers=server.grpc_admin_headers, as_json=True)
    return next(str(m.get("state", "")) for m in index["models"] if m["name"] == model)


# ------------------------------------------------------------------ the defect and the fix


def test_every_stub_killed_is_reloaded_and_nothing_else_is_touched(
    server: LocalTriton, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="setsuna.watchdog")
    others = {m: stub_pids(server, m) for m in MODELS if m != "solo" and ready(server, m)}
    victims = stub_pids(server, "solo")
    with ModelWatchdog(server, interval_ms=200) as wd:  # start() records the baseline
        kill(server, victims)
        wait_for(lambda: wd.restarts.get("solo") == 1, "the watchdog thread reloaded solo")
        np.testing.assert_array_equal(infer(server, "solo"), ROW)
    assert wd.restarts == {"solo": 1}
    assert wd.failures == {}
    assert ready(server, "solo")
    assert set(stub_pids(server, "solo")).isdisjoint(victims)
    assert {m: stub_pids(server, m) for m in others} == others  # nobody else reloaded
    (event,) = wd.events
    assert (event.model, event.action, event.dead_pids) == ("solo", "reloaded", tuple(victims))
    lines = [r.getMessage() for r in caplog.records if r.name == "setsuna.watchdog"]
    assert len(lines) == 1, lines
    assert "model solo" in lines[0] and str(victims[0]) in lines[0]
    assert "READY in" in lines[0] and "restart 1" in lines[0]


def test_one_of_two_instances_killed_is_detected(server: LocalTriton) -> None:
    wd = ModelWatchdog(server)
    wd.check_once()
    first, second = stub_pids(server, "duo")
    kill(server, [first])
    (event,) = wd.check_once()
    assert wd.restarts == {"duo": 1}
    assert (event.action, event.dead_pids) == ("reloaded", (first,))
    np.testing.assert_array_equal(infer(server, "duo"), ROW)
    # The old instance that survived lingers a few seconds after the reload and
    # then exits: that is Triton retiring it, not a second death.
    wait_for(lambda: not wd.check_once() and second not in stub_pids(server, "duo"), "old exits")
    wd.check_once()
    assert wd.restarts == {"duo": 1}
    assert len(stub_pids(server, "duo")) == 2


def test_a_failed_reload_leaves_the_model_not_ready_with_the_reason(
    server: LocalTriton, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="setsuna.watchdog")
    wd = ModelWatchdog(server)
    wd.check_once()
    # A sealed model whose initialize raises: the reload runs it and fails.
    write_model(server.settings.model_repository, "fragile", BROKEN_PY)
    kill(server, stub_pids(server, "fragile"))
    wd.check_once()
    assert not ready(server, "fragile")
    assert "watchdog-reload-sentinel" in wd.failures["fragile"]
    assert "fragile" not in wd.restarts
    assert wd.events[-1].action == "reload_failed"
    wait_for(lambda: index_state(server, "fragile") != "READY", "fragile leaves READY")
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "watchdog-reload-sentinel" in errors[0].getMessage()
    wd.check_once()  # an unloaded model is left alone: nothing more happens
    assert len(wd.events) == 1
    with pytest.raises(InferenceServerException):
        infer(server, "fragile")


def test_past_the_reload_limit_the_model_is_unloaded_and_reported(server: LocalTriton) -> None:
    wd = ModelWatchdog(server, max_reloads_per_window=2, reload_window_s=3600)
    wd.check_once()
    for n in (1, 2):
        kill(server, stub_pids(server, "crashy"))
        wd.check_once()
        assert wd.restarts == {"crashy": n}
        assert ready(server, "crashy")
    kill(server, stub_pids(server, "crashy"))
    wd.check_once()
    assert wd.restarts == {"crashy": 2}
    assert wd.events[-1].action == "gave_up"
    assert "2 reload(s) in the last 3600 s" in wd.failures["crashy"]
    assert not ready(server, "crashy")


def test_triton_alone_keeps_a_dead_model_ready_and_a_fresh_watchdog_still_sees_it(
    server: LocalTriton,
) -> None:
    """Why detection reads pids: 2.51's readiness says READY with every stub dead.

    If this starts failing on a newer Triton, readiness became a detector and
    ``probe_readiness`` may be worth turning on.
    """
    kill(server, stub_pids(server, "orphan"))
    assert ready(server, "orphan")
    assert index_state(server, "orphan") == "READY"
    with pytest.raises(InferenceServerException, match="not healthy"):
        infer(server, "orphan")
    wd = ModelWatchdog(server, probe_readiness=True)  # no baseline: zero live stubs is enough
    wd.check_once()
    assert wd.restarts == {"orphan": 1}
    assert wd.events[-1].dead_pids == ()
    np.testing.assert_array_equal(infer(server, "orphan"), ROW)


def test_operator_reload_and_unload_are_not_deaths(server: LocalTriton) -> None:
    wd = ModelWatchdog(server, probe_readiness=True)
    wd.check_once()
    (old,) = stub_pids(server, "bystander")
    # A new release of the model: Triton reloads it (a load of unchanged files is a
    # no-op) and the old stub serves on until the new one is up, then exits.
    write_model(server.settings.model_repository, "bystander", IDENTITY_PY + "# v2\n")
    with client(server) as c:
        c.load_model("bystander", headers=server.grpc_admin_headers)
        assert stub_pids(server, "bystander") != [old]
        wait_for(
            lambda: not wd.check_once() and old not in stub_pids(server, "bystander"),
            "the old stub exits",
        )
        assert not wd.check_once()
        assert not wd.events
        c.unload_model("bystander", headers=server.grpc_admin_headers)
        wait_for(lambda: index_state(server, "bystander") != "READY", "bystander unloaded")
        wd.check_once()
        assert not wd.events and not ready(server, "bystander")  # not reloaded behind our back
        c.load_model("bystander", headers=server.grpc_admin_headers)
    wd.check_once()
    # Still watched after all that: killing its new stub is caught.
    kill(server, stub_pids(server, "bystander"))
    wd.check_once()
    assert wd.restarts == {"bystander": 1}


def test_a_model_without_stubs_is_not_a_dead_model(server: LocalTriton) -> None:
    """An ensemble runs no stub of its own: zero stubs must not read as dead."""
    wd = ModelWatchdog(server)
    assert not wd.check_once() and not wd.check_once()
    assert ready(server, "pair")
    np.testing.assert_array_equal(infer(server, "pair"), ROW)


# ------------------------------------------------------------------ settings (no server)


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"interval_ms": 0}, "interval_ms"),
        ({"interval_ms": 0.5}, "interval_ms"),
        ({"interval_ms": True}, "interval_ms"),
        ({"max_reloads_per_window": 0}, "max_reloads_per_window"),
        ({"reload_window_s": 0}, "reload_window_s"),
        ({"reload_window_s": float("nan")}, "reload_window_s"),
        ({"reload_timeout_s": -1.0}, "reload_timeout_s"),
        ({"probe_readiness": "yes"}, "probe_readiness"),
    ],
)
def test_settings_reject(kw: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        WatchdogSettings(**kw)
    with pytest.raises(ConfigError, match=match):
        ModelWatchdog(None, **kw)  # type: ignore[arg-type]


def test_settings_defaults() -> None:
    s = WatchdogSettings()
    assert (s.interval_ms, s.max_reloads_per_window, s.probe_readiness) == (500, 3, False)
