"""A morning's deployment under live traffic: what each lifecycle step costs the desk.

    .venv/bin/python -m perf.lifecycle [--model-repository model_repository/local]

Copies the built example repository to ``.cache/perf/lifecycle/`` and serves
it (every model, as ``make serve`` does). Eight threads send ``decide`` one
keyed row each, back to back (gRPC, c=8), for the whole run. Meanwhile the
lifecycle publishes a new version of ``lightgbm`` (a copy of version 1's
build: same engine bytes, so the comparison shows agreement, and the timings
are those of a real native-backend load), shadows it, compares, canaries it
at 10 %, promotes it and rolls the promote back, with ``--settle-s`` of
traffic between steps.

Printed: p50/p99 of the ``decide`` calls in each window beside the window
before any step (as ratios), the failures (the target is none), answers
naming a version the server no longer held (none), and each step's own
figures (pre-flight, load, switch: until every instance took the file,
drain, rollback). Writes ``.cache/perf/lifecycle.json``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from ensembles import lifecycle
from setsuna import manifest
from setsuna.errors import SetsunaError
from setsuna.server import LocalTriton

OUT: Final = Path(".cache/perf/lifecycle")
MODEL: Final = "lightgbm"
THREADS: Final = 8


class Traffic:
    """``THREADS`` threads calling ``decide`` with one keyed row each until stopped."""

    def __init__(self, url: str, rows: npt.NDArray[np.float32]) -> None:
        self.url, self.rows = url, rows
        self.answers: list[tuple[float, float, str]] = []
        self.failures: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,)) for i in range(THREADS)]

    def __enter__(self) -> Traffic:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)

    def _run(self, seed: int) -> None:
        import tritonclient.grpc as grpc

        rng = np.random.default_rng(seed)
        n = self.rows.shape[1]
        with grpc.InferenceServerClient(self.url) as client:
            want = [grpc.InferRequestedOutput(o) for o in ("model", "signal")]
            while not self._stop.is_set():
                i = int(rng.integers(len(self.rows)))
                f = grpc.InferInput("features", [1, n], "FP32")
                f.set_data_from_numpy(self.rows[i : i + 1])
                k = grpc.InferInput("key", [1, 1], "BYTES")
                k.set_data_from_numpy(np.array([[f"SYM{i % 500}".encode()]], dtype=object))
                sent = time.monotonic()
                try:
                    out = client.infer("decide", [f, k], outputs=want, client_timeout=30)
                except Exception as exc:
                    self.failures.append((sent, str(exc)[:200]))
                    continue
                label = out.as_numpy("model")[0, 0].decode()
                self.answers.append((sent, time.monotonic(), label))

    def window(self, since: float, until: float) -> dict[str, float]:
        lat = np.array([(g - s) * 1e3 for s, g, _ in self.answers if since <= s < until])
        if not len(lat):
            return {"calls": 0, "p50_ms": float("nan"), "p99_ms": float("nan")}
        return {
            "calls": len(lat),
            "p50_ms": float(np.percentile(lat, 50)),
            "p99_ms": float(np.percentile(lat, 99)),
        }


def prepare(source: Path) -> tuple[Path, Path]:
    """The served copy of the repository and a build of ``MODEL`` to publish."""
    if not (source / MODEL / "1" / "manifest.json").is_file():
        raise SystemExit(f"{source} has no built {MODEL}: run `make build-engines` first")
    if OUT.exists():
        shutil.rmtree(OUT)
    repo, build = OUT / "repository", OUT / "build"
    shutil.copytree(source, repo, symlinks=True, ignore=shutil.ignore_patterns(".*"))
    (build / MODEL).mkdir(parents=True)
    shutil.copy2(source / MODEL / "config.pbtxt", build / MODEL / "config.pbtxt")
    shutil.copytree(source / MODEL / "1", build / MODEL / "1", symlinks=True)
    return repo, build


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.lifecycle", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--settle-s", type=float, default=8.0, help="traffic between steps")
    args = p.parse_args(argv)
    repo, build = prepare(args.model_repository)
    n = manifest.read(repo / MODEL / "1").schema.row_shape[0]
    rows = np.random.default_rng(7).normal(size=(4096, n)).astype(np.float32)
    marks: dict[str, tuple[float, float]] = {}
    steps: dict[str, Any] = {}
    with LocalTriton.on_free_ports(repo, log_path=OUT / "triton.log") as server:
        life = lifecycle.Lifecycle(
            repo,
            server.grpc_url,
            server.grpc_admin_headers,
            metrics_url=server.metrics_url,
            audit_db=OUT / "deployments.db",
        )
        with Traffic(server.grpc_url, rows) as traffic:
            time.sleep(args.settle_s)  # the window before: traffic only

            def step(name: str, fn: Any) -> Any:
                began = time.monotonic()
                try:
                    out = fn()
                except SetsunaError as exc:
                    print(f"{name}: {exc}", file=sys.stderr)
                    raise
                marks[name] = (began, time.monotonic())
                if hasattr(out, "figures"):
                    steps[name] = {"detail": out.detail, **out.figures}
                time.sleep(args.settle_s)
                return out

            t_start = time.monotonic()
            step("publish", lambda: life.publish(MODEL, build))
            step("shadow", lambda: life.shadow(MODEL))
            found = step("compare", lambda: life.compare(MODEL))
            steps["compare"] = [c.to_json() for c in found]
            step("canary 10 %", lambda: life.canary(MODEL, 10))
            promoted = step("promote", lambda: life.promote(MODEL))
            step("rollback", life.rollback)
            t_end = time.monotonic()
    retired = set(promoted.figures.get("retired", []))
    after_promote = [
        label
        for s, _, label in traffic.answers
        if marks["promote"][1] <= s < marks["rollback"][0]
        and label in {f"{MODEL}:{v}" for v in retired}
    ]
    before = traffic.window(0, t_start)
    print(f"decide, c={THREADS}, one keyed row per call (gRPC), {len(traffic.answers)} calls")
    print(f"{'window':<22}{'calls':>8}{'p50 ms':>9}{'p99 ms':>9}{'p99 / before':>14}")
    windows = {"before any step": (0.0, t_start), **marks, "whole run": (t_start, t_end)}
    table = {}
    for name, (a, b) in windows.items():
        w = traffic.window(a, b)
        table[name] = w
        ratio = w["p99_ms"] / before["p99_ms"]
        print(f"{name:<22}{w['calls']:>8}{w['p50_ms']:>9.2f}{w['p99_ms']:>9.2f}{ratio:>13.2f}x")
    print(
        f"failed calls: {len(traffic.failures)}; "
        f"answers from an unloaded version: {len(after_promote)}"
    )
    for name, figures in steps.items():
        if isinstance(figures, dict):
            print(f"- {name}: {figures['detail']}")
        else:
            for c in figures:
                print(
                    f"- compare: {c['shadow']} vs {c['primary']}: {c['rows']} rows, identical "
                    f"signals {c['identical_signals']:.4%}, max |d| {c['max_abs_diff']:.3g}, "
                    f"batch latency p50 {c['primary_p50_us']:.0f} us vs shadow "
                    f"{c['shadow_p50_us']:.0f} us"
                )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT.parent / "lifecycle.json").write_text(
        json.dumps(
            {
                "windows": table,
                "steps": steps,
                "failures": traffic.failures[:20],
                "failed_calls": len(traffic.failures),
                "answers_from_unloaded": len(after_promote),
            },
            indent=2,
        )
    )
    return 0 if not traffic.failures and not after_promote else 1


if __name__ == "__main__":
    raise SystemExit(main())
