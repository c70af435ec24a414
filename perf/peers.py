"""Peers, side by side: one LightGBM model behind setsuna's Triton and the usual alternatives.

    make perf-peers        # creates .venv-peers (git-ignored), then runs this module with it
    .venv-peers/bin/python -m perf.peers [--duration 10] [--warmup 2] [--concurrency 1,32]
        [--peers setsuna,pytriton,pytriton-nobatch,mlserver,ray,fastapi-ort] [--budget-s 480]

The model is THE example: ``train_lightgbm(data.tabular())`` (500 trees x 63
leaves x 48 features, fixed seed), trained once here and saved to
``.cache/perf/peers/model.txt``. Each peer runs as its own server process, one
at a time, bound to 127.0.0.1, in its own process group (stopped with SIGTERM,
then SIGKILL of the group, then of any process of its tree still alive):

``setsuna``
    the local repository's ``lightgbm`` model as ``make build-engines`` built it
    (the compiled tree engine on ``setsuna_forest``, setsuna's native backend, or
    on the Python backend where that cannot be built; its dynamic batching and
    instances), served by the wheel's ``tritonserver`` through
    :class:`setsuna.server.LocalTriton`. The response cache is left off (no
    ``--cache-config``): the rows are distinct, and a cache would only turn
    the repeats of a long run into hits.
``pytriton`` / ``pytriton-nobatch``
    the naive Triton deployment: PyTriton with its defaults serving
    ``lightgbm.Booster.predict`` (``ModelConfig()``: dynamic batching,
    ``max_batch_size=4``), and the same with ``batching=False``.
``mlserver``
    MLServer with its LightGBM runtime, adaptive batching on.
``ray``
    Ray Serve, one replica, ``@serve.batch`` around ``Booster.predict``.
``fastapi-ort``
    a hand-written FastAPI endpoint running ONNX Runtime per request on an
    ONNX file converted as setsuna's ``onnx`` candidate is (onnxmltools, split
    thresholds rounded down to float32 so that decisions match LightGBM's).

Every peer that loads the booster gets ``OMP_NUM_THREADS=1``. Before timing,
each peer's answers on :data:`CHECK_ROWS` held-out rows are compared with
``lightgbm.Booster.predict``; a peer that answers wrong is reported, not timed.
Then ``perf/peers_client.py`` (the same client for every peer) runs closed
loops at each concurrency. A peer that fails to start is recorded and skipped.
Everything lands in ``.cache/perf/peers/peers.{json,md}``, every figure from
the same run, with ratios against setsuna.

Numbers are for this host only, and the client shares its cores with the
server under test: the report gives the client's own CPU per request.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Final, Protocol

import numpy as np
import numpy.typing as npt

from build_engines.examples import data
from build_engines.examples.trees import train_lightgbm
from build_engines.sources.trees import from_lightgbm
from perf.peers_client import Endpoint, LoadResult, probe, run_load
from perf.peers_client import predict as peer_predict
from setsuna.errors import SetsunaError
from setsuna.server import LocalTriton, ServerSettings, free_ports, locate_install
from setsuna.server import server_environment as triton_environment

REPO: Final = Path(__file__).resolve().parents[1]
SERVERS: Final = REPO / "perf" / "peer_servers"
OUT: Final = REPO / ".cache" / "perf" / "peers"
LOOPBACK: Final = "127.0.0.1"
MODEL_NAME: Final = "lightgbm"
N_FEATURES: Final = data.N_TABULAR_FEATURES
#: Held-out rows each peer must score like ``Booster.predict`` before it is timed.
CHECK_ROWS: Final = 16
#: Largest |peer - Booster.predict| accepted (probabilities; float32 outputs differ ~1e-8).
CHECK_TOL: Final = 1e-5
#: Batching knobs given to the peers that need them chosen (MLServer, Ray Serve):
#: a batch of up to 32 rows, or whatever arrived within 1 ms.
BATCH_MAX: Final = 32
BATCH_WAIT_S: Final = 0.001
#: Rough start-up + shut-down seconds per peer, for the estimate and the budget.
_OVERHEAD_S: Final = {
    "setsuna": 8.0,
    "pytriton": 10.0,
    "pytriton-nobatch": 10.0,
    "mlserver": 8.0,
    "ray": 20.0,
    "fastapi-ort": 4.0,
}
_PREPARE_S: Final = 20.0  # training (4-12 s on 2 cores) and the ONNX conversion
_READY_TIMEOUT_S: Final = 90.0
_STOP_GRACE_S: Final = 20.0

F32 = npt.NDArray[np.float32]
F64 = npt.NDArray[np.float64]


class PeerError(Exception):
    """A peer that could not be started or asked; the message says why."""


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Prepared:
    """The model, its files, and the rows every peer is asked about."""

    booster: Any
    model_path: Path
    onnx_path: Path | None
    onnx_note: str
    sha256: str
    rows: F32
    check_rows: F32
    expected: F64
    train_s: float


def prepare(out: Path) -> Prepared:
    """Train THE model (fixed seed), save it, and build the ONNX file for FastAPI."""
    began = time.monotonic()
    split = data.tabular()
    booster = train_lightgbm(split)
    train_s = time.monotonic() - began
    source = from_lightgbm(booster, name=MODEL_NAME)
    model_path = out / "model.txt"
    model_path.write_text(source.model.model_to_string())
    rows = np.ascontiguousarray(split.x_valid, dtype=np.float32)
    np.save(out / "rows.npy", rows)
    picks = np.linspace(0, len(rows) - 1, CHECK_ROWS).astype(int)
    check_rows = np.ascontiguousarray(rows[picks])
    expected = np.asarray(booster.predict(check_rows, num_threads=1), dtype=np.float64)
    onnx_path, onnx_note = _build_onnx(source, out / "model.onnx")
    return Prepared(
        booster=booster,
        model_path=model_path,
        onnx_path=onnx_path,
        onnx_note=onnx_note,
        sha256=source.sha256,
        rows=rows,
        check_rows=check_rows,
        expected=expected,
        train_s=train_s,
    )


def _build_onnx(source: Any, path: Path) -> tuple[Path | None, str]:
    """onnxmltools' graph as features -> score, thresholds made exact (as the gate does)."""
    try:
        import onnx
        import onnxmltools
        from onnxmltools.convert.common.data_types import FloatTensorType

        from build_engines.candidates.trees import exact_lightgbm_thresholds, to_features_score
        from build_engines.sources.trees import ONNX_OPSET
    except ImportError as exc:
        return None, f"not built: {exc}"
    raw = onnxmltools.convert_lightgbm(
        source.model,
        initial_types=[("features", FloatTensorType([None, N_FEATURES]))],
        target_opset=ONNX_OPSET,
        zipmap=False,
    )
    model = to_features_score(raw, source)
    changed = exact_lightgbm_thresholds(model, source.model)
    onnx.save(model, str(path))
    return path, (
        f"onnxmltools {_version('onnxmltools')} opset {ONNX_OPSET}, {changed} thresholds "
        "rounded down to float32 (LightGBM's decisions exactly)"
    )


