"""Replay a bar file through the pipeline against a server; summary, report, audit.

The job behind ``make demo`` and ``setsuna replay --model NAME --data FILE``:
validate the file (out-of-order rows refused or dropped and counted, gaps
counted), warm the feature engine on each symbol's first ``warmup_bars`` bars
without deciding, replay the rest through :class:`~setsuna.pipeline.Pipeline`
with a progress bar, then judge the signals against what the market did
next: hit rate (the sign of the return over ``horizon_bars`` matches the
signal) and the cumulative return of holding each symbol's stance to the
next bar. :func:`write_report` adds pictures (latency histogram, price with
signals, cumulative return) beside the audit database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna.audit import AuditLog, AuditSettings
from setsuna.client import Client, ClientSettings
from setsuna.errors import AuditError, ConfigError
from setsuna.features import FeatureEngine, FeatureSpec, default_spec
from setsuna.market import BarRecords, ReplayFeed, read_frame
from setsuna.pipeline import (
    Decisions,
    ModelCatalog,
    Pipeline,
    PipelineSettings,
    RunSummary,
    histogram_counts,
    summary_json,
)
from setsuna.policy import PolicySettings, ServedSignalPolicy, ThresholdPolicy

GAP_FACTOR = 5.0


@dataclass
class Collected:
    """Every decision of a run, concatenated at the end (a sink)."""

    parts: list[Decisions] = field(default_factory=list)

    def __call__(self, d: Decisions) -> None:
        self.parts.append(d)

    def arrays(self) -> dict[str, npt.NDArray[Any]]:
        if not self.parts:
            empty = np.empty(0, np.int64)
            small = empty.astype(np.int8)
            return {"event_ns": empty, "symbol_id": empty, "signal": small, "stance": small}
        return {
            "event_ns": np.concatenate([p.event_ns for p in self.parts]),
            "symbol_id": np.concatenate([p.symbol_ids for p in self.parts]),
            "signal": np.concatenate([p.signal for p in self.parts]),
            "stance": np.concatenate([p.stance for p in self.parts]),
        }


@dataclass
class ReplayResult:
    summary: RunSummary
    symbols: tuple[str, ...]
    records: BarRecords
    decisions: dict[str, npt.NDArray[Any]]
    hit_rate: float
    judged_signals: int
    cumulative_return: npt.NDArray[np.float64]
    gaps: int
    drops: dict[str, int]
    audit_path: Path | None


def count_gaps(records: BarRecords, factor: float = GAP_FACTOR) -> int:
    """Bars arriving more than ``factor`` x the symbol's median spacing after the previous."""
    gaps = 0
    for sid in np.unique(records["symbol_id"]):
        ts = records["timestamp_ns"][records["symbol_id"] == sid]
        if len(ts) > 2:
            d = np.diff(ts)
            gaps += int(np.count_nonzero(d > factor * np.median(d)))
    return gaps


def judge(
    records: BarRecords, decisions: dict[str, npt.NDArray[Any]], horizon_bars: int
) -> tuple[float, int, npt.NDArray[np.float64]]:
    """(hit rate of BUY/SELL signals, signals judged, cumulative return per decision time)."""
    hits = judged = 0
    stance_returns: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.float64]]] = []
    for sid in np.unique(records["symbol_id"]):
        mine = records[records["symbol_id"] == sid]
        ts, close = mine["timestamp_ns"], mine["close"]
        sel = decisions["symbol_id"] == sid
        d_ts, sig = decisions["event_ns"][sel], decisions["signal"][sel].astype(np.int64)
        pos = np.searchsorted(ts, d_ts)
        ahead = pos + horizon_bars
        ok = (sig != 0) & (ahead < len(ts))
        fwd = close[ahead[ok]] / close[pos[ok]] - 1.0
        hits += int(np.count_nonzero(np.sign(fwd) == sig[ok]))
        judged += int(np.count_nonzero(ok))
        # Stance after each decision, held to the symbol's next bar.
        stance = decisions["stance"][sel].astype(np.float64)
        nxt = pos + 1
        has = nxt < len(ts)
        r = np.zeros(len(pos))
        r[has] = stance[has] * (close[nxt[has]] / close[pos[has]] - 1.0)
        stance_returns.append((d_ts, r))
    if stance_returns:
        all_ts = np.concatenate([t for t, _ in stance_returns])
        all_r = np.concatenate([r for _, r in stance_returns])
        cum = np.cumsum(all_r[np.argsort(all_ts, kind="stable")])
    else:
        cum = np.zeros(0)
    return (hits / judged if judged else math.nan), judged, cum


def progress_bar(stream: Any = sys.stderr, width: int = 40) -> Callable[[int, int], None]:
    """A one-line text progress bar (no dependency)."""

    def show(done: int, total: int) -> None:
        frac = done / total if total else 1.0
        filled = int(width * frac)
        end = "\n" if done >= total else ""
        stream.write(f"\r  [{'#' * filled}{'.' * (width - filled)}] {done}/{total} events{end}")
        stream.flush()

    return show


