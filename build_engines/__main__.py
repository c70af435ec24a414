"""``python -m build_engines``: build, gate and publish models into a Triton repository.

With no model given it trains and builds the four examples. With ``--model``
it builds the user's file, judged on ``--valid-rows`` (a float32 ``.npy``).
Exit status: 0 when every model published for every target, 1 when a gate
rejected everything for some model, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from build_engines.base import F32, TARGETS, Source, Target
from build_engines.build import build_model
from build_engines.gate import GateSettings
from build_engines.spec import ModelSpec, ServingSpec
from build_engines.tuning.tuned import TUNED_PATH, load_tuned
from setsuna.errors import ConfigError, GateError, SetsunaError

_Loader = Callable[[], tuple[Source, F32]]


def _parser() -> argparse.ArgumentParser:
    from build_engines.examples.catalog import EXAMPLES

    p = argparse.ArgumentParser(prog="python -m build_engines", description=__doc__)
    p.add_argument("--target", choices=(*TARGETS, "all"), default="all")
    p.add_argument(
        "--out",
        type=Path,
        default=Path("model_repository"),
        help="repository root; each target is written to <out>/<target>/",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        default=Path(".cache/build"),
        help="staging folder for candidates and reports",
    )
    p.add_argument(
        "--examples",
        default=",".join(EXAMPLES),
        help=f"comma-separated examples to build (of {', '.join(EXAMPLES)})",
    )
    p.add_argument(
        "--small",
        action="store_true",
        help="smaller tree ensembles (fast compile) for tests and quick demos",
    )
    p.add_argument("--model", type=Path, help="build this model file instead of the examples")
    p.add_argument("--name", help="model name for --model (lowercase, digits, _)")
    p.add_argument("--valid-rows", type=Path, help="held-out rows for --model, float32 .npy")
    p.add_argument(
        "--allow-pickle",
        action="store_true",
        help="allow a pickle/joblib source file (it runs code when loaded)",
    )
    p.add_argument(
        "--allow-nan",
        action="store_true",
        help="the model accepts NaN features (default: NaN is rejected)",
    )
    p.add_argument("--min-identical-decisions", type=float, default=0.999)
    p.add_argument("--profile", choices=("latency", "throughput"), default="latency")
    p.add_argument(
        "--tuned",
        type=Path,
        default=TUNED_PATH,
        help="serving settings chosen by `make perf` (defaults when missing)",
    )
    p.add_argument("--no-tuned", action="store_true", help="ignore --tuned: default settings")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    targets: tuple[Target, ...] = TARGETS if args.target == "all" else (args.target,)
    failed: list[str] = []
    try:
        gate_settings = GateSettings(min_identical_decisions=args.min_identical_decisions)
        tuned = {} if args.no_tuned else load_tuned(args.tuned)
        jobs = _jobs(args)
        for name, load in jobs:
            serving = tuned.get(name, ServingSpec())
            spec = ModelSpec(name=name, profile=args.profile, gate=gate_settings, serving=serving)
            source, x_valid = load()
            try:
                result = build_model(source, x_valid, spec, args.out, targets, args.workdir)
            except GateError as exc:
                print(f"error: {exc}", file=sys.stderr)
                failed.append(name)
                continue
            for target, folder in result.published.items():
                print(f"published {name} -> {folder} ({target})")
    except SetsunaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 1 if failed else 0


def _jobs(args: argparse.Namespace) -> list[tuple[str, _Loader]]:
    if args.model is not None:
        if not args.name or args.valid_rows is None:
            raise ConfigError("--model needs --name and --valid-rows (held-out float32 .npy)")
        from build_engines.sources import from_path, load_rows

        def load_user() -> tuple[Source, F32]:
            src = from_path(
                args.model, name=args.name, allow_pickle=args.allow_pickle, allow_nan=args.allow_nan
            )
            return src, load_rows(args.valid_rows)

        return [(args.name, load_user)]
    from build_engines.examples.catalog import EXAMPLES, train

    names = [n.strip() for n in args.examples.split(",") if n.strip()]
    unknown = sorted(set(names) - set(EXAMPLES))
    if unknown:
        raise ConfigError(f"unknown examples {unknown}; choose from {', '.join(EXAMPLES)}")

    def loader(n: str) -> _Loader:
        def load() -> tuple[Source, F32]:
            ex = train(n, small=args.small)
            return ex.source, ex.x_valid

        return load

    return [(n, loader(n)) for n in names]


if __name__ == "__main__":
    sys.exit(main())
