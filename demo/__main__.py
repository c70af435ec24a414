"""``python -m demo``: the main job, end to end on real market data.

After ``make build-engines`` (which trains ``eurusd_lgbm``, a binary P(up)
model, and ``eurusd_direction``, a down/flat/up model with ``decide_direction``
over it, on the first 70 % of backtesting's EURUSD hourly bars through
``setsuna dataset`` features):

1. writes the dataset (features + forward-return labels) to show the
   training rows, and a decision model ``decide_eurusd`` (router with the
   engine in process and the signal thresholds) over ``eurusd_lgbm``;
2. starts the local ``tritonserver`` with those models;
3. replays the unseen 30 % tails of EURUSD, S&P 500, NASDAQ and GOOG as four
   symbols through the pipeline (features -> Triton -> policy -> audit),
   with a progress bar (tqdm; whole lines when standard error is a log);
4. backtests each symbol's served stances with backtesting.py (commission
   and spread: ``COSTS``) against buy & hold, re-sends every audited input
   to the recorded model version (``audit verify``), stops the server,
   prints the summary and writes the report with pictures and the audit
   database under ``--out``;
5. does 3-4 again through ``decide_direction`` (the 3-class model: the
   audit stores each decision's whole probability vector), beside the
   binary run, into ``report_direction/`` and ``audit_direction.db``.

Exit status 1 if the run stopped early or a prediction did not reproduce.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from build_engines.examples import market
from ensembles.__main__ import DIRECTION_DECIDE, DIRECTION_MODEL
from setsuna import audit
from setsuna.backtest import BacktestSettings
from setsuna.client import Client
from setsuna.contract import EXPERIMENT_FILE, ExperimentDoc, Target
from setsuna.dataset import build_dataset
from setsuna.market import ReplayFeed
from setsuna.policy import PolicySettings
from setsuna.replay import ReplayResult, progress_bar, replay, summary_text, write_report
from setsuna.server import LocalTriton

DECIDE = "decide_eurusd"
#: The same costs for all four symbols: 1 bp commission per side, a 1 bp spread.
COSTS = BacktestSettings(cash=10_000.0, commission_bps=1.0, spread_bps=1.0)


def write_decide(repo: Path, work: Path) -> None:
    """The one-hop decision model over ``eurusd_lgbm`` (all keys to one arm)."""
    from ensembles import repository as rep
    from ensembles import signal

    exp = work / EXPERIMENT_FILE
    doc = ExperimentDoc.single(
        "eurusd", {"lgbm": Target(market.NAME, 1)}, {"lgbm": 1.0}, salt="demo"
    )
    exp.write_text(doc.dumps())
    thresholds = signal.Thresholds(buy_at=0.55, sell_at=0.45)
    n = len(market.spec())
    rep.write_router(repo, exp, n, name=DECIDE, in_process=True, thresholds=thresholds)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__)
    p.add_argument("--model-repository", type=Path, default=Path("model_repository/local"))
    p.add_argument("--out", type=Path, default=Path(".cache/demo"))
    args = p.parse_args(argv)
    repo, out = args.model_repository, args.out
    if not (repo / market.NAME / "1").is_dir():
        print(f"{repo / market.NAME} is missing: run `make build-engines` first", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    bars = market.replay_bars()
    history, tail = market.split_bars(bars)
    dataset = build_dataset(
        bars[bars["symbol"] == "EURUSD"], horizon_bars=market.HORIZON_BARS, spec=market.spec()
    )
    dataset.to_parquet(out / "eurusd_dataset.parquet", index=False)
    print(
        f"dataset: {len(dataset)} rows x {len(market.spec())} features, label = sign of the "
        f"return {market.HORIZON_BARS} bars ahead -> {out / 'eurusd_dataset.parquet'}"
    )
    write_decide(repo, out)
    warm = 60  # bars before each tail that only warm the feature engine
    import pandas as pd

    parts = [
        pd.concat([history[history["symbol"] == s].iloc[-warm:], tail[tail["symbol"] == s]])
        for s in tail["symbol"].unique()
    ]
    feed = ReplayFeed.from_frame(pd.concat(parts, ignore_index=True))
    db, db_direction = out / "audit.db", out / "audit_direction.db"
    for stale in (db, db_direction):
        stale.unlink(missing_ok=True)
    direction = (DIRECTION_MODEL, DIRECTION_DECIDE)
    has_direction = all((repo / m).is_dir() for m in direction)
    if not has_direction:
        print(f"{DIRECTION_DECIDE} is missing from {repo}: the 3-class replay is skipped "
              "(make build-engines builds it)")  # fmt: skip
    models = (market.NAME, DECIDE, *(direction if has_direction else ()))
    with LocalTriton.on_free_ports(repo, load_models=models, log_path=out / "triton.log") as server:
        print(f"tritonserver ready at grpc://{server.grpc_url} ({', '.join(models)})")
        print(f"replaying the unseen tails of {', '.join(feed.symbols)} ({len(feed)} bars)")
        with Client(server.grpc_url) as client:

            def replay_through(model: str, audit_path: Path) -> ReplayResult:
                return replay(
                    client,
                    model,
                    ReplayFeed.from_frame(pd.concat(parts, ignore_index=True)),
                    spec=market.spec(),
                    repository=repo,
                    audit_path=audit_path,
                    policy="served",
                    policy_settings=PolicySettings(max_open_positions=len(feed.symbols)),
                    warmup_bars=warm,
                    horizon_bars=market.HORIZON_BARS,
                    progress=progress_bar(),
                    backtest=COSTS,
                )

            result = replay_through(DECIDE, db)
            runs = [("binary: P(up) over eurusd_lgbm", result, audit.verify(db, client), "report")]
            if has_direction:
                print(f"replaying the same tails through {DIRECTION_DECIDE} (down/flat/up)")
                second = replay_through(DIRECTION_DECIDE, db_direction)
                verified = audit.verify(db_direction, client)
                title = f"3 classes: down/flat/up over {DIRECTION_MODEL}"
                runs.append((title, second, verified, "report_direction"))
    print("server stopped")
    ok = True
    for title, run, verified, folder in runs:
        print(f"\n== {title} ==")
        print(summary_text(run))
        print(
            f"audit verify: {verified.reproduced}/{verified.checked} predictions reproduced, "
            f"{len(verified.mismatches)} did not"
        )
        print(f"report {write_report(run, out / folder)}")
        ok = ok and verified.ok and run.summary.stopped is None
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
