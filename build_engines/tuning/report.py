"""The sweep's report: markdown tables, a latency/throughput plot per model, JSON.

Output: ``.cache/perf/triton/{results.json,report.md,plots/*.png,logs/,csv/}``
(the chosen knobs per model go to ``tuned.json``,
:mod:`build_engines.tuning.tuned`). Plots need matplotlib; without it the
report says so and keeps the tables.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from build_engines.tuning import perf_analyzer as pa
from build_engines.tuning.choice import C1_BUDGET_P99_US, TIE_SHARE, Choice
from build_engines.tuning.results import VariantResult
from build_engines.tuning.sweep import CACHE_BYTES, Settings


def _ms(us: float | None) -> str:
    return "-" if us is None or not math.isfinite(us) else f"{us / 1000:.2f}"


def _rate(r: pa.RunResult | None) -> str:
    return "-" if r is None or r.row is None else f"{r.row.throughput_infer_s:,.0f}"


def _lat(r: pa.RunResult | None) -> str:
    if r is None or r.row is None:
        return "-"
    return f"{_ms(r.row.p50_us)} / {_ms(r.row.p99_us)}"


def markdown(doc: dict[str, Any], plots: dict[str, str], plot_note: str) -> str:
    """``report.md``: per model the choice and why, every variant's figures, pitfalls seen."""
    s: Settings = doc["_settings"]
    lines = [
        "# Triton config tuning (perf_analyzer)",
        "",
        f"Host: {doc['host']['cpus']} CPUs, {doc['host']['platform']}; load average "
        f"{doc['host']['load_before']} before, {doc['host']['load_after']} after. "
        f"{doc['perf_analyzer']}; tritonserver from nvidia-pytriton. Load generator on the "
        "same cores as the server.",
        "",
        f"Sweep: {s.protocol}, batch 1, distinct held-out rows, concurrency "
        f"{', '.join(map(str, s.concurrency))} (middle levels stop once p99 exceeds the "
        f"budget), time windows of {s.window_ms} ms, stability {s.stability_pct:g} %. "
        f"Server response cache {CACHE_BYTES // 1024} KiB (far fewer entries than rows: "
        "cache-variant figures are misses). Choice: highest throughput at any level with "
        f"p99 within the model's budget; within {TIE_SHARE:.0%} of it, fewest instances "
        "(on setsuna_forest: nearest the cores), then lowest c=1 p50, then p99. "
        f"Not eligible: c=1 p99 over {C1_BUDGET_P99_US / 1000:g} ms"
        + ("" if s.allow_batching_off else ", batching off (the baseline)")
        + ("" if s.allow_cache else ", the response cache")
        + ". "
        "Stall check: every request of every run (perf_analyzer's profile export); one "
        f"slower than {pa.STALL_LATENCY_US / 1000:g} ms, or refused by a queue timeout, makes "
        "the variant not eligible for every model. Configs carry no Triton queue policy.",
        "",
    ]
    if plot_note:
        lines += [f"> {plot_note}", ""]
    for m in doc["models"]:
        results: list[VariantResult] = m["_results"]
        choice: Choice = m["_choice"]
        budget_us = m["budget_p99_ms"] * 1000
        c_last = s.concurrency[-1]
        lines += [
            f"## {m['model']} ({m['engine']}, candidate {m['candidate']})",
            "",
            f"Budget: p99 <= {m['budget_p99_ms']:g} ms. Input: {m['input']['rows']} "
            f"{m['input']['origin']}.",
            "",
        ]
        if choice.variant is not None:
            v = choice.variant.variant
            flag = "" if choice.budget_met else " **(budget not met)**"
            lines += [f"**Chosen: `{v.name}`** ({v.describe()}){flag}: {choice.why}.", ""]
            default = next((vr for vr in results if vr.variant.name == "default"), None)
            base = None if default is None else default.best_within(s.protocol, budget_us)
            if choice.budget_met and choice.variant is not default and choice.point is not None:
                gain = (
                    "nothing within budget"
                    if base is None
                    else f"{_rate(base)} infer/s at c={base.spec.concurrency}"
                )
                lines += [f"The untuned `default` gives {gain} under the same budget.", ""]
        else:
            lines += [f"**Nothing chosen**: {choice.why}.", ""]
        if m["config_drift"]:
            lines += [f"Note: {m['config_drift']}.", ""]
        if m["model"] in plots:
            lines += [f"![{m['model']}]({plots[m['model']]})", ""]
        lines += [
            f"| variant | settings | c=1 p50 / p99 ms | best within budget | "
            f"c={c_last} infer/s | c={c_last} p50 / p99 ms | avg batch c={c_last} "
            "| stalls / requests checked, slowest ms | note |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for vr in results:
            best = vr.best_within(s.protocol, budget_us)
            best_txt = (
                "-"
                if best is None or best.row is None
                else f"{_rate(best)} @ c={best.spec.concurrency} (p99 {_ms(best.row.p99_us)})"
            )
            last = vr.find(s.protocol, c_last)
            avg = (
                "-"
                if last is None or last.server.avg_batch is None
                else f"{last.server.avg_batch:.1f}"
            )
            note = choice.not_eligible.get(vr.variant.name, "")
            note = "chosen" if choice.variant is vr else note.split(":")[0]
            failed = [r for r in vr.runs if not r.ok]
            if failed:
                note += f"; {len(failed)} failed attempt(s)"
            hits = [
                r.server.hit_share
                for r in vr.runs
                if r.ok and r.spec.input_data is not None and (r.server.hit_share or 0) > 0.01
            ]
            if hits:
                note += f"; cache hits up to {max(h or 0 for h in hits):.0%} on distinct rows"
            if vr.unchecked_runs:
                note += f"; {vr.unchecked_runs} run(s) without a stall check"
            lines.append(
                f"| {vr.variant.name} | {vr.variant.describe()} | {_lat(vr.find(s.protocol, 1))} "
                f"| {best_txt} | {_rate(last)} | {_lat(last)} | {avg} | {_stall_cell(vr)} "
                f"| {note.strip('; ')} |"
            )
        lines += ["", "Sweep points (infer/s @ p99 ms, by concurrency):", ""]
        for vr in results:
            pts = ", ".join(
                f"c{r.spec.concurrency}: {_rate(r)} @ {_ms(r.row.p99_us if r.row else None)}"
                for r in vr.sweep(s.protocol)
            )
            lines.append(f"- `{vr.variant.name}`: {pts or 'no result'}")
        lines += ["", *_detail_table(results, choice, s), ""]
        failures = [(vr.variant.name, r) for vr in results for r in vr.runs if not r.ok]
        if failures:
            lines += ["Failed attempts (each retried once with 2x windows):", ""]
            lines += [
                f"- `{n}` {r.spec.label()}: {r.status}: {r.message[:240]}" for n, r in failures
            ]
            lines.append("")
    lines += [
        "## Pitfalls seen by this script",
        "",
        "- perf_analyzer's default input is one tensor reused: with the response cache on that "
        "is all hits (the `hit` rows). Sweep figures use distinct rows and a tiny cache.",
        "- `--stability-percentage 15` often never converges at c=32 on 2 cores (rc 2); "
        f"{s.stability_pct:g} % is used, and an unstable or hung run is retried once with "
        "windows twice as long, then recorded as failed.",
        "- HTTP at c=32 occasionally hangs: every run has a timeout and its process group "
        "is killed.",
        "- perf_analyzer stops a run at the first failed request and then writes no "
        "per-request export: a stall refused by a queue policy's timeout (`Request timeout "
        "expired`) fails the whole measurement and counts as a stall; an unstable run has no "
        "export either, so its requests are not checked (its retry is).",
        "- Percentiles hide a request in a few thousand: stalls are counted from the export "
        f"(every request of every window), not from p99. Threshold "
        f"{pa.STALL_LATENCY_US / 1000:g} ms; the batcher's stall is ~500 ms, a healthy request "
        "here 0.3-50 ms.",
        "",
    ]
    return "\n".join(lines)


def _stall_cell(vr: VariantResult) -> str:
    bold = "**" if vr.stalled else ""
    return f"{bold}{vr.stall_count}{bold} / {vr.requests_checked:,}, {_ms(vr.max_latency_us)}"


def _detail_table(results: Sequence[VariantResult], choice: Choice, s: Settings) -> list[str]:
    shown = [vr for vr in results if vr.variant.name == "default" or vr is choice.variant]
    shown += [vr for vr in results if vr.find(s.protocol, s.concurrency[0], random=True)]
    if not shown:
        return []
    c0, c_last = s.concurrency[0], s.concurrency[-1]
    out = [
        "Protocols, batches and cache hits (p50 / p99 ms; infer/s):",
        "",
        f"| variant | run | c={c0} p50 / p99 | c={c_last} infer/s | c={c_last} p50 / p99 |",
        "|---|---|---|---|---|",
    ]
    seen: set[str] = set()
    for vr in shown:
        if vr.variant.name in seen:
            continue
        seen.add(vr.variant.name)
        for proto in (s.protocol, s.other_protocol):
            first, last = vr.find(proto, c0), vr.find(proto, c_last)
            if first or last:
                out.append(
                    f"| {vr.variant.name} | {proto} batch 1 | {_lat(first)} | {_rate(last)} "
                    f"| {_lat(last)} |"
                )
            big = vr.find(proto, 1, s.batch_rows)
            if big is not None:
                out.append(
                    f"| {vr.variant.name} | {proto} batch {s.batch_rows}, c=1 | {_lat(big)} "
                    f"| {_rate(big)} rows/s | - |"
                )
        hit = vr.find(s.protocol, c0, random=True)
        if hit is not None:
            share = hit.server.hit_share
            label = f"{s.protocol} all cache hits ({'?' if share is None else f'{share:.0%}'})"
            out.append(f"| {vr.variant.name} | {label} | {_lat(hit)} | {_rate(hit)} (c={c0}) | - |")
    return out


def plot_models(doc: dict[str, Any], folder: Path) -> tuple[dict[str, str], str]:
    """One latency-vs-throughput PNG per model; ``({}, why)`` without matplotlib."""
    try:
        mpl = importlib.import_module("matplotlib")
        mpl.use("Agg")
        plt: Any = importlib.import_module("matplotlib.pyplot")
    except ImportError:
        return {}, (
            "Plots skipped: matplotlib is not installed in this environment "
            "(pip install matplotlib, then rerun; the tables below carry the same points)."
        )
    s: Settings = doc["_settings"]
    folder.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    for m in doc["models"]:
        results: list[VariantResult] = m["_results"]
        choice: Choice = m["_choice"]
        fig, ax = plt.subplots(figsize=(8, 5))
        for vr in results:
            pts = [r for r in vr.sweep(s.protocol) if r.row is not None]
            if not pts:
                continue
            xs = [r.row.throughput_infer_s for r in pts if r.row is not None]
            ys = [r.row.p99_us / 1000 for r in pts if r.row is not None]
            chosen = choice.variant is vr
            out = vr.variant.name in choice.not_eligible
            ax.plot(
                xs,
                ys,
                marker="o",
                linewidth=2.5 if chosen else 1.0,
                linestyle=":" if out else "-",
                label=vr.variant.name
                + (" (chosen)" if chosen else " (not eligible)" if out else ""),
            )
            for r, x, y in zip(pts, xs, ys, strict=True):
                ax.annotate(f"c{r.spec.concurrency}", (x, y), fontsize=6, alpha=0.7)
        ax.axhline(m["budget_p99_ms"], color="red", linestyle="--", label="p99 budget")
        ax.set_yscale("log")
        ax.set_xlabel("throughput (infer/s)")
        ax.set_ylabel("client p99 latency (ms, log)")
        ax.set_title(f"{m['model']}: p99 vs throughput per config ({s.protocol}, batch 1)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / f"{m['model']}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made[m["model"]] = f"plots/{path.name}"
    return made, ""


def public(doc: Any) -> Any:
    """``doc`` without the in-memory objects (keys starting with '_')."""
    if isinstance(doc, dict):
        return {k: public(v) for k, v in doc.items() if not str(k).startswith("_")}
    if isinstance(doc, list):
        return [public(v) for v in doc]
    return doc
