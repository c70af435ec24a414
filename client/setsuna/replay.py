"""Replay a bar file through the pipeline against a server; summary, report, audit.

The job behind ``make demo`` and ``setsuna replay --model NAME --data FILE``:
validate the file (out-of-order rows refused or dropped and counted, gaps
counted), warm the feature engine on each symbol's first ``warmup_bars`` bars
without deciding, replay the rest through :class:`~setsuna.pipeline.Pipeline`
with a progress bar (:func:`progress_bar`, tqdm), then judge the signals
against what the market did next: hit rate (the sign of the return over
``horizon_bars`` matches the signal) and, per symbol, a backtest of the
stances the policy held (:mod:`setsuna.backtest`: backtesting.py, with
commission and spread, against buy & hold). :func:`write_report` adds
pictures (latency histogram, price with signals, equity against buy & hold
per symbol) beside the audit database.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from setsuna.audit import AuditLog, AuditSettings
from setsuna.backtest import (
    BacktestSettings,
    SymbolBacktest,
    backtest_decisions,
    backtest_table,
    require_backtesting,
)
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
DEFAULT_BACKTEST = BacktestSettings()


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
    gaps: int
    drops: dict[str, int]
    audit_path: Path | None
    #: Per symbol, in ``symbols`` order (those with 2 bars or more); empty without one.
    backtests: tuple[SymbolBacktest, ...] = ()
    backtest_settings: BacktestSettings | None = None


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
) -> tuple[float, int]:
    """(hit rate of BUY/SELL signals, signals judged): the sign of the return over the horizon."""
    hits = judged = 0
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
    return (hits / judged if judged else math.nan), judged


def _tqdm() -> Any:
    from tqdm import tqdm  # type: ignore[import-untyped]  # no stubs in the venv

    return tqdm


class ProgressBar:
    """The replay's progress, ``progress(done, total)``, readable on a terminal and in a log.

    On a terminal (``stream.isatty()``): a tqdm bar redrawn in place. Anywhere
    else (a log file, a pipe): whole lines in tqdm's format, one each time
    another ``percent_step`` % is done or ``interval_s`` seconds have passed
    since the last line, and one at the end, so a log holds at most
    ``100 / percent_step + 1`` lines plus one per ``interval_s``, no ``\\r``.
    """

    def __init__(
        self,
        stream: Any = None,
        *,
        desc: str = "replay",
        unit: str = "event",
        percent_step: float = 10.0,
        interval_s: float = 30.0,
        terminal: bool | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 < percent_step <= 100:
            raise ConfigError(f"percent_step={percent_step!r}: a share of the total in (0, 100]")
        if not interval_s > 0:
            raise ConfigError(f"interval_s={interval_s!r}: seconds between lines, > 0")
        self.stream = sys.stderr if stream is None else stream
        if terminal is None:
            isatty = getattr(self.stream, "isatty", None)
            terminal = bool(isatty()) if callable(isatty) else False
        self.terminal = terminal
        self.desc, self.unit = desc, unit
        self.percent_step, self.interval_s = percent_step, interval_s
        self._clock = clock
        self._bar: Any = None
        self._began: float | None = None
        self._last_line_t = 0.0
        self._last_step = -1
        self._last_done: tuple[int, int] | None = None
        self._closed = False

    def __call__(self, done: int, total: int) -> None:
        if self._closed:
            return
        now = self._clock()
        if self._began is None:
            self._began = self._last_line_t = now
        if self.terminal:
            self._draw(done, total)
        else:
            self._line(done, total, now)
        if total and done >= total:
            self.close()

    def _draw(self, done: int, total: int) -> None:
        if self._bar is None:
            self._bar = _tqdm()(
                total=total, file=self.stream, desc=self.desc, unit=self.unit, mininterval=0.2
            )
        if self._bar.total != total:
            self._bar.total = total
        self._bar.update(done - self._bar.n)

    def _line(self, done: int, total: int, now: float) -> None:
        step = int(100.0 * done / total // self.percent_step) if total else 0
        end = bool(total) and done >= total
        if step > self._last_step or now - self._last_line_t >= self.interval_s or end:
            self._write(done, total, now)
            self._last_step, self._last_line_t = step, now
        else:
            self._last_done = (done, total)

    def _write(self, done: int, total: int, now: float) -> None:
        elapsed = now - (self._began if self._began is not None else now)
        meter = _tqdm().format_meter(
            done, total or None, elapsed, ascii=True, prefix=self.desc, unit=self.unit
        )
        self.stream.write(meter + "\n")
        self.stream.flush()
        self._last_done = None

    def close(self) -> None:
        """End the bar (a run that stopped early never reaches its total); idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self._last_done is not None:  # the last state was not written yet
            self._write(*self._last_done, self._clock())


