"""``python -m reliability``: run the hardening probes, print the table, exit 1 on any FAIL."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from reliability import artifacts, ensembles, pipeline, recovery, report, server
from reliability.harness import Lab, shared
from reliability.report import Probe
from setsuna.server import LocalTriton

GROUPS: Final = ("server", "artifacts", "recovery", "pipeline", "ensembles")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m reliability",
        description="Run setsuna's hardening probes against a real local tritonserver "
        "(tiny models built in a temporary folder) and print what each observed.",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path(".cache/reliability"),
        help="where results.json and report.md go (default: %(default)s)",
    )
    p.add_argument(
        "--only",
        default=",".join(GROUPS),
        help=f"comma-separated groups to run (default: all of {', '.join(GROUPS)})",
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary lab (logs, repos)")
    return p


def run(lab: Lab, only: set[str]) -> list[Probe]:
    """Every probe of the chosen groups, one after the other (this machine has few cores)."""
    out: list[Probe] = []
    if only & {"server", "artifacts", "recovery"}:
        with shared("the main server", lambda: server.start_main(lab), LocalTriton.stop) as main:
            if "server" in only:
                out += server.run(lab, main)
            if "artifacts" in only:
                out += artifacts.run_served(lab, main)
            if "recovery" in only:
                out += recovery.run_served(lab, main)  # last: it kills a stub
    if "recovery" in only:
        out += recovery.run_supervised(lab)
    if "artifacts" in only:
        out += artifacts.run(lab)
    if "pipeline" in only:
        out += pipeline.run(lab)
    if "ensembles" in only:
        out += ensembles.run(lab)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    only = {g.strip() for g in args.only.split(",") if g.strip()}
    unknown = sorted(only - set(GROUPS))
    if unknown or not only:
        print(f"unknown groups {unknown}: choose from {', '.join(GROUPS)}", file=sys.stderr)
        return 2
    began = time.monotonic()
    print(f"reliability probes ({', '.join(g for g in GROUPS if g in only)}) ...", file=sys.stderr)
    with Lab.open(keep=args.keep) as lab:
        probes = report.order(run(lab, only))
    wall = time.monotonic() - began
    print(report.table(probes))
    failed = [p for p in probes if not p.passed]
    json_path, md_path = report.write(probes, args.out, wall)
    print(
        f"{len(probes) - len(failed)}/{len(probes)} PASS, {len(failed)} FAIL in {wall:.0f} s; "
        f"wrote {json_path} and {md_path}"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
