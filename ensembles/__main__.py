"""``python -m ensembles``: lay the example ensembles out over the built engines.

Run after ``python -m build_engines`` (``make build-engines`` runs both). Over
the example models of ``<repo>`` (lightgbm, xgboost, mlp: same 48 features,
same task) it writes:

- ``router``: A/B experiment ``trees-ab`` (lightgbm:1 vs xgboost:1, 50/50,
  sticky by key) with mlp:1 as the shadow, arms called through BLS;
- ``signal`` and the ``decision`` ensemble (router -> signal);
- ``decide``: the same experiment, arms in process, the signal applied: one hop;
- ``combiner``: the mean of lightgbm, xgboost and mlp, their engines in process;
- ``selector`` over lightgbm:1 and xgboost:1 with a 2 ms p99 budget, and
  ``feedback`` recording outcomes for it (SQLite beside the feedback model, or
  PostgreSQL shared by replicas with ``--outcomes-db postgresql://...``);
- ``decide_direction`` when the 3-class example ``eurusd_direction`` is built:
  one arm (``eurusd_direction:1``) in process and the direction rule
  (:class:`ensembles.signal.ClassThresholds`, :data:`DIRECTION_THRESHOLDS`),
  answering ``score`` [3] (down, flat, up), ``signal`` and ``confidence``.

``--target container`` writes the same models with the shadow logs and the
outcomes DB under ``--state-dir`` (default ``/var/lib/setsuna``, a writable
volume in deploy/container), for a repository mounted read-only at
``/models``; it refuses engines on Triton's own backends (``fil``).

The example selector chooses between two sources of one task because the
examples publish one engine per source; it is built for variants of one
source (fp32 ONNX, INT8, compiled trees), and the tests use it that way.
Experiment, member and selector files sit in the model folders: edit them
there and the running models pick the change up.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from ensembles import lifecycle, signal, statedb
from ensembles import repository as rep
from setsuna import manifest, runtime
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import ConfigError, SetsunaError

ARMS = ("lightgbm", "xgboost")
SHADOW = "mlp"
#: The combiner batches: one execute, one engine call per member for every queued
#: request (perf/combiner.py: 11-15 % of its slowest member's throughput at c=32
#: without). No queue policy: one turns off 2.51's prefetching and with it brings
#: the ~500 ms stalls back (docs/architecture.md, Measuring).
COMBINER_SERVING = rep.Serving(instances=1, dynamic_batching=True)
#: Its members run in its own process: three BLS round trips at c=1 cost 2.9-4.8x
#: the slowest member (one alone 1.3-2.0x); in process, an engine call each.
COMBINER_IN_PROCESS = True
#: ``decide`` (features to a decision in one hop) keeps ONE instance: with two, c=32
#: gains (59-70 % of the direct call's throughput instead of 40-56 %) but c=1 loses
#: (p50 1.5-1.7x the direct call's instead of 1.0-1.3x): at c=1 the batcher hands
#: the instances requests in turn and each runs cold (one row's execute 440-475 us
#: in the stub instead of 270-325 us). See docs/architecture.md, "What a hop costs".
DECIDE_SERVING = rep.Serving(instances=1)
#: The 3-class example (build_engines.examples.market) and the decide serving it.
DIRECTION_MODEL = "eurusd_direction"
DIRECTION_DECIDE = "decide_direction"
#: BUY when p_up beats both others by 0.05 and is at least 0.40 (SELL mirrors it).
DIRECTION_THRESHOLDS = signal.ClassThresholds(margin=0.05, min_prob=0.40)
#: Where the container target keeps its run-time state (shadow logs, outcomes DB):
#: a writable volume (docker-compose.yml's ``setsuna-state``), because ``/models``
#: is mounted read-only there. deploy/container/Dockerfile creates it.
CONTAINER_STATE_DIR = Path("/var/lib/setsuna")


def shadow_log(repo: Path, router: str) -> Path:
    """Where a router of the examples logs its shadow, relative to its model folder.

    In the repository's state folder (:func:`ensembles.lifecycle.state_dir`):
    outside the model folder, which a republish replaces whole, and outside
    the repository, whose every folder Triton lists as a model.
    ``setsuna models compare`` reads it from the router's config.
    """
    return Path("..") / ".." / lifecycle.state_dir(repo).name / "shadow" / f"{router}.jsonl"


def _prior(repo: Path, model: str) -> float:
    """The gate's identical-decision share: how faithful the served engine is to its source."""
    figures = manifest.read(repo / model / "1").gate.get("figures", {})
    share = figures.get("identical_decisions")
    return float(share) if isinstance(share, int | float) else 0.99


def check_settings(*, state_dir: Path | None = None, outcomes_db: str | None = None) -> None:
    """The settings' own checks, before any model is written (``--check-only``)."""
    if state_dir is not None and not state_dir.is_absolute():
        raise ConfigError(f"state_dir {state_dir}: give an absolute path")
    if outcomes_db is not None:
        if not statedb.is_url(outcomes_db):
            raise ConfigError(f"outcomes_db {outcomes_db!r}: give a postgresql:// URL")
        rep.outcomes_parameter(outcomes_db)