def progress_bar(stream: Any = None, **options: Any) -> ProgressBar:
    """A :class:`ProgressBar` on ``stream`` (standard error by default)."""
    return ProgressBar(stream, **options)


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
    backtest: BacktestSettings | None = DEFAULT_BACKTEST,
) -> ReplayResult:
    """Replay ``feed`` through ``model``; see the module docstring.

    ``backtest``: costs and cash of the per-symbol backtests (None: none run).
    Checked before the replay starts: backtesting must be installed.
    """
    if backtest is not None:
        require_backtesting()
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
    finally:
        if isinstance(progress, ProgressBar):
            progress.close()
    if audit is not None:
        try:
            audit.close()
        except AuditError as exc:  # the writer failed after the last request
            summary.stopped = summary.stopped or f"{type(exc).__name__}: {exc}"
    decisions = collected.arrays()
    hit, judged = judge(live, decisions, horizon_bars)
    backtests = (
        backtest_decisions(live, symbols, decisions, backtest) if backtest is not None else ()
    )
    drops = {**feed.drops.as_dict()}
    for k, v in engine.drops.as_dict().items():
        drops[k] = drops.get(k, 0) + v
    return ReplayResult(
        summary,
        symbols,
        live,
        decisions,
        hit,
        judged,
        count_gaps(records),
        drops,
        audit_path,
        backtests,
        backtest,
    )


def summary_text(r: ReplayResult) -> str:
    s = r.summary
    lines = [
        f"events {s.events:,}  decisions {s.decisions:,}  requests {s.requests:,}  "
        f"symbols {len(r.symbols)} ({', '.join(r.symbols)})",
        "signals " + "  ".join(f"{k} {v:,}" for k, v in s.signals.items()),
        f"hit rate {r.hit_rate:.1%} of {r.judged_signals:,} BUY/SELL signals "
        f"(sign of the return over the horizon)",
        f"skipped {s.skipped or {}}  dropped {r.drops}  gaps {r.gaps}",
        "latency p50 / p99 per request (us): "
        + "  ".join(f"{k} {p50:.0f}/{p99:.0f}" for k, (p50, p99) in s.latency_table().items()),
        f"throughput {s.decisions_per_s:,.0f} decisions/s over {s.wall_s:.2f} s",
    ]
    if r.backtest_settings is not None:
        lines.append(backtest_table(r.backtests, r.backtest_settings))
    if s.stopped:
        lines.append(f"STOPPED: {s.stopped}")
    if r.audit_path is not None:
        lines.append(f"audit {r.audit_path}")
    return "\n".join(lines)


def write_report(r: ReplayResult, folder: Path) -> Path:
    """summary.json, report.md and three PNG pictures into ``folder``.

    ``latency.png``, ``signals.png`` (the busiest symbol's close with its
    signals) and ``backtest.png`` (per symbol, the strategy's equity against
    buy & hold from the same cash).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    doc = summary_json(r.summary)
    doc.update(hit_rate=r.hit_rate, judged_signals=r.judged_signals, gaps=r.gaps, drops=r.drops)
    if r.backtest_settings is not None:
        bs = r.backtest_settings
        doc["backtest"] = {
            "settings": {
                "cash": bs.cash,
                "commission_bps": bs.commission_bps,
                "spread_bps": bs.spread_bps,
            },
            "symbols": [b.figures() for b in r.backtests],
        }
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

    n = max(len(r.backtests), 1)
    cols = 2 if n > 1 else 1
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows), squeeze=False)
    for ax, b in zip(axes.flat, r.backtests, strict=False):
        t = b.time_ns.astype("datetime64[ns]")
        ax.plot(t, b.equity, lw=0.9, label=f"signals {b.return_pct:+.1f}%")
        ax.plot(
            t,
            b.buy_hold_equity,
            lw=0.8,
            color="0.5",
            label=f"buy & hold {b.buy_hold_return_pct:+.1f}%",
        )
        ax.set_title(
            f"{b.symbol}: Sharpe {b.sharpe:.2f}, max DD {b.max_drawdown_pct:.1f}%, "
            f"{b.trades} trades",
            fontsize=9,
        )
        ax.set_ylabel("equity")
        ax.tick_params(axis="x", labelsize=7)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(r.backtests) :]:
        ax.set_axis_off()
    if r.backtest_settings is not None:
        fig.suptitle(f"Backtest against buy & hold ({r.backtest_settings.describe()})", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "backtest.png", dpi=100, bbox_inches="tight")
    plt.close(fig)

    md = ["# Replay report", "", "```", summary_text(r), "```", ""]
    md += [f"![{n}]({n}.png)" for n in ("latency", "signals", "backtest")]
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
    p.add_argument(
        "--commission-bps",
        type=float,
        default=DEFAULT_BACKTEST.commission_bps,
        help="backtest: commission per side, basis points of the traded value",
    )
    p.add_argument(
        "--spread-bps",
        type=float,
        default=DEFAULT_BACKTEST.spread_bps,
        help="backtest: whole bid-ask spread, basis points, paid once per position",
    )
    p.add_argument(
        "--backtest-cash",
        type=float,
        default=DEFAULT_BACKTEST.cash,
        help="backtest: starting cash per symbol",
    )
    p.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    backtest = BacktestSettings(args.backtest_cash, args.commission_bps, args.spread_bps)
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
            backtest=backtest,
        )
    print(summary_text(result))
    if args.report is not None:
        print(f"report {write_report(result, args.report)}")
    if result.summary.stopped:
        print(f"setsuna replay: the run stopped: {result.summary.stopped}", file=sys.stderr)
        return 1
    return 0
