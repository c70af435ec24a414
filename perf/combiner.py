"""The combiner beside its slowest member, from one server and interleaved runs.

    .venv/bin/python -m perf.combiner [--model-repository model_repository/local] [--rounds 3]

Builds a repository in ``.cache/perf/combiner/`` from the built members of
the example combiner (``<repo>/combiner/members.json``: lightgbm, xgboost,
mlp, their tuned configs copied as built) and writes the ``combiner`` over
them as ``python -m ensembles`` does (``COMBINER_SERVING``: one instance,
dynamic batching, no queue policy; the members' engines in its process);
``--bls`` adds ``combiner_bls``, the same model calling its members through
BLS (as it shipped before), and ``--unbatched`` ``combiner_unbatched``, that
one with batching off too. Then perf_analyzer (gRPC, distinct held-out rows, one row per
request) drives every member and combiner at concurrency 1 and 32,
``--rounds`` times, interleaved (round 1: each model at c=1, then each at
c=32; round 2: ...), so that load from elsewhere on the host falls on all of
them alike. Every request's latency is checked for stalls (> 400 ms,
:mod:`build_engines.tuning.perf_analyzer`).

``--floor`` adds the smallest setups that bound what any BLS combiner can
reach: ``python_floor``, a Python model that answers 0.5 per row (the stub
hop alone), and ``bls_floor``, one that makes ONE synchronous BLS call to
the first member on the stub's own thread and returns its score (one BLS
round trip, nothing else: no thread, no timeout, no combination).

Per round, the *slowest member* is the member with the highest c=1 p50 (for
the latency ratios) and the one with the lowest c=32 throughput (for the
share); the table prints each round's ratios and their range. Targets
(issue 11): combiner c=1 p50 <= 2x the slowest member's, and c=32 > 50 % of
its throughput. Writes ``.cache/perf/combiner.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.inputs import input_rows
from ensembles import members as mem
from ensembles import repository as rep
from ensembles.__main__ import COMBINER_IN_PROCESS, COMBINER_SERVING
from setsuna import manifest, seal
from setsuna.errors import ConfigError, SetsunaError
from setsuna.server import LocalTriton

OUT: Final = Path(".cache/perf/combiner")
COMBINER: Final = "combiner"
UNBATCHED: Final = "combiner_unbatched"
BLS: Final = "combiner_bls"
FLOORS: Final = ("python_floor", "bls_floor")
FLOOR_CONFIG: Final = """\
name: "NAME"
backend: "python"
max_batch_size: 1024
input [ { name: "features" data_type: TYPE_FP32 dims: [ N_FEATURES ] } ]
output [ { name: "score" data_type: TYPE_FP32 dims: [ 1 ] } ]
instance_group [ { kind: KIND_CPU count: 1 } ]
parameters { key: "member" value { string_value: "MEMBER" } }
"""
FLOOR_PY: Final = """\
import json

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.member = json.loads(args["model_config"])["parameters"]["member"]["string_value"]

    def execute(self, requests):
        out = []
        for r in requests:
            x = pb_utils.get_input_tensor_by_name(r, "features").as_numpy()
            if BLS:
                call = pb_utils.InferenceRequest(
                    model_name=self.member,
                    requested_output_names=["score"],
                    inputs=[pb_utils.Tensor("features", x)],
                )
                answer = call.exec()
                if answer.has_error():
                    raise pb_utils.TritonModelException(answer.error().message())
                y = pb_utils.get_output_tensor_by_name(answer, "score").as_numpy()
            else:
                y = np.full((len(x), 1), 0.5, dtype=np.float32)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor("score", y)]))
        return out