def write_examples(
    repo: Path, *, state_dir: Path | None = None, outcomes_db: str | None = None
) -> list[Path]:
    """Write the example ensembles over ``repo``'s engines.

    ``state_dir``: absolute folder for the shadow logs and the outcomes DB (the
    container target's :data:`CONTAINER_STATE_DIR`); by default they are
    relative to the model folders, as the local target has them. ``outcomes_db``:
    a ``postgresql://`` URL (no password) for the outcomes instead, shared by
    replicas (:mod:`ensembles.statedb`).
    """
    check_settings(state_dir=state_dir, outcomes_db=outcomes_db)

    def log(router: str) -> Path:
        if state_dir is None:
            return shadow_log(repo, router)
        return state_dir / "shadow" / f"{router}.jsonl"

    missing = [m for m in (*ARMS, SHADOW) if not (repo / m / "1" / "manifest.json").is_file()]
    if missing:
        raise ConfigError(
            f"{repo} lacks the example engines {missing}: run `make build-engines` first"
        )
    if state_dir is not None:
        _require_setsuna_engines(repo, (*ARMS, SHADOW))
    n = manifest.read(repo / ARMS[0] / "1").schema.row_shape[0]
    experiment = ExperimentDoc.single(
        "trees-ab",
        {"control": Target(ARMS[0], 1), "treatment": Target(ARMS[1], 1)},
        {"control": 0.5, "treatment": 0.5},
        salt="trees-ab-v1",
        shadow=Target(SHADOW, 1),
    )
    members = {
        "format": 1,
        "method": "mean",
        "members": [{"model": m, "version": 1, "weight": 1.0} for m in (*ARMS, SHADOW)],
    }
    selector = {
        "format": 1,
        "family": "trees",
        "budget_p99_ms": 2.0,
        "variants": [{"model": m, "version": 1, "prior_accuracy": _prior(repo, m)} for m in ARMS],
    }
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        files = Path(tmp)
        (files / "exp.json").write_text(experiment.dumps())
        for name, doc in (("members", members), ("selector", selector)):
            (files / f"{name}.json").write_text(json.dumps(doc, indent=2))
        one = rep.Serving(instances=1)
        out.append(
            rep.write_router(repo, files / "exp.json", n, serving=one, shadow_log=log("router"))
        )
        out.append(rep.write_signal(repo, {1: signal.Thresholds()}, serving=one))
        out.append(rep.write_decision(repo, n))
        out.append(
            rep.write_router(
                repo,
                files / "exp.json",
                n,
                name="decide",
                in_process=True,
                thresholds=signal.Thresholds(),
                serving=DECIDE_SERVING,
                shadow_log=log("decide"),
            )
        )
        out.append(
            rep.write_combiner(
                repo,
                files / "members.json",
                n,
                serving=COMBINER_SERVING,
                in_process=COMBINER_IN_PROCESS,
            )
        )
        outcomes = Path("..") / "feedback" / "outcomes.db"  # beside the feedback model
        if state_dir is not None:
            outcomes = state_dir / "feedback" / "outcomes.db"
        shared: Path | str = outcomes if outcomes_db is None else outcomes_db
        out.append(
            rep.write_selector(repo, files / "selector.json", n, outcomes_db=shared, serving=one)
        )
        if outcomes_db is None and state_dir is None:
            shared = Path("outcomes.db")  # the same file, from the feedback model's folder
        out.append(rep.write_feedback(repo, shared))
        if (repo / DIRECTION_MODEL / "1" / "manifest.json").is_file():
            out.append(write_direction_decide(repo, files))
    return out


def _require_setsuna_engines(repo: Path, models: tuple[str, ...]) -> None:
    """The ensembles call engines by ``features``/``score`` and load them in process:
    refuse a repository of Triton-native engines (``fil``: ``input__0``/``output__0``),
    which ``build_engines --target container`` publishes."""
    foreign = {
        m: kind
        for m in models
        if (kind := manifest.read(repo / m / "1").engine) not in runtime.engine_kinds()
    }
    if foreign:
        raise ConfigError(
            f"{repo}: engines {foreign} are served by Triton's own backends, which the "
            "ensembles cannot call; build the engines with setsuna's runtime inside the "
            "image (`python -m build_engines --target local`, deploy/container/Dockerfile) "
            "and write the container ensembles over that repository"
        )


def write_direction_decide(repo: Path, files: Path) -> Path:
    """``decide_direction``: the 3-class example in process, the direction rule applied."""
    n = manifest.read(repo / DIRECTION_MODEL / "1").schema.row_shape[0]
    doc = ExperimentDoc.single(
        "direction",
        {"main": Target(DIRECTION_MODEL, 1)},
        {"main": 1.0},
        salt="direction-v1",
    )
    path = files / "direction.json"
    path.write_text(doc.dumps())
    return rep.write_router(
        repo,
        path,
        n,
        name=DIRECTION_DECIDE,
        in_process=True,
        thresholds=DIRECTION_THRESHOLDS,
        serving=DECIDE_SERVING,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ensembles", description=__doc__)
    p.add_argument(
        "--target",
        choices=("local", "container"),
        default="local",
        help="container: shadow logs and outcomes DB under --state-dir (absolute), for a "
        "repository mounted read-only at /models (deploy/container/)",
    )
    p.add_argument("--model-repository", type=Path, help="default: model_repository/<target>")
    p.add_argument("--state-dir", type=Path, default=CONTAINER_STATE_DIR)
    p.add_argument(
        "--outcomes-db",
        default=None,
        help="postgresql://[user@]host[:port]/dbname: the outcomes in PostgreSQL, shared by "
        "every replica's selector and feedback (no password in it: libpq reads PGPASSWORD, "
        "PGPASSFILE or ~/.pgpass); default: SQLite beside the feedback model",
    )
    p.add_argument(
        "--check-only",
        action="store_true",
        help="check --state-dir and --outcomes-db and exit; write nothing (a build checks "
        "them before it spends minutes on engines)",
    )
    args = p.parse_args(argv)
    repo = args.model_repository or Path("model_repository") / args.target
    state = args.state_dir if args.target == "container" else None
    try:
        if args.check_only:
            check_settings(state_dir=state, outcomes_db=args.outcomes_db)
            return 0
        for folder in write_examples(repo, state_dir=state, outcomes_db=args.outcomes_db):
            print(f"wrote {folder}")
    except SetsunaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