def replay(
    client: Client,
    model: str,
    feed: ReplayFeed,
    *,
    spec: FeatureSpec,
    repository: Path | None = None,
    audit_path: Path | None = None,
    audit_settings: AuditSettings | None = None,
    policy: str = "served",
    policy_settings: PolicySettings | None = None,
    thresholds: tuple[float, float, float] = (0.55, 0.45, 0.02),
    warmup_bars: int = 0,
    horizon_bars: int = 5,
    deadline_ms: float = 50.0,
    max_consecutive_failed_requests: int = PipelineSettings.max_consecutive_failed_requests,
    progress: Callable[[int, int], None] | None = None,
) -> ReplayResult:
    """Replay ``feed`` through ``model``; see the module docstring."""
    records = np.array(feed.records)  # a writeable copy: the engine's fast path
    symbols = feed.symbols
    engine = FeatureEngine(spec, symbols, on_bad_rows="drop")
    first = np.ones(len(records), dtype=bool)
    if warmup_bars:
        rank = np.zeros(len(records), dtype=np.int64)
        for sid in range(len(symbols)):
            mine = np.flatnonzero(records["symbol_id"] == sid)
            rank[mine] = np.arange(len(mine))
        first = rank >= warmup_bars
        engine.update(records[~first])
    live = np.ascontiguousarray(records[first])
    settings = policy_settings or PolicySettings()
    if policy == "served":
        pol: ServedSignalPolicy | ThresholdPolicy = ServedSignalPolicy(
            len(symbols), settings=settings
        )
    elif policy == "threshold":
        buy, sell, h = thresholds
        pol = ThresholdPolicy(
            len(symbols), buy_at=buy, sell_at=sell, hysteresis=h, settings=settings
        )
    else:
        raise ConfigError(f"policy={policy!r}: choose 'served' (the model's signal) or 'threshold'")
    catalog = ModelCatalog(repository) if repository is not None else None
    collected = Collected()
    audit = None
    if audit_path is not None:
        audit = AuditLog(
            audit_path,
            feature_names=spec.names,
            settings=audit_settings,
            run_info={"model": model, "url": client.url, "symbols": list(symbols)},
        )
    try:
        pipe = Pipeline(
            engine,
            client,
            pol,
            PipelineSettings(
                model,
                deadline_ms=deadline_ms,
                max_consecutive_failed_requests=max_consecutive_failed_requests,
            ),
            audit=audit,
            catalog=catalog,
            sinks=(collected,),
        )
        summary = pipe.run(live, progress=progress)
    except BaseException:
        if audit is not None:
            with contextlib.suppress(AuditError):
                audit.close()
        raise
    if audit is not None:
        try:
            audit.close()
        except AuditError as exc:  # the writer failed after the last request
            summary.stopped = summary.stopped or f"{type(exc).__name__}: {exc}"
    decisions = collected.arrays()
    hit, judged, cum = judge(live, decisions, horizon_bars)
    drops = {**feed.drops.as_dict()}
    for k, v in engine.drops.as_dict().items():
        drops[k] = drops.get(k, 0) + v
    return ReplayResult(
        summary, symbols, live, decisions, hit, judged, cum, count_gaps(records), drops, audit_path
    )


def summary_text(r: ReplayResult) -> str:
    s = r.summary
    cum = float(r.cumulative_return[-1]) if len(r.cumulative_return) else 0.0
    lines = [
        f"events {s.events:,}  decisions {s.decisions:,}  requests {s.requests:,}  "
        f"symbols {len(r.symbols)} ({', '.join(r.symbols)})",
        "signals " + "  ".join(f"{k} {v:,}" for k, v in s.signals.items()),
        f"hit rate {r.hit_rate:.1%} of {r.judged_signals:,} BUY/SELL signals "
        f"(sign of the return over the horizon)",
        f"cumulative return of following the signals {cum:+.2%} (sum over symbols, no costs)",
        f"skipped {s.skipped or {}}  dropped {r.drops}  gaps {r.gaps}",
        "latency p50 / p99 per request (us): "
        + "  ".join(f"{k} {p50:.0f}/{p99:.0f}" for k, (p50, p99) in s.latency_table().items()),
        f"throughput {s.decisions_per_s:,.0f} decisions/s over {s.wall_s:.2f} s",
    ]
    if s.stopped:
        lines.append(f"STOPPED: {s.stopped}")
    if r.audit_path is not None:
        lines.append(f"audit {r.audit_path}")
    return "\n".join(lines)