"""
ROWS: Final = 4096
CONCURRENCY: Final = (1, 32)
TARGET_C1_RATIO: Final = 2.0
TARGET_C32_SHARE: Final = 0.50


def build(
    source: Path, out: Path, *, unbatched: bool, floor: bool, bls: bool = False
) -> tuple[Path, tuple[str, ...]]:
    """The benchmark repository and the members' names, in member order."""
    members_file = source / COMBINER / rep.MEMBERS_FILE
    spec = mem.load(members_file)
    names = tuple(dict.fromkeys(t.model for t in spec.targets))
    repo = out / "repository"
    if repo.exists():
        shutil.rmtree(repo)
    repo.mkdir(parents=True)
    for name in names:
        shutil.copytree(source / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    n = manifest.read(repo / names[0] / "1").schema.row_shape[0]
    rep.write_combiner(
        repo, members_file, n, serving=COMBINER_SERVING, in_process=COMBINER_IN_PROCESS
    )
    if bls:
        rep.write_combiner(repo, members_file, n, name=BLS, serving=COMBINER_SERVING)
    if unbatched:
        off = rep.Serving(instances=1, dynamic_batching=False)
        rep.write_combiner(repo, members_file, n, name=UNBATCHED, serving=off)
    if floor:
        for name in FLOORS:
            (repo / name / "1").mkdir(parents=True)
            config = FLOOR_CONFIG.replace("NAME", name).replace("N_FEATURES", str(n))
            (repo / name / "config.pbtxt").write_text(config.replace("MEMBER", names[0]))
            code = FLOOR_PY.replace("BLS", str(name == "bls_floor"))
            (repo / name / "1" / "model.py").write_text(code)
            seal.seal_model(repo / name)  # the stub guard loads only sealed folders
    return repo, names


@dataclass(frozen=True)
class Figures:
    p50_ms: float
    p99_ms: float
    infer_s: float
    requests: int
    stalls: int


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m perf.combiner", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--window-ms", type=int, default=1000)
    p.add_argument("--bls", action="store_true", help="also the combiner calling members by BLS")
    p.add_argument("--unbatched", action="store_true", help="also the BLS one with batching off")
    p.add_argument("--floor", action="store_true", help="also python_floor and bls_floor")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    try:
        if args.rounds < 1:
            raise ConfigError("--rounds: give 1 or more")
        return _main(args)
    except SetsunaError as exc:
        print(f"perf/combiner.py: {exc}", file=sys.stderr)
        return 2


