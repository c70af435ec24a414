"""Triton's ``perf_analyzer``: find the binary, run it bounded, parse what it reports.

The tuner's measuring instrument, hence in the build's package (``build_engines``
may not import ``perf``); the perf/ scripts import it from here too.

The binary comes from the ``tritonclient==2.47.0`` wheel (``make perf-setup``,
which runs ``perf/setup_perf_analyzer.sh``) and lives in
``.cache/perf_analyzer/`` with the ``libcudart.so.12`` it links; :func:`locate`
finds it there (or in ``$PERF_ANALYZER_DIR``) and :meth:`Binary.env` puts the
library on ``LD_LIBRARY_PATH``.

One :class:`RunSpec` is one invocation at one concurrency and one batch size.
:func:`run` always returns a :class:`RunResult`, never raises for a bad run:
a sweep must record a failure and go on. Measured pitfalls it handles:

* at ``--stability-percentage 15`` the run often never converges at c=32 on
  two cores and reports nothing (rc 2): the default here is 50 %, and
  stabilisation uses the average latency (``--percentile`` would stabilise on
  p99, which converges even less); p50..p99 still come from ``--verbose-csv``;
* it sometimes hangs at c=32 over HTTP: every run has a wall-clock timeout
  after which its process group is killed;
* its default ``random`` input is ONE tensor reused, so with the response
  cache on every request is a hit: pass ``input_data`` (a JSON file of many
  distinct rows, :func:`write_input_json`) for miss figures;
* percentiles hide a rare slow request (one in a few thousand is past p99.9):
  every run also writes ``--profile-export-file``, the send and response
  time of every request of every window (the unstable ones too), and
  :func:`parse_profile_export` counts the requests slower than
  :data:`STALL_LATENCY_US` (:attr:`RunResult.requests`). The file holds each
  response's raw output bytes inside JSON strings (not UTF-8), so it is read
  as Latin-1. A run that fails (unstable, refused request) writes none.

Latencies are microseconds, per request (a request carries ``batch_size``
rows); throughput is rows ("inferences") per second.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from setsuna.errors import SetsunaError

Protocol = Literal["grpc", "http"]
Status = Literal["ok", "unstable", "timeout", "failed"]
PROTOCOLS: Final[tuple[Protocol, ...]] = ("grpc", "http")

#: Where ``perf/setup_perf_analyzer.sh`` installs by default (repository-relative).
DEFAULT_TOOL_DIR: Final = Path(__file__).resolve().parents[2] / ".cache" / "perf_analyzer"
TOOL_DIR_ENV: Final = "PERF_ANALYZER_DIR"
SETUP_HINT: Final = "run `make perf-setup` (perf/setup_perf_analyzer.sh)"
_TAIL_CHARS: Final = 2000
#: A request slower than this is a stall. Triton 2.51's dynamic batcher, when it misses
#: a wake-up, answers after its idle sleep of 500 ms (``default_wait_microseconds``;
#: measured 500.7-508.7 ms, 143 stalls). Healthy requests take 0.3-50 ms on a quiet
#: host, but HTTP at c=32 on a host loaded 5-10 by other work reached 257, 396 and
#: 397 ms (p99 31-96 ms), so the line sits half-way between, not at 400 ms.
STALL_LATENCY_US: Final = 450_000.0
#: Triton's refusal of a request that waited past a queue policy's timeout: how a
#: stall shows when the model has one (perf_analyzer then stops the run, no export).
QUEUE_TIMEOUT_MESSAGE: Final = "Request timeout expired"
#: Stall latencies kept per run (the slowest), for the report.
_STALLS_KEPT: Final = 10


class PerfAnalyzerError(SetsunaError):
    """perf_analyzer is missing or cannot run at all (a single bad run is a RunResult)."""


# --------------------------------------------------------------------------- the binary


@dataclass(frozen=True)
class Binary:
    """The ``perf_analyzer`` executable and the folder holding ``libcudart.so.12``."""

    path: Path
    lib_dir: Path

    def env(self, base: Mapping[str, str] | None = None) -> dict[str, str]:
        """``base`` (default: this process's) with :attr:`lib_dir` first on LD_LIBRARY_PATH."""
        env = dict(os.environ if base is None else base)
        old = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
        env["LD_LIBRARY_PATH"] = os.pathsep.join([str(self.lib_dir), *old])
        return env

    def version(self) -> str:
        """``perf_analyzer --version``'s line, e.g. ``Perf Analyzer Version 2.47.0 ...``."""
        try:
            done = subprocess.run(
                [str(self.path), "--version"],
                env=self.env(),
                capture_output=True,
                text=True,
                timeout=30,
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise PerfAnalyzerError(f"could not run {self.path} --version: {exc}") from exc
        out = (done.stdout + done.stderr).strip()
        if done.returncode != 0 or "Perf Analyzer Version" not in out:
            raise PerfAnalyzerError(
                f"{self.path} --version failed (rc {done.returncode}): {out[-500:]}; "
                f"a missing libb64.so.0d or libcudart.so.12 shows here: {SETUP_HINT}"
            )
        return out.splitlines()[0]


def locate(tool_dir: Path | None = None) -> Binary:
    """The installed binary, or :class:`PerfAnalyzerError` saying how to install it."""
    env_dir = os.environ.get(TOOL_DIR_ENV)
    root = tool_dir if tool_dir is not None else Path(env_dir) if env_dir else DEFAULT_TOOL_DIR
    binary = Binary(path=root / "bin" / "perf_analyzer", lib_dir=root / "lib")
    if not os.access(binary.path, os.X_OK):
        raise PerfAnalyzerError(f"perf_analyzer not found at {binary.path}: {SETUP_HINT}")
    if not (binary.lib_dir / "libcudart.so.12").is_file():
        raise PerfAnalyzerError(f"{binary.lib_dir}/libcudart.so.12 is missing: {SETUP_HINT}")
    return binary


# --------------------------------------------------------------------------- one run


@dataclass(frozen=True)
class RunSpec:
    """One perf_analyzer invocation: one model, protocol, concurrency and batch size.

    ``input_data=None`` is perf_analyzer's ``random`` (one tensor, reused);
    a path is a JSON file from :func:`write_input_json`. ``window_ms``,
    ``stability_pct`` and ``max_trials`` bound the time_windows search: at
    least 3 windows, at most ``max_trials``; ``timeout_s`` bounds everything.
    """

    model: str
    url: str
    protocol: Protocol = "grpc"
    concurrency: int = 1
    batch_size: int = 1
    input_data: Path | None = None
    window_ms: int = 500
    stability_pct: float = 50.0
    max_trials: int = 10
    timeout_s: float = 60.0
    #: HTTP headers (``-H``); perf_analyzer ignores them over gRPC.
    headers: Mapping[str, str] = field(default_factory=dict)
    #: Request parameters (``--request-parameter name:value:string``), e.g. a sticky key.
    parameters: Mapping[str, str] = field(default_factory=dict)
    #: Write ``--profile-export-file`` and count the requests over ``stall_latency_us``.
    export_profile: bool = True
    stall_latency_us: float = STALL_LATENCY_US

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise PerfAnalyzerError(f"protocol {self.protocol!r}: use 'grpc' or 'http'")
        if self.concurrency < 1 or self.batch_size < 1:
            raise PerfAnalyzerError("concurrency and batch_size must be >= 1")
        if self.window_ms < 50 or self.max_trials < 3:
            raise PerfAnalyzerError(
                "window_ms >= 50 and max_trials >= 3 (a result needs 3 stable windows)"
            )
        if not 0 < self.stability_pct <= 100 or not self.timeout_s > 0:
            raise PerfAnalyzerError("stability_pct must be in (0, 100] and timeout_s > 0")
        if not self.stall_latency_us > 0:
            raise PerfAnalyzerError("stall_latency_us must be > 0")

    def args(self, csv_path: Path, export_path: Path | None = None) -> list[str]:
        """The command line after the binary, writing the CSV report to ``csv_path``.

        ``export_path``: where ``--profile-export-file`` goes (omitted when None).
        """
        out = [
            "-m",
            self.model,
            "-i",
            self.protocol,
            "-u",
            self.url,
            "-b",
            str(self.batch_size),
            "--concurrency-range",
            str(self.concurrency),
            "--measurement-mode",
            "time_windows",
            "--measurement-interval",
            str(self.window_ms),
            "--stability-percentage",
            f"{self.stability_pct:g}",
            "--max-trials",
            str(self.max_trials),
            "--input-data",
            "random" if self.input_data is None else str(self.input_data),
            "-f",
            str(csv_path),
            "--verbose-csv",
        ]
        if export_path is not None:
            out += ["--profile-export-file", str(export_path)]
        for key, value in self.parameters.items():
            out += ["--request-parameter", f"{key}:{value}:string"]
        if self.protocol == "http":
            out += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
            for key, value in self.headers.items():
                out += ["-H", f"{key}:{value}"]
        return out

    def label(self) -> str:
        data = "random" if self.input_data is None else "rows"
        return f"{self.protocol} c={self.concurrency} b={self.batch_size} {data}"


@dataclass(frozen=True)
class LatencyRow:
    """One row of perf_analyzer's ``--verbose-csv`` report (one concurrency level).

    Client percentiles are end-to-end per request; the ``server_*`` and
    ``compute_*`` columns are the server's averages, ``None`` when the CSV
    lacks the column (it depends on protocol and flags).
    """

    concurrency: int
    throughput_infer_s: float
    p50_us: float
    p90_us: float
    p95_us: float
    p99_us: float
    avg_us: float | None = None
    client_send_us: float | None = None
    network_us: float | None = None
    server_queue_us: float | None = None
    compute_input_us: float | None = None
    compute_infer_us: float | None = None
    compute_output_us: float | None = None
    server_cache_hit_us: float | None = None
    server_cache_miss_us: float | None = None
    client_recv_us: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_REQUIRED: Final = {
    "concurrency": "Concurrency",
    "throughput_infer_s": "Inferences/Second",
    "p50_us": "p50 latency",
    "p90_us": "p90 latency",
    "p95_us": "p95 latency",
    "p99_us": "p99 latency",
}
_OPTIONAL: Final = {
    "avg_us": "Avg latency",
    "client_send_us": "Client Send",
    "network_us": "Network+Server Send/Recv",
    "server_queue_us": "Server Queue",
    "compute_input_us": "Server Compute Input",
    "compute_infer_us": "Server Compute Infer",
    "compute_output_us": "Server Compute Output",
    "server_cache_hit_us": "Server Cache Hit",
    "server_cache_miss_us": "Server Cache Miss",
    "client_recv_us": "Client Recv",
}


def parse_csv(text: str) -> list[LatencyRow]:
    """Rows of a ``-f ... --verbose-csv`` report; PerfAnalyzerError if it is not one."""
    reader = csv.DictReader(io.StringIO(text))
    header = set(reader.fieldnames or ())
    missing = sorted(v for v in _REQUIRED.values() if v not in header)
    if missing:
        raise PerfAnalyzerError(
            f"not a perf_analyzer --verbose-csv report: columns {missing} missing "
            f"(has {sorted(header)})"
        )
    rows: list[LatencyRow] = []
    for n, raw in enumerate(reader, start=2):
        try:
            req = {k: float(raw[col]) for k, col in _REQUIRED.items()}
            opt = {k: _float_or_none(raw.get(col)) for k, col in _OPTIONAL.items()}
        except (TypeError, ValueError) as exc:
            raise PerfAnalyzerError(f"CSV line {n} has a non-numeric value: {exc}") from exc
        rows.append(
            LatencyRow(
                concurrency=int(req.pop("concurrency")),
                throughput_infer_s=req["throughput_infer_s"],
                p50_us=req["p50_us"],
                p90_us=req["p90_us"],
                p95_us=req["p95_us"],
                p99_us=req["p99_us"],
                **opt,
            )
        )
    return rows


def _float_or_none(v: str | None) -> float | None:
    if v is None or not v.strip():
        return None
    out = float(v)
    return out if math.isfinite(out) else None


@dataclass(frozen=True)
class ServerCounts:
    """Counters from the "Server:" block of perf_analyzer's stdout (last window set).

    ``inference_count / execution_count`` is the average batch the server ran
    (dynamic batching at work); cache hits/misses show whether a "miss" run
    really missed. ``None`` where stdout did not say.
    """

    inference_count: int | None = None
    execution_count: int | None = None
    cache_hits: int | None = None
    cache_misses: int | None = None
    success_count: int | None = None

    @property
    def avg_batch(self) -> float | None:
        if not self.inference_count or not self.execution_count:
            return None
        return self.inference_count / self.execution_count

    @property
    def hit_share(self) -> float | None:
        if self.cache_hits is None or self.cache_misses is None:
            return None
        total = self.cache_hits + self.cache_misses
        return self.cache_hits / total if total else None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["avg_batch"] = self.avg_batch
        out["hit_share"] = self.hit_share
        return out


_COUNTS: Final = {
    "inference_count": re.compile(r"^\s*Inference count:\s*(\d+)", re.M),
    "execution_count": re.compile(r"^\s*Execution count:\s*(\d+)", re.M),
    "cache_hits": re.compile(r"^\s*Cache hit count:\s*(\d+)", re.M),
    "cache_misses": re.compile(r"^\s*Cache miss count:\s*(\d+)", re.M),
    "success_count": re.compile(r"^\s*Successful request count:\s*(\d+)", re.M),
}


def parse_server_counts(stdout: str) -> ServerCounts:
    """The last reported value of each server counter in perf_analyzer's stdout."""
    values: dict[str, int | None] = {}
    for key, pattern in _COUNTS.items():
        found = pattern.findall(stdout)
        values[key] = int(found[-1]) if found else None
    return ServerCounts(**values)


@dataclass(frozen=True)
class RequestStats:
    """Every request of a run, from perf_analyzer's ``--profile-export-file``.

    ``requests`` counts the requests exported (every window, the unstable
    ones too; perf_analyzer's percentiles cover only the last stable ones);
    ``stalls`` those slower than ``stall_latency_us``, whose latencies (the
    slowest :data:`_STALLS_KEPT`) are in ``stall_latencies_us``;
    ``unanswered`` those with no response; ``span_s`` from the first send to
    the last response. Latencies are send to last response, microseconds.
    """

    requests: int
    stalls: int
    stall_latency_us: float
    max_latency_us: float | None
    unanswered: int = 0
    span_s: float = 0.0
    stall_latencies_us: tuple[float, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "stalls": self.stalls,
            "stall_latency_us": self.stall_latency_us,
            "max_latency_us": self.max_latency_us,
            "unanswered": self.unanswered,
            "span_s": round(self.span_s, 3),
            "stall_latencies_us": list(self.stall_latencies_us),
        }


def parse_profile_export(
    data: bytes | str, *, stall_latency_us: float = STALL_LATENCY_US
) -> RequestStats:
    """Count the stalls in a ``--profile-export-file`` (PerfAnalyzerError if it is not one).

    The 2.47 format: ``{"experiments": [{"experiment": {...}, "requests": [{"timestamp":
    ns, "response_timestamps": [ns, ...], ...}], "window_boundaries": [ns, ...]}],
    "version": ...}``, every experiment (concurrency level) of the run.
    """
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    try:
        doc = json.loads(text)
        experiments = doc["experiments"]
        requests = [r for e in experiments for r in e["requests"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise PerfAnalyzerError(f"not a perf_analyzer profile export: {exc}") from exc
    latencies: list[float] = []
    unanswered = 0
    first, last = math.inf, -math.inf
    for n, r in enumerate(requests):
        try:
            sent = int(r["timestamp"])
            answers = [int(t) for t in r.get("response_timestamps") or ()]
        except (KeyError, TypeError, ValueError) as exc:
            raise PerfAnalyzerError(f"profile export request {n} is malformed: {exc}") from exc
        first = min(first, sent)
        if not answers:
            unanswered += 1
            continue
        last = max(last, answers[-1])
        latencies.append((answers[-1] - sent) / 1000)
    stalls = sorted((x for x in latencies if x > stall_latency_us), reverse=True)
    return RequestStats(
        requests=len(requests),
        stalls=len(stalls),
        stall_latency_us=stall_latency_us,
        max_latency_us=max(latencies, default=None),
        unanswered=unanswered,
        span_s=(last - first) / 1e9 if latencies else 0.0,
        stall_latencies_us=tuple(stalls[:_STALLS_KEPT]),
    )


@dataclass(frozen=True)
class RunResult:
    """What one invocation gave: a row when ``status == "ok"``, else why not."""

    spec: RunSpec
    status: Status
    rc: int | None
    elapsed_s: float
    row: LatencyRow | None = None
    server: ServerCounts = field(default_factory=ServerCounts)
    message: str = ""
    command: tuple[str, ...] = ()
    #: The end of perf_analyzer's stdout+stderr, for a human reading a failure.
    output_tail: str = ""
    #: Every request's latency from the profile export; None when there is none
    #: (``export_profile`` off, or a failed run: perf_analyzer writes it only on success).
    requests: RequestStats | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok" and self.row is not None

    @property
    def queue_timeout(self) -> bool:
        """Whether Triton refused a request for waiting past a queue policy's timeout."""
        return QUEUE_TIMEOUT_MESSAGE in self.message

    @property
    def stalls(self) -> int:
        """Requests that stalled: slower than the threshold, or refused by a queue timeout.

        A refused request stops perf_analyzer's run (no export): it counts as one.
        """
        slow = self.requests.stalls if self.requests is not None else 0
        return slow + (1 if self.queue_timeout else 0)

    @property
    def max_latency_us(self) -> float | None:
        return None if self.requests is None else self.requests.max_latency_us

    def to_json(self) -> dict[str, Any]:
        s = self.spec
        return {
            "model": s.model,
            "protocol": s.protocol,
            "concurrency": s.concurrency,
            "batch_size": s.batch_size,
            "input_data": "random" if s.input_data is None else s.input_data.name,
            "status": self.status,
            "rc": self.rc,
            "elapsed_s": round(self.elapsed_s, 3),
            "row": None if self.row is None else self.row.to_json(),
            "server": self.server.to_json(),
            "message": self.message,
            "command": list(self.command),
            "output_tail": self.output_tail,
            "requests": None if self.requests is None else self.requests.to_json(),
            "stalls": self.stalls,
            "queue_timeout": self.queue_timeout,
        }


def run(
    binary: Binary,
    spec: RunSpec,
    *,
    csv_path: Path | None = None,
    export_path: Path | None = None,
) -> RunResult:
    """Run one measurement, bounded by ``spec.timeout_s``; never raises for a bad run.

    ``csv_path`` keeps the raw CSV, ``export_path`` the profile export (default:
    temporary files, removed; an export is MBs: ~150 bytes per request).
    """
    with _csv_target(csv_path) as target, _export_target(spec, export_path) as export:
        command = (str(binary.path), *spec.args(target, export))
        began = time.monotonic()
        try:
            proc = subprocess.Popen(
                command,
                env=binary.env(),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # its own group: a timeout kills every thread/child
            )
        except OSError as exc:
            return RunResult(spec, "failed", None, 0.0, message=f"could not start: {exc}")
        try:
            out, _ = proc.communicate(timeout=spec.timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            out, _ = proc.communicate()
            out = out or ""
            return RunResult(
                spec,
                "timeout",
                None,
                time.monotonic() - began,
                server=parse_server_counts(out),
                message=f"no result after {spec.timeout_s:.0f} s (killed); {explain(out)}",
                command=command,
                output_tail=_tail(out),
            )
        elapsed = time.monotonic() - began
        counts = parse_server_counts(out)

        def bad(status: Status, rc: int | None, message: str) -> RunResult:
            return RunResult(spec, status, rc, elapsed, None, counts, message, command, _tail(out))

        if proc.returncode != 0:
            unstable = "Failed to obtain stable measurement" in out
            status: Status = "unstable" if unstable else "failed"
            return bad(status, proc.returncode, explain(out))
        try:
            rows = parse_csv(target.read_text())
        except (OSError, PerfAnalyzerError) as exc:
            return bad("failed", 0, str(exc))
        if len(rows) != 1:
            return bad("failed", 0, f"expected one CSV row, got {len(rows)}")
        stats, note = None, ""
        if export is not None:
            try:
                stats = parse_profile_export(
                    export.read_bytes(), stall_latency_us=spec.stall_latency_us
                )
            except (OSError, PerfAnalyzerError) as exc:
                note = f"stall check unavailable: profile export unreadable: {exc}"
        return RunResult(spec, "ok", 0, elapsed, rows[0], counts, note, command, _tail(out), stats)


_THREAD_ERROR: Final = re.compile(r"Thread \[\d+\] had error: (.*)")
_ERROR_LINE: Final = re.compile(r"error|fail|unable|expired|refused|timed? ?out", re.I)


def explain(output: str) -> str:
    """The error lines of perf_analyzer's output, de-duplicated (one per distinct message).

    ``Thread [n] had error: X`` repeated for every worker becomes ``X (n threads)``.
    """
    threads: dict[str, int] = {}
    other: list[str] = []
    for raw in output.splitlines():
        line = raw.strip()
        if m := _THREAD_ERROR.search(line):
            threads[m.group(1).strip()] = threads.get(m.group(1).strip(), 0) + 1
        elif line and _ERROR_LINE.search(line) and line not in other:
            other.append(line)
    parts = other[:6] + [f"{msg} ({n} thread{'s' if n > 1 else ''})" for msg, n in threads.items()]
    return "; ".join(parts) if parts else _tail(output)[-300:]


@contextlib.contextmanager
def _csv_target(path: Path | None) -> Iterator[Path]:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)  # a stale CSV must not pass for this run's
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="setsuna-pa-") as tmp:
        yield Path(tmp) / "report.csv"


@contextlib.contextmanager
def _export_target(spec: RunSpec, path: Path | None) -> Iterator[Path | None]:
    if not spec.export_profile:
        yield None
        return
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="setsuna-pa-export-") as tmp:
        yield Path(tmp) / "profile.json"


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _tail(text: str) -> str:
    text = text.strip()
    return text if len(text) <= _TAIL_CHARS else "..." + text[-_TAIL_CHARS:]


# --------------------------------------------------------------------------- input data


def write_input_json(
    rows: npt.NDArray[np.float32],
    path: Path,
    *,
    input_name: str,
    limit: int | None = None,
    strings: Mapping[str, Sequence[str]] | None = None,
) -> Path:
    """Write rows as perf_analyzer ``--input-data`` JSON: one batch-1 entry per row.

    Each entry is the row flattened (a fixed-shape input takes a flat list);
    9 significant digits round-trip float32 exactly, and a whole value keeps its
    decimal point (perf_analyzer refuses ``4242`` for FP32). perf_analyzer cycles
    through the entries, and a ``-b N`` request takes N consecutive ones.
    ``strings`` adds BYTES inputs of shape [1], one value per row (a sticky key).
    """
    x = np.ascontiguousarray(rows, dtype=np.float32)
    if limit is not None:
        x = x[:limit]
    if x.ndim < 2 or len(x) == 0:
        raise PerfAnalyzerError(f"need a batch of rows [n, ...], got shape {list(x.shape)}")
    if not np.isfinite(x).all():
        raise PerfAnalyzerError("input rows contain NaN/inf: the models refuse them")
    flat = x.reshape(len(x), -1)
    extra = dict(strings or {})
    short = [k for k, v in extra.items() if len(v) < len(flat)]
    if short:
        raise PerfAnalyzerError(
            f"string inputs {short} have fewer values than the {len(flat)} rows"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    name = json.dumps(input_name)
    with path.open("w") as f:
        f.write('{"data": [\n')
        for i, row in enumerate(flat):
            values = ",".join(_json_float(v) for v in row.tolist())
            more = "".join(f", {json.dumps(k)}: [{json.dumps(v[i])}]" for k, v in extra.items())
            f.write(f"{',' if i else ''}{{{name}: [{values}]{more}}}\n")
        f.write("]}\n")
    return path


def _json_float(v: float) -> str:
    """``v`` as a JSON number perf_analyzer reads as FP32: ``4242.0``, never ``4242``.

    perf_analyzer refuses an integer-looking number for an FP32 input ("unable to
    find float data in json"), so a whole value keeps its decimal point.
    """
    text = f"{v:.9g}"
    return text if any(ch in text for ch in ".e") else text + ".0"


def summarize(results: Sequence[RunResult]) -> str:
    """One line per run, for logs."""
    lines = []
    for r in results:
        if r.ok and r.row is not None:
            lines.append(
                f"{r.spec.label():<28} {r.row.throughput_infer_s:>10.0f} infer/s  "
                f"p50 {r.row.p50_us / 1000:.2f} ms  p99 {r.row.p99_us / 1000:.2f} ms"
                + _stall_text(r)
            )
        else:
            lines.append(f"{r.spec.label():<28} {r.status}: {r.message[-200:]}")
    return "\n".join(lines)


def _stall_text(r: RunResult) -> str:
    q = r.requests
    if q is None:
        return "  (no export: stalls not checked)" if r.spec.export_profile else ""
    top = "-" if q.max_latency_us is None else f"{q.max_latency_us / 1000:.1f}"
    text = f"  max {top} ms in {q.requests:,} req"
    if q.stalls:
        text += f"  STALLS {q.stalls} (> {q.stall_latency_us / 1000:g} ms)"
    return text