def write_report(r: ReplayResult, folder: Path) -> Path:
    """summary.json, report.md and three PNG pictures into ``folder``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    doc = summary_json(r.summary)
    doc.update(hit_rate=r.hit_rate, judged_signals=r.judged_signals, gaps=r.gaps, drops=r.drops)
    doc["histograms"] = {k: histogram_counts(h) for k, h in r.summary.latency.items()}
    (folder / "summary.json").write_text(json.dumps(doc, indent=2, default=float) + "\n")

    fig, ax = plt.subplots(figsize=(8, 4))
    for name in ("infer", "tick_to_signal", "features"):
        h = histogram_counts(r.summary.latency[name])
        if h["counts"]:
            ax.step(np.asarray(h["edges_us"]) / 1e3, h["counts"], where="post", label=name)
    ax.set(xscale="log", xlabel="ms per request", ylabel="requests", title="Latency")
    ax.legend()
    fig.savefig(folder / "latency.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    sid = int(np.bincount(r.records["symbol_id"]).argmax())
    mine = r.records[r.records["symbol_id"] == sid]
    t = mine["timestamp_ns"].astype("datetime64[ns]")
    fig, ax = plt.subplots(figsize=(10, 4))
    ax.plot(t, mine["close"], lw=0.7, color="0.3")
    sel = r.decisions["symbol_id"] == sid
    d_ts, sig = r.decisions["event_ns"][sel], r.decisions["signal"][sel]
    px = mine["close"][np.searchsorted(mine["timestamp_ns"], d_ts)]
    for value, marker, color in ((1, "^", "green"), (-1, "v", "red")):
        k = sig == value
        ax.scatter(d_ts[k].astype("datetime64[ns]"), px[k], marker=marker, color=color, s=14)
    ax.set(title=f"{r.symbols[sid]}: close with BUY (^) and SELL (v)", ylabel="price")
    fig.savefig(folder / "signals.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(r.cumulative_return * 100)
    ax.set(xlabel="decision", ylabel="%", title="Cumulative return of following the signals")
    fig.savefig(folder / "cumulative_return.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    md = ["# Replay report", "", "```", summary_text(r), "```", ""]
    md += [f"![{n}]({n}.png)" for n in ("latency", "signals", "cumulative_return")]
    (folder / "report.md").write_text("\n".join(md) + "\n")
    return folder / "report.md"


# --------------------------------------------------------------------------- CLI


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "replay",
        help="replay a bar file through a served model: signals, audit, latency, report",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
    )
    p.add_argument("--model", required=True, help="model to call (e.g. decide, eurusd_lgbm)")
    p.add_argument("--data", required=True, type=Path, help="bar file (.csv/.parquet)")
    p.add_argument("--url", default="127.0.0.1:8001", help="server host:port")
    p.add_argument("--protocol", choices=("grpc", "http"), default="grpc")
    p.add_argument("--model-repository", type=Path, help="checks schemas, records artifact hashes")
    p.add_argument("--spec", type=Path, help="feature spec JSON (default: the default set)")
    p.add_argument("--audit", type=Path, default=Path("replay-audit.db"))
    p.add_argument(
        "--audit-synchronous",
        choices=("FULL", "NORMAL"),
        default=AuditSettings.synchronous,
        help="FULL: each audit commit reaches the disk before its decisions are passed on "
        "(survives a power cut); NORMAL: the OS cache (survives a killed process)",
    )
    p.add_argument("--report", type=Path, help="write report.md and pictures here")
    p.add_argument("--policy", choices=("served", "threshold"), default="threshold")
    p.add_argument("--buy-at", type=float, default=0.55)
    p.add_argument("--sell-at", type=float, default=0.45)
    p.add_argument("--hysteresis", type=float, default=0.02)
    p.add_argument("--cooldown-ms", type=float, default=0.0)
    p.add_argument("--max-open-positions", type=int, default=0)
    p.add_argument("--warmup-bars", type=int, default=0)
    p.add_argument("--horizon", type=int, default=5, help="bars ahead for the hit rate")
    p.add_argument("--deadline-ms", type=float, default=50.0)
    p.add_argument(
        "--max-consecutive-failed-requests",
        type=int,
        default=PipelineSettings.max_consecutive_failed_requests,
        help="stop (exit 1) after this many requests in a row failed (deadline, overload, "
        "refused input)",
    )
    p.add_argument("--on-bad-rows", choices=("raise", "drop"), default="raise")
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    spec = FeatureSpec.loads(args.spec.read_text()) if args.spec else default_spec()
    feed = ReplayFeed.from_frame(read_frame(args.data), on_bad_rows=args.on_bad_rows)
    with Client(args.url, args.protocol, ClientSettings(deadline_ms=args.deadline_ms)) as client:
        client.wait_ready(args.model, timeout_s=10.0)
        result = replay(
            client,
            args.model,
            feed,
            spec=spec,
            repository=args.model_repository,
            audit_path=args.audit,
            audit_settings=AuditSettings(synchronous=args.audit_synchronous),
            policy=args.policy,
            policy_settings=PolicySettings(args.cooldown_ms, args.max_open_positions),
            thresholds=(args.buy_at, args.sell_at, args.hysteresis),
            warmup_bars=args.warmup_bars,
            horizon_bars=args.horizon,
            deadline_ms=args.deadline_ms,
            max_consecutive_failed_requests=args.max_consecutive_failed_requests,
            progress=progress_bar(),
        )
    print(summary_text(result))
    if args.report is not None:
        print(f"report {write_report(result, args.report)}")
    if result.summary.stopped:
        print(f"setsuna replay: the run stopped: {result.summary.stopped}", file=sys.stderr)
        return 1
    return 0
