"""What a probe found, the table printed for the operator, and the files written beside it."""

from __future__ import annotations

import json
import os
import re
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Final

PASS: Final = "PASS"
FAIL: Final = "FAIL"
#: Column widths of the terminal table (the markdown file is not wrapped).
_WIDTHS: Final = {"probe": 30, "expected": 44, "observed": 66, "verdict": 7, "s": 6}

Figure = float | int | str | bool | None


@dataclass
class Probe:
    """One probe's result: set up, act, observe, verdict.

    ``figures`` holds the numbers behind ``observed`` (requests failed,
    decisions lost, memory in KiB, recovery time in s) for the JSON file;
    ``note`` says what to know about the row (e.g. that it is inherently slow).
    """

    id: str
    name: str
    expected: str
    observed: str
    verdict: str
    seconds: float
    figures: dict[str, Figure] = field(default_factory=dict)
    note: str = ""

    @property
    def passed(self) -> bool:
        return self.verdict == PASS

    @property
    def label(self) -> str:
        return f"{self.id} {self.name}"


def gist(text: str, limit: int = 140) -> str:
    """One line of an error for a table cell: setsuna's own sentence when there is one.

    Triton wraps a model's load failure in its own text and a traceback;
    tritonclient prefixes the status and an unknown request id.
    """
    m = re.search(r"setsuna: (.*?)(?:\\n|\n|$)", text)
    line = m.group(1) if m else text
    line = re.sub(r"\[StatusCode\.\w+\] |\[request id: [^\]]*\] ", "", line)
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


def order(probes: list[Probe]) -> list[Probe]:
    """By probe number, then letter: 2 before 10, 6a before 6b."""

    def key(p: Probe) -> tuple[int, str]:
        m = re.match(r"(\d+)(.*)", p.id)
        return (int(m.group(1)), m.group(2)) if m else (10**6, p.id)

    return sorted(probes, key=key)


def _observed(p: Probe) -> str:
    return f"{p.observed} [{p.note}]" if p.note else p.observed


def table(probes: list[Probe]) -> str:
    """A plain-text grid, each cell wrapped to its column (for the terminal)."""
    names = list(_WIDTHS)
    rule = "+" + "+".join("-" * (w + 2) for w in _WIDTHS.values()) + "+"

    def row(cells: list[str]) -> list[str]:
        wrapped = [
            textwrap.wrap(c, w, break_long_words=True, break_on_hyphens=False) or [""]
            for c, w in zip(cells, _WIDTHS.values(), strict=True)
        ]
        height = max(len(w) for w in wrapped)
        return [
            "| "
            + " | ".join(
                (w[i] if i < len(w) else "").ljust(width)
                for w, width in zip(wrapped, _WIDTHS.values(), strict=True)
            )
            + " |"
            for i in range(height)
        ]

    lines = [rule, *row(names), rule.replace("-", "=")]
    for p in probes:
        lines += row([p.label, p.expected, _observed(p), p.verdict, f"{p.seconds:.1f}"])
        lines.append(rule)
    return "\n".join(lines)


def _md(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown(probes: list[Probe], wall_s: float) -> str:
    passed = sum(p.passed for p in probes)
    lines = [
        "# setsuna reliability probes",
        "",
        f"{passed}/{len(probes)} PASS, {len(probes) - passed} FAIL; wall time {wall_s:.0f} s "
        "(`make reliability`).",
        "",
        "| probe | expected | observed | verdict | s |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {_md(p.label)} | {_md(p.expected)} | {_md(_observed(p))} | {p.verdict} "
        f"| {p.seconds:.1f} |"
        for p in probes
    ]
    return "\n".join(lines) + "\n"


def write(probes: list[Probe], out_dir: Path, wall_s: float) -> tuple[Path, Path]:
    """``results.json`` and ``report.md`` in ``out_dir``, each replaced in one step."""
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "passed": sum(p.passed for p in probes),
        "failed": sum(not p.passed for p in probes),
        "wall_s": round(wall_s, 1),
        "probes": [asdict(p) for p in probes],
    }
    paths = (out_dir / "results.json", out_dir / "report.md")
    texts = (json.dumps(doc, indent=2) + "\n", markdown(probes, wall_s))
    for path, text in zip(paths, texts, strict=True):
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