def _main(args: argparse.Namespace) -> int:
    binary = pa.locate()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    repo, names = build(
        args.model_repository, out, unbatched=args.unbatched, floor=args.floor, bls=args.bls
    )
    combiners: tuple[str, ...] = (COMBINER,)
    combiners += (BLS,) if args.bls else ()
    combiners += (UNBATCHED,) if args.unbatched else ()
    if args.floor:
        combiners += FLOORS
    rows, _ = input_rows(manifest.read(repo / names[0] / "1").schema, ROWS)
    data = pa.write_input_json(rows, out / "rows.json", input_name="features")
    load_before = os.getloadavg()
    rounds: list[dict[str, dict[int, Figures]]] = []
    with LocalTriton.on_free_ports(repo, log_path=out / "triton.log") as server:
        for k in range(args.rounds):
            got: dict[str, dict[int, Figures]] = {}
            for c in CONCURRENCY:
                for model in (*names, *combiners):
                    r = _measure(binary, server.grpc_url, model, c, data, args.window_ms)
                    print(f"  round {k + 1} {model:18} {pa.summarize([r])}", flush=True)
                    if r.ok and r.row is not None:
                        got.setdefault(model, {})[c] = Figures(
                            r.row.p50_us / 1e3,
                            r.row.p99_us / 1e3,
                            r.row.throughput_infer_s,
                            r.requests.requests if r.requests is not None else 0,
                            r.stalls,
                        )
            rounds.append(got)
    load_after = os.getloadavg()
    report = _report(rounds, names, combiners)
    report["load_1min"] = {"before": load_before[0], "after": load_after[0]}
    print(report["table"])
    print(f"host load (1 min) {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for line in report["checks"]:
        print(line)
    (out.parent / "combiner.json").write_text(json.dumps(report, indent=2))
    return 0


def _measure(
    binary: pa.Binary, url: str, model: str, c: int, data: Path, window_ms: int
) -> pa.RunResult:
    spec = pa.RunSpec(
        model, url, protocol="grpc", concurrency=c, input_data=data, window_ms=window_ms,
        timeout_s=180,
    )  # fmt: skip
    r = pa.run(binary, spec)
    if not r.ok:  # one retry with longer windows, as the sweep does
        r = pa.run(binary, pa.RunSpec(**{**spec.__dict__, "window_ms": 2 * window_ms}))
    return r


def _span(values: list[float], fmt: str) -> str:
    if not values:
        return "failed"
    lo, hi = min(values), max(values)
    return format(lo, fmt) if lo == hi else f"{format(lo, fmt)}-{format(hi, fmt)}"


def _report(
    rounds: list[dict[str, dict[int, Figures]]],
    names: tuple[str, ...],
    combiners: tuple[str, ...],
) -> dict[str, Any]:
    lines = [
        "| model | c=1 p50 ms | c=1 p99 ms | c=32 infer/s | stalls / requests |",
        "|---|---|---|---|---|",
    ]
    for model in (*names, *combiners):
        one = [r[model][1] for r in rounds if 1 in r.get(model, {})]
        many = [r[model][32] for r in rounds if 32 in r.get(model, {})]
        runs = one + many
        lines.append(
            f"| {model} | {_span([f.p50_ms for f in one], '.2f')} | "
            f"{_span([f.p99_ms for f in one], '.2f')} | "
            f"{_span([f.infer_s for f in many], ',.0f')} | "
            f"{sum(f.stalls for f in runs)} / {sum(f.requests for f in runs):,} |"
        )
    ratios = {c: [_ratios(r, names, c) for r in rounds] for c in combiners}
    lines += [
        "",
        "| combiner | round | c=1 slowest member | p50 / p99 vs it | c=32 slowest | share |",
        "|---|---|---|---|---|---|",
    ]
    for c, per_round in ratios.items():
        for k, d in enumerate(per_round, start=1):
            c1 = "-"
            if "c1_p50_ratio" in d:
                c1 = f"{d['c1_p50_ratio']:.2f}x / {d['c1_p99_ratio']:.2f}x"
            c32 = f"{d['c32_share']:.0%}" if "c32_share" in d else "-"
            lines.append(
                f"| {c} | {k} | {d.get('c1_slowest', '-')} | {c1} | "
                f"{d.get('c32_slowest', '-')} | {c32} |"
            )
    checks = []
    for c, per_round in ratios.items():
        if c in FLOORS:  # not a combiner: the bound below any
            continue
        p50 = [d["c1_p50_ratio"] for d in per_round if "c1_p50_ratio" in d]
        p99 = [d["c1_p99_ratio"] for d in per_round if "c1_p99_ratio" in d]
        share = [d["c32_share"] for d in per_round if "c32_share" in d]
        if p50:
            ok = max(p50) <= TARGET_C1_RATIO
            checks.append(
                f"{'PASS' if ok else 'MISS'}  {c} c=1 p50 <= {TARGET_C1_RATIO:g}x its slowest "
                f"member: {_span(p50, '.2f')}x over {len(p50)} rounds (p99 {_span(p99, '.2f')}x)"
            )
        if share:
            ok = min(share) > TARGET_C32_SHARE
            checks.append(
                f"{'PASS' if ok else 'MISS'}  {c} c=32 > {TARGET_C32_SHARE:.0%} of its slowest "
                f"member's throughput: {_span([v * 100 for v in share], '.0f')} % over "
                f"{len(share)} rounds"
            )
    figures = {
        k: {m: {str(c): f.__dict__ for c, f in v.items()} for m, v in r.items()}
        for k, r in enumerate(rounds, start=1)
    }
    return {"rounds": figures, "ratios": ratios, "table": "\n".join(lines), "checks": checks}


def _ratios(r: dict[str, dict[int, Figures]], names: tuple[str, ...], model: str) -> dict[str, Any]:
    """One round: ``model`` against the slowest member at c=1 (p50) and at c=32 (infer/s)."""
    d: dict[str, Any] = {}
    comb = r.get(model, {})
    ones = {m: r[m][1] for m in names if 1 in r.get(m, {})}
    manys = {m: r[m][32] for m in names if 32 in r.get(m, {})}
    if 1 in comb and len(ones) == len(names):
        slow = max(ones, key=lambda m: ones[m].p50_ms)
        d.update(
            c1_slowest=slow,
            c1_p50_ratio=comb[1].p50_ms / ones[slow].p50_ms,
            c1_p99_ratio=comb[1].p99_ms / ones[slow].p99_ms,
        )
    if 32 in comb and len(manys) == len(names):
        slow = min(manys, key=lambda m: manys[m].infer_s)
        d.update(c32_slowest=slow, c32_share=comb[32].infer_s / manys[slow].infer_s)
    return d


if __name__ == "__main__":
    raise SystemExit(main())
