"""The gate report: JSON for machines, Markdown for people, a table on stdout.

One report per model lists the source library's own row, every candidate
that was built (with its verdict and, when rejected, why) and every engine
that applied but was skipped, plus which candidate each target published.
Ratios are always against the source row of the same run.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from build_engines.base import Skipped
from build_engines.gate import Figures

_COLUMNS = (
    "candidate",
    "engine",
    "max |Δ|",
    "identical",
    "p50 us",
    "p99 us",
    "us/row @32",
    "rows/s @1024",
    "p50 vs src",
    "rows/s vs src",
    "load MiB",
    "size KiB",
    "verdict",
)


@dataclass(frozen=True)
class Report:
    """Everything the gate found for one model."""

    model: str
    source_kind: str
    source_sha256: str
    profile: str
    min_identical_decisions: float
    source: Figures
    candidates: Sequence[Figures]
    skipped: Sequence[Skipped] = ()
    published: Mapping[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "source_kind": self.source_kind,
            "source_sha256": self.source_sha256,
            "profile": self.profile,
            "min_identical_decisions": self.min_identical_decisions,
            "source": self.source.to_json(),
            "candidates": [_clean(f.to_json()) for f in self.candidates],
            "skipped": [{"name": s.name, "reason": s.reason} for s in self.skipped],
            "published": dict(self.published),
        }

    def rows(self) -> list[list[str]]:
        out = [_row(self.source, self.source, "reference")]
        for f in self.candidates:
            verdict = "PASS" if f.passed else f"REJECT: {f.reason}"
            out.extend([_row(f, self.source, verdict)])
        out.extend([[s.name, "-", *(["-"] * 10), f"skipped: {s.reason}"] for s in self.skipped])
        return out

    def markdown(self) -> str:
        head = (
            f"# Gate report: {self.model}\n\n"
            f"source: {self.source_kind} `{self.source_sha256[:16]}`, profile: {self.profile}, "
            f"gate: >= {self.min_identical_decisions:.2%} identical decisions\n\n"
        )
        table = "| " + " | ".join(_COLUMNS) + " |\n|" + "---|" * len(_COLUMNS) + "\n"
        table += "".join("| " + " | ".join(r) + " |\n" for r in self.rows())
        pub = "".join(f"- `{t}`: **{c}**\n" for t, c in sorted(self.published.items()))
        return head + table + ("\npublished:\n" + pub if pub else "\nnothing published\n")

    def text_table(self) -> str:
        rows = [list(_COLUMNS), *self.rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS) - 1)]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + r[-1]
            for r in rows
        ]
        pub = ", ".join(f"{t}={c}" for t, c in sorted(self.published.items())) or "nothing"
        return f"== {self.model} ({self.profile}) ==\n" + "\n".join(lines) + f"\npublished: {pub}\n"

    def write(self, folder: Path) -> tuple[Path, Path]:
        """Write ``gate_report.json`` and ``gate_report.md`` into ``folder``."""
        j, m = folder / "gate_report.json", folder / "gate_report.md"
        j.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        m.write_text(self.markdown())
        return j, m


def _clean(d: dict[str, Any]) -> dict[str, Any]:
    """JSON has no NaN: unmeasured figures become null."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return [clean(x) for x in v] if isinstance(v, list | tuple) else v

    return {k: clean(v) for k, v in d.items()}


def _fmt(v: float, spec: str) -> str:
    return "-" if not math.isfinite(v) else format(v, spec)


def _ratio(num: float, den: float) -> str:
    if not (math.isfinite(num) and math.isfinite(den)) or den <= 0 or num <= 0:
        return "-"
    return f"{num / den:.2f}x"


def _row(f: Figures, src: Figures, verdict: str) -> list[str]:
    return [
        f.name,
        f.engine,
        _fmt(f.max_abs_diff, ".2e"),
        f"{f.identical_decisions:.4%}",
        _fmt(f.p50_us, ".1f"),
        _fmt(f.p99_us, ".1f"),
        _fmt(f.per_row_us_at_32, ".2f"),
        _fmt(f.rows_per_s_at_1024, ",.0f"),
        _ratio(src.p50_us, f.p50_us),
        _ratio(f.rows_per_s_at_1024, src.rows_per_s_at_1024),
        _fmt(f.load_mib, ".1f"),
        f"{f.size_bytes / 1024:,.0f}" if f.size_bytes else "-",
        verdict,
    ]