# --------------------------------------------------------------------------- processes


def _tree(pid: int) -> dict[int, float]:
    """``pid`` and its descendants now, with their start times (empty without psutil)."""
    try:
        import psutil
    except ImportError:
        return {}
    out: dict[int, float] = {}
    try:
        root = psutil.Process(pid)
        for p in [root, *root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                out[int(p.pid)] = float(p.create_time())
    except psutil.Error:
        pass
    return out


def _still_ours(pid: int, started: float) -> bool:
    """Whether ``pid`` is alive and still the process seen earlier (not a reused pid)."""
    import psutil

    try:
        p = psutil.Process(pid)
        return float(p.create_time()) == started and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tree_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of ``pid``'s process tree (live processes only)."""
    if pid is None:
        return float("nan")
    try:
        import psutil
    except ImportError:
        return float("nan")
    total = 0.0
    for p in _tree(pid):  # a dict: iterates over the pids
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(p).cpu_times()
            total += float(t.user + t.system)
    return total


def _host_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (NaN without psutil)."""
    try:
        import psutil
    except ImportError:
        return float("nan")
    t = psutil.cpu_times()
    return float(sum(t) - t.idle - getattr(t, "iowait", 0.0))


class Running(Protocol):
    """A started peer server."""

    endpoint: Endpoint
    log_path: Path

    @property
    def pid(self) -> int | None: ...

    def stop(self) -> list[int]: ...

    def log_tail(self) -> str: ...


def _tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 32 * 1024))
        text = f.read().decode("utf-8", errors="replace")
    return "\n".join(text.splitlines()[-lines:])


class ChildServer:
    """A peer server as a child process in a session (process group) of its own."""

    def __init__(
        self,
        argv: Sequence[str],
        endpoint: Endpoint,
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.endpoint = endpoint
        self.log_path = log_path
        self._env = dict(os.environ if env is None else env)
        self._cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._seen: dict[int, float] = {}  # every process of its tree seen: pid -> start time

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def start(self, ready_row: F32, timeout_s: float) -> None:
        with self.log_path.open("wb") as log:
            self._proc = subprocess.Popen(
                self.argv,
                env=self._env,
                cwd=self._cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        why = "not polled yet"
        while True:
            self._seen.update(_tree(self._proc.pid))
            rc = self._proc.poll()
            if rc is not None:
                raise PeerError(f"exited with status {rc} before it was ready")
            why = probe(self.endpoint, ready_row) or ""
            if not why:
                self._seen.update(_tree(self._proc.pid))
                return
            if time.monotonic() >= deadline:
                raise PeerError(f"not ready after {timeout_s:.0f} s (last probe: {why})")
            time.sleep(0.5)

    def stop(self) -> list[int]:
        """SIGTERM the leader, SIGKILL the group after a grace; returns pids killed late."""
        proc, self._proc = self._proc, None
        if proc is None:
            return []
        self._seen.update(_tree(proc.pid))
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)  # the leader shuts its own children down
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=_STOP_GRACE_S)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # the group is ours: leftovers in it go
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)
        # A child that left the group (setsid) is still the one we saw: kill it by pid.
        late = [p for p, t in sorted(self._seen.items()) if p != proc.pid and _still_ours(p, t)]
        for pid in late:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        return late

    def log_tail(self) -> str:
        return _tail(self.log_path)


class SetsunaServer:
    """setsuna's own :class:`LocalTriton`, adapted to :class:`Running`."""

    def __init__(self, server: LocalTriton, endpoint: Endpoint, log_path: Path) -> None:
        self.server = server
        self.endpoint = endpoint
        self.log_path = log_path

    @property
    def pid(self) -> int | None:
        return self.server.pid

    def stop(self) -> list[int]:
        self.server.stop()
        return []

    def log_tail(self) -> str:
        return self.server.log_tail(25)


# --------------------------------------------------------------------------- the peers


@dataclass(frozen=True)
class Context:
    prepared: Prepared
    model_repository: Path
    out: Path
    logs: Path


@dataclass(frozen=True)
class PeerSpec:
    name: str
    title: str
    config: str
    needs: tuple[str, ...]
    start: Callable[[Context], Running]


def _v2(port: int) -> Endpoint:
    return Endpoint(f"http://{LOOPBACK}:{port}/v2/models/{MODEL_NAME}/infer", "v2", "features")


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(extra)
    return env


def setsuna_config(model_repository: Path) -> str:
    """What the built ``lightgbm`` model runs with, read from its config and manifest."""
    folder = model_repository / MODEL_NAME
    try:
        config = (folder / "config.pbtxt").read_text()
    except OSError:
        return "not built"
    parts: list[str] = []
    for path in sorted(folder.glob("*/manifest.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            parts.append(f"engine {json.loads(path.read_text()).get('engine')}")
    if m := re.search(r"backend:\s*\"(\w+)\"", config):
        parts.append(f"{m[1]} backend")
    if m := re.search(r"instance_group\s*\{[^}]*count:\s*(\d+)", config):
        parts.append(f"{m[1]} instances")
    if m := re.search(r"max_batch_size:\s*(\d+)", config):
        parts.append(f"max_batch_size {m[1]}")
    if "dynamic_batching" in config:
        preferred = re.findall(r"preferred_batch_size:\s*(\d+)", config)
        delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", config)
        parts.append(
            "dynamic batching"
            + (f" (preferred {'/'.join(preferred)}" if preferred else " (")
            + (f", max delay {delay[1]} us)" if delay else ")")
        )
    return ", ".join(parts)


def _start_setsuna(ctx: Context) -> Running:
    folder = ctx.model_repository / MODEL_NAME
    if not (folder / "config.pbtxt").is_file():
        raise PeerError(f"{folder} is not built: run `make build-engines` first")
    http, grpc, metrics = free_ports(3, LOOPBACK)
    settings = ServerSettings(
        model_repository=ctx.model_repository,
        http_port=http,
        grpc_port=grpc,
        metrics_port=metrics,
        load_models=(MODEL_NAME,),
        http=True,  # this benchmark measures the HTTP frontend too (off by default)
        cache_size_bytes=0,  # distinct rows: measure the engine, not cache hits
    )
    log = ctx.logs / "setsuna.log"
    server = LocalTriton(settings, ready_timeout_s=_READY_TIMEOUT_S, log_path=log)
    try:
        server.start()
    except SetsunaError as exc:
        raise PeerError(str(exc).splitlines()[0]) from exc
    return SetsunaServer(server, _v2(http), log)


def _start_pytriton(batching: bool) -> Callable[[Context], Running]:
    def start(ctx: Context) -> Running:
        http, grpc, metrics = free_ports(3, LOOPBACK)
        env = triton_environment(locate_install(), _env(OMP_NUM_THREADS="1"))
        argv = [
            sys.executable,
            str(SERVERS / "pytriton_app.py"),
            f"--model={ctx.prepared.model_path}",
            f"--http-port={http}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
        ]
        name = "pytriton" if batching else "pytriton-nobatch"
        if not batching:
            argv.append("--no-batching")
        child = ChildServer(argv, _v2(http), ctx.logs / f"{name}.log", env=env)
        return _started(child, ctx)

    return start


def _start_mlserver(ctx: Context) -> Running:
    http, grpc, metrics = free_ports(3, LOOPBACK)
    root = ctx.out / "mlserver"
    shutil.rmtree(root, ignore_errors=True)
    (root / MODEL_NAME).mkdir(parents=True)
    shutil.copy2(ctx.prepared.model_path, root / MODEL_NAME / "model.txt")
    settings = {
        "host": LOOPBACK,
        "http_port": http,
        "grpc_port": grpc,
        "metrics_port": metrics,
        "debug": False,
    }
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_lightgbm.LightGBMModel",
        "max_batch_size": BATCH_MAX,
        "max_batch_time": BATCH_WAIT_S,
        "parameters": {"uri": "./model.txt", "version": "v1"},
    }
    (root / "settings.json").write_text(json.dumps(settings, indent=2) + "\n")
    (root / MODEL_NAME / "model-settings.json").write_text(
        json.dumps(model_settings, indent=2) + "\n"
    )
    argv = [str(Path(sys.executable).parent / "mlserver"), "start", str(root)]
    child = ChildServer(
        argv, _v2(http), ctx.logs / "mlserver.log", env=_env(OMP_NUM_THREADS="1"), cwd=root
    )
    return _started(child, ctx)


def _start_ray(ctx: Context) -> Running:
    (port,) = free_ports(1, LOOPBACK)
    # Ray's session folder holds Unix sockets (107-byte path limit): keep it short.
    temp_dir = tempfile.mkdtemp(prefix="setsuna-ray-", dir="/tmp")
    argv = [
        sys.executable,
        str(SERVERS / "ray_app.py"),
        f"--model={ctx.prepared.model_path}",
        f"--port={port}",
        f"--temp-dir={temp_dir}",
        f"--max-batch-size={BATCH_MAX}",
        f"--batch-wait-s={BATCH_WAIT_S}",
    ]
    env = _env(
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        RAY_USAGE_STATS_ENABLED="0",
        OMP_NUM_THREADS="1",
    )
    endpoint = Endpoint(f"http://{LOOPBACK}:{port}/predict", "json")
    child = _TempDirServer(argv, endpoint, ctx.logs / "ray.log", env=env, temp_dir=temp_dir)
    return _started(child, ctx)


class _TempDirServer(ChildServer):
    """A :class:`ChildServer` whose scratch folder is removed when it stops."""

    def __init__(
        self,
        argv: Sequence[str],
        endpoint: Endpoint,
        log_path: Path,
        *,
        env: Mapping[str, str],
        temp_dir: str,
    ) -> None:
        super().__init__(argv, endpoint, log_path, env=env)
        self.temp_dir = temp_dir

    def stop(self) -> list[int]:
        try:
            return super().stop()
        finally:
            shutil.rmtree(self.temp_dir, ignore_errors=True)


def _start_fastapi(ctx: Context) -> Running:
    if ctx.prepared.onnx_path is None:
        raise PeerError(f"no ONNX model ({ctx.prepared.onnx_note})")
    (port,) = free_ports(1, LOOPBACK)
    argv = [
        sys.executable,
        str(SERVERS / "fastapi_app.py"),
        f"--onnx={ctx.prepared.onnx_path}",
        f"--port={port}",
    ]
    endpoint = Endpoint(f"http://{LOOPBACK}:{port}/predict", "json")
    child = ChildServer(argv, endpoint, ctx.logs / "fastapi-ort.log", env=_env(OMP_NUM_THREADS="1"))
    return _started(child, ctx)


def _started(child: ChildServer, ctx: Context) -> Running:
    try:
        child.start(ctx.prepared.check_rows[0], _READY_TIMEOUT_S)
    except BaseException:
        child.stop()
        raise
    return child


PEERS: Final = (
    PeerSpec(
        "setsuna",
        "setsuna (Triton, compiled trees on its backend: setsuna_forest, else Python)",
        "model_repository/local/lightgbm as `make build-engines` built it, served by the "
        "nvidia-pytriton wheel's tritonserver via setsuna.server.LocalTriton; response cache "
        "off (no --cache-config)",
        ("pytriton",),
        _start_setsuna,
    ),
    PeerSpec(
        "pytriton",
        "PyTriton defaults (dynamic batching)",
        "Booster.predict bound with ModelConfig() defaults: batching on, max_batch_size=4, "
        "dynamic batcher with no queue delay; OMP_NUM_THREADS=1",
        ("pytriton", "lightgbm"),
        _start_pytriton(batching=True),
    ),
    PeerSpec(
        "pytriton-nobatch",
        "PyTriton, batching off",
        "Booster.predict bound with ModelConfig(batching=False); OMP_NUM_THREADS=1",
        ("pytriton", "lightgbm"),
        _start_pytriton(batching=False),
    ),
    PeerSpec(
        "mlserver",
        "MLServer + mlserver-lightgbm (adaptive batching)",
        f"LightGBM runtime, max_batch_size={BATCH_MAX}, max_batch_time={BATCH_WAIT_S} s, "
        "defaults otherwise (1 parallel inference worker), debug off; OMP_NUM_THREADS=1",
        ("mlserver", "mlserver_lightgbm", "lightgbm"),
        _start_mlserver,
    ),
    PeerSpec(
        "ray",
        "Ray Serve + @serve.batch",
        f"1 replica, @serve.batch(max_batch_size={BATCH_MAX}, "
        f"batch_wait_timeout_s={BATCH_WAIT_S}) around Booster.predict; ray.init(num_cpus=2, "
        "node 127.0.0.1, no dashboard); OMP_NUM_THREADS=1",
        ("ray", "lightgbm"),
        _start_ray,
    ),
    PeerSpec(
        "fastapi-ort",
        "FastAPI + ONNX Runtime per request",
        "one uvicorn worker, async handler calling InferenceSession.run (1 intra-op thread) "
        "on one row per request",
        ("fastapi", "uvicorn", "onnxruntime"),
        _start_fastapi,
    ),
)
PEER_NAMES: Final = tuple(p.name for p in PEERS)


# --------------------------------------------------------------------------- one peer


@dataclass
class PeerResult:
    name: str
    title: str
    config: str
    status: str = "pending"  # ok | wrong | failed | skipped | interrupted
    reason: str = ""
    startup_s: float | None = None
    check: dict[str, Any] = field(default_factory=dict)
    runs: list[dict[str, Any]] = field(default_factory=list)
    log: str | None = None
    log_tail: str = ""
    late_kills: list[int] = field(default_factory=list)
    elapsed_s: float = 0.0

    def run_at(self, concurrency: int) -> dict[str, Any] | None:
        return next((r for r in self.runs if r["concurrency"] == concurrency), None)


def _check(running: Running, prepared: Prepared) -> dict[str, Any]:
    got = np.asarray(peer_predict(running.endpoint, prepared.check_rows), dtype=np.float64)
    diff = float(np.max(np.abs(got - prepared.expected)))
    same = float(np.mean((got > 0.5) == (prepared.expected > 0.5)))
    return {
        "rows": len(got),
        "max_abs_diff": diff,
        "identical_decisions": same,
        "tolerance": CHECK_TOL,
        "ok": diff <= CHECK_TOL and same == 1.0,
    }


def _timed(
    running: Running, prepared: Prepared, concurrency: int, duration_s: float, warmup_s: float
) -> dict[str, Any]:
    server0 = _tree_cpu_s(running.pid)
    host0, own0, wall0 = _host_busy_s(), time.process_time(), time.monotonic()
    result: LoadResult = run_load(
        running.endpoint,
        prepared.rows,
        concurrency=concurrency,
        duration_s=duration_s,
        warmup_s=warmup_s,
    )
    wall = time.monotonic() - wall0
    own = time.process_time() - own0
    host = _host_busy_s() - host0
    server = _tree_cpu_s(running.pid) - server0
    sent = max(1, result.sent)
    cpus = os.cpu_count() or 1
    row = result.to_json()
    row["server_cpu_us_per_req"] = server / sent * 1e6
    # Busy CPU on the host not spent by the server or this process: other load.
    row["other_cpu_share"] = max(0.0, (host - server - own) / (wall * cpus))
    row["host_cpu_share"] = host / (wall * cpus)
    return row


def run_peer(
    spec: PeerSpec,
    ctx: Context,
    concurrencies: Sequence[int],
    duration_s: float,
    warmup_s: float,
) -> PeerResult:
    config = spec.config
    if spec.name == "setsuna":
        config = f"{config}; {setsuna_config(ctx.model_repository)}"
    res = PeerResult(spec.name, spec.title, config)
    missing = [m for m in spec.needs if importlib.util.find_spec(m) is None]
    if missing:
        res.status = "skipped"
        res.reason = f"not installed in {sys.prefix}: {', '.join(missing)} (use make perf-peers)"
        return res
    began = time.monotonic()
    running: Running | None = None
    try:
        running = spec.start(ctx)
        res.startup_s = time.monotonic() - began
        res.log = str(running.log_path)
        res.check = _check(running, ctx.prepared)
        if not res.check["ok"]:
            res.status = "wrong"
            res.reason = (
                f"answers differ from Booster.predict: max |diff| "
                f"{res.check['max_abs_diff']:.3g} > {CHECK_TOL:g}, identical decisions "
                f"{res.check['identical_decisions']:.2%}; not timed"
            )
            return res
        for c in concurrencies:
            print(f"  {spec.name}: c={c} for {warmup_s:g}+{duration_s:g} s ...", flush=True)
            res.runs.append(_timed(running, ctx.prepared, c, duration_s, warmup_s))
            errors = res.runs[-1]["errors"]
            if errors:
                res.reason = f"{errors} failed requests at c={c}: {res.runs[-1]['first_error']}"
        res.status = "errors" if res.reason else "ok"
    except KeyboardInterrupt:
        res.status, res.reason = "interrupted", "interrupted (SIGINT/SIGTERM)"
    except Exception as exc:
        res.status = "failed"
        res.reason = f"{type(exc).__name__}: {exc}"
    finally:
        if running is not None:
            res.log_tail = running.log_tail() if res.status != "ok" else ""
            res.late_kills = running.stop()
        else:
            log = ctx.logs / f"{spec.name}.log"
            if log.exists():
                res.log, res.log_tail = str(log), _tail(log)
        res.elapsed_s = time.monotonic() - began
    return res


# --------------------------------------------------------------------------- the report


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


VERSIONED: Final = (
    "setsuna",
    "lightgbm",
    "numpy",
    "nvidia-pytriton",
    "mlserver",
    "mlserver-lightgbm",
    "ray",
    "fastapi",
    "uvicorn",
    "uvloop",
    "onnxruntime",
    "onnxmltools",
    "aiohttp",
    "psutil",
)


def _manifest_sha(model_repository: Path) -> str | None:
    """sha256 of the source model setsuna's repository was built from (its manifest)."""
    for path in sorted((model_repository / MODEL_NAME).glob("*/manifest.json")):
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sha = json.loads(path.read_text()).get("source", {}).get("sha256")
            if sha:
                return str(sha)
    return None


def _ratios(results: list[PeerResult], concurrencies: Sequence[int]) -> None:
    base = next((r for r in results if r.name == "setsuna" and r.status == "ok"), None)
    for r in results:
        for run in r.runs:
            ref = base.run_at(run["concurrency"]) if base else None
            if ref is None or not ref["req_per_s"]:
                run["vs_setsuna"] = None
                continue
            run["vs_setsuna"] = {
                "req_per_s": run["req_per_s"] / ref["req_per_s"],
                "p50": run["p50_ms"] / ref["p50_ms"],
                "p99": run["p99_ms"] / ref["p99_ms"],
            }


#: The native-backend targets (issue 13), against the hand-written FastAPI + ONNX Runtime.
TARGET_PEER: Final = "fastapi-ort"


def targets(results: list[PeerResult]) -> list[dict[str, Any]]:
    """setsuna against FastAPI + ONNX Runtime, same run: c=1 p50 <= 0.7x and p99 below
    its p99, c=32 >= 2x its req/s. Empty when either was not measured."""
    mine = next((r for r in results if r.name == "setsuna" and r.status == "ok"), None)
    peer = next((r for r in results if r.name == TARGET_PEER and r.status == "ok"), None)
    if mine is None or peer is None:
        return []
    out: list[dict[str, Any]] = []
    one, one_peer = mine.run_at(1), peer.run_at(1)
    if one and one_peer:
        ratio = one["p50_ms"] / one_peer["p50_ms"]
        out.append(
            {
                "target": "c=1 p50 <= 0.7x FastAPI + ONNX Runtime's",
                "measured": f"{one['p50_ms']:.3f} vs {one_peer['p50_ms']:.3f} ms ({ratio:.2f}x)",
                "pass": ratio <= 0.7,
            }
        )
        out.append(
            {
                "target": "c=1 p99 below FastAPI + ONNX Runtime's",
                "measured": f"{one['p99_ms']:.3f} vs {one_peer['p99_ms']:.3f} ms",
                "pass": one["p99_ms"] < one_peer["p99_ms"],
            }
        )
    many, many_peer = mine.run_at(32), peer.run_at(32)
    if many and many_peer and many_peer["req_per_s"]:
        ratio = many["req_per_s"] / many_peer["req_per_s"]
        out.append(
            {
                "target": "c=32 >= 2x FastAPI + ONNX Runtime's req/s",
                "measured": f"{many['req_per_s']:,.0f} vs {many_peer['req_per_s']:,.0f} req/s "
                f"({ratio:.2f}x)",
                "pass": ratio >= 2.0,
            }
        )
    return out


def _f(v: Any, fmt: str = ".2f") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, fmt)


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    conc: list[int] = s["concurrency"]
    lines = [
        "# Peers, side by side: one LightGBM model behind different servers",
        "",
        f"Generated {report['generated']} by `{report['command']}` on {report['host']['cpus']} "
        f"CPUs ({report['host']['platform']}, Python {report['host']['python']}). Model: "
        f"{report['model']['description']}, sha256 `{report['model']['sha256'][:16]}`"
        f" ({report['model']['setsuna_same_model']}).",
        "",
        f"Client: `perf/peers_client.py`, one for every peer. {report['client']}",
        f"Each run: {s['warmup_s']:g} s warm-up, then {s['duration_s']:g} s measured, closed loop "
        f"at concurrency {', '.join(map(str, conc))}; one row of {N_FEATURES} float32 features "
        f"per request over HTTP/1.1 keep-alive, {s['distinct_rows']:,} distinct held-out rows. "
        f"Latency in ms (send to last byte); req/s = completed requests / measured seconds. "
        f"'x setsuna' = this peer's figure / setsuna's at the same concurrency.",
        "",
    ]
    head = ["peer", "status"]
    for c in conc:
        head += [f"c={c} p50", f"c={c} p99", f"c={c} req/s", f"c={c} req/s x setsuna"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in report["peers"]:
        cells = [p["title"], p["status"]]
        for c in conc:
            run = next((r for r in p["runs"] if r["concurrency"] == c), None)
            if run is None:
                cells += ["-", "-", "-", "-"]
                continue
            vs = run.get("vs_setsuna") or {}
            cells += [
                _f(run["p50_ms"]),
                _f(run["p99_ms"]),
                _f(run["req_per_s"], ",.0f"),
                _f(vs.get("req_per_s")),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    checks = report.get("targets") or []
    if checks:
        lines += ["", "## Targets (setsuna vs FastAPI + ONNX Runtime, this run)", ""]
        lines += [f"- **{'PASS' if c['pass'] else 'MISS'}** {c['target']}: {c['measured']}"
                  for c in checks]  # fmt: skip
    lines += [
        "",
        "## Against setsuna (this peer / setsuna, same concurrency)",
        "",
        "req/s above 1: the peer serves more; p50/p99 above 1: the peer is slower.",
        "",
        "| peer | " + " | ".join(f"c={c} req/s | c={c} p50 | c={c} p99" for c in conc) + " |",
        "|---|" + "---|---|---|" * len(conc),
    ]
    for p in report["peers"]:
        cells = [p["name"]]
        for c in conc:
            run = next((r for r in p["runs"] if r["concurrency"] == c), None)
            vs = (run or {}).get("vs_setsuna") or {}
            cells += [_f(vs.get("req_per_s")), _f(vs.get("p50")), _f(vs.get("p99"))]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "## CPU per request (us) and other load",
        "",
        "Server = the peer's process tree; client = this load client; other = host CPU busy "
        "outside both, as a share of all cores (should be ~0 on a quiet machine).",
        "",
        "| peer | c | server CPU us/req | client CPU us/req | other load | errors |",
        "|---|---|---|---|---|---|",
    ]
    for p in report["peers"]:
        for run in p["runs"]:
            lines.append(
                f"| {p['name']} | {run['concurrency']} | {_f(run['server_cpu_us_per_req'], '.0f')}"
                f" | {_f(run['client_cpu_us_per_req'], '.0f')} | "
                f"{_f(run['other_cpu_share'] * 100, '.0f')} % | {run['errors']} |"
            )
    lines += ["", "## How each peer is configured", ""]
    for p in report["peers"]:
        check = p["check"]
        checked = (
            f" Answers on {check['rows']} rows: max |diff| vs Booster.predict "
            f"{check['max_abs_diff']:.2g}."
            if check
            else ""
        )
        startup = f" Ready in {p['startup_s']:.1f} s." if p["startup_s"] is not None else ""
        reason = f" **{p['status']}**: {p['reason']}" if p["reason"] else ""
        lines.append(f"- **{p['name']}**: {p['config']}.{startup}{checked}{reason}")
    lines += ["", "## Versions", ""]
    lines += [f"- {k} {v}" for k, v in report["versions"].items()]
    return "\n".join(lines) + "\n"


def _print_table(results: list[PeerResult], concurrencies: Sequence[int]) -> None:
    print(f"\n{'peer':<18} {'status':<11}", end="")
    for c in concurrencies:
        print(f" | c={c:<3} p50 ms  p99 ms    req/s  x setsuna", end="")
    print()
    for r in results:
        print(f"{r.name:<18} {r.status:<11}", end="")
        for c in concurrencies:
            run = r.run_at(c)
            if run is None:
                print(f" | {'-':>44}", end="")
                continue
            vs = (run.get("vs_setsuna") or {}).get("req_per_s")
            print(
                f" | {_f(run['p50_ms']):>10} {_f(run['p99_ms']):>7} "
                f"{_f(run['req_per_s'], ',.0f'):>8} {_f(vs):>10}",
                end="",
            )
        print()
        if r.reason:
            print(f"{'':<18} {r.reason}")


# --------------------------------------------------------------------------- main


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def estimate_s(peers: Sequence[str], concurrencies: Sequence[int], run_s: float) -> float:
    per_run = run_s + 2.0  # body encoding, settling
    return _PREPARE_S + sum(_OVERHEAD_S[p] + 1.0 + len(concurrencies) * per_run for p in peers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m perf.peers",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--peers", default=",".join(PEER_NAMES), help="comma-separated subset")
    p.add_argument("--concurrency", default="1,32", help="comma-separated (default 1,32)")
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per run")
    p.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    p.add_argument(
        "--budget-s",
        type=float,
        default=480.0,
        help="skip the peers that would not finish within this many seconds in all",
    )
    p.add_argument("--model-repository", type=Path, default=REPO / "model_repository" / "local")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    names = [n for n in args.peers.split(",") if n]
    unknown = sorted(set(names) - set(PEER_NAMES))
    if unknown:
        p.error(f"unknown peers {unknown}; choose from {', '.join(PEER_NAMES)}")
    concurrencies = [int(c) for c in args.concurrency.split(",") if c]
    if not concurrencies or min(concurrencies) < 1 or args.duration <= 0 or args.warmup < 0:
        p.error("give concurrencies >= 1, --duration > 0 and --warmup >= 0")
    specs = [s for s in PEERS if s.name in names]
    run_s = args.duration + args.warmup
    est = estimate_s(names, concurrencies, run_s)
    print(
        f"perf.peers: {len(specs)} peers x concurrency {concurrencies} x "
        f"({args.warmup:g}+{args.duration:g}) s; estimated ~{est / 60:.1f} min "
        f"(budget {args.budget_s / 60:.1f} min)",
        flush=True,
    )
    started = time.monotonic()
    out: Path = args.out
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    results: list[PeerResult] = []
    interrupted = False
    with _sigterm_as_interrupt():
        try:
            print("training the model (fixed seed) ...", flush=True)
            prepared = prepare(out)
            print(f"  trained in {prepared.train_s:.1f} s; ONNX: {prepared.onnx_note}", flush=True)
            ctx = Context(prepared, args.model_repository.resolve(), out, logs)
            for spec in specs:
                elapsed = time.monotonic() - started
                need = _OVERHEAD_S[spec.name] + len(concurrencies) * (run_s + 2.0)
                if elapsed + need > args.budget_s:
                    res = PeerResult(spec.name, spec.title, spec.config, status="skipped")
                    res.reason = f"over the time budget ({elapsed:.0f} s spent, ~{need:.0f} s more)"
                    results.append(res)
                    continue
                print(f"{spec.name}: starting ...", flush=True)
                res = run_peer(spec, ctx, concurrencies, args.duration, args.warmup)
                results.append(res)
                print(
                    f"  {spec.name}: {res.status} in {res.elapsed_s:.0f} s {res.reason}".rstrip(),
                    flush=True,
                )
                if res.status == "interrupted":
                    raise KeyboardInterrupt
        except KeyboardInterrupt:
            interrupted = True
            print("interrupted: writing what was measured", flush=True)
    if not results and interrupted:
        return 130
    _ratios(results, concurrencies)
    repo_sha = _manifest_sha(args.model_repository)
    sha = prepared.sha256
    report: dict[str, Any] = {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m perf.peers", *(sys.argv[1:] if argv is None else argv)]),
        "elapsed_s": time.monotonic() - started,
        "interrupted": interrupted,
        "host": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "interpreter": sys.executable,
        },
        "settings": {
            "concurrency": concurrencies,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "distinct_rows": len(prepared.rows),
            "check_rows": CHECK_ROWS,
            "check_tolerance": CHECK_TOL,
            "batch_max": BATCH_MAX,
            "batch_wait_s": BATCH_WAIT_S,
        },
        "client": (
            "Python asyncio + aiohttp (C HTTP parser), one keep-alive connection per worker, "
            "bodies encoded before the run, response status checked (answers checked before "
            "timing); runs in the orchestrating process on the same cores as the server; "
            "its CPU per request is in the table below."
        ),
        "model": {
            "description": "train_lightgbm(data.tabular()): 500 trees x 63 leaves x 48 features",
            "sha256": sha,
            "train_s": prepared.train_s,
            "onnx": prepared.onnx_note,
            "setsuna_manifest_sha256": repo_sha,
            "setsuna_same_model": (
                "setsuna's repository serves this very model"
                if repo_sha == sha
                else f"WARNING: setsuna's repository was built from another model ({repo_sha})"
            ),
        },
        "versions": {name: _version(name) for name in VERSIONED},
        "peers": [r.__dict__ for r in results],
        "targets": targets(results),
    }
    (out / "peers.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    (out / "peers.md").write_text(markdown(report))
    _print_table(results, concurrencies)
    for c in report["targets"]:
        print(f"{'PASS' if c['pass'] else 'MISS'}  {c['target']}: {c['measured']}")
    print(
        f"\nwrote {out / 'peers.json'} and {out / 'peers.md'} "
        f"in {(time.monotonic() - started) / 60:.1f} min",
        flush=True,
    )
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
