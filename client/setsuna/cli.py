"""The ``setsuna`` command: a thin dispatcher over subcommands that register themselves.

Each subcommand lives beside the code it drives and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a
function of the parsed namespace returning an exit code). To add one, append
its module to :data:`SUBCOMMAND_MODULES`. A :class:`SetsunaError` becomes a
one-line message on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from setsuna.errors import SetsunaError

#: Modules with a ``register(subparsers)`` function, one per subcommand.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "setsuna.features._cli",
    "setsuna.dataset",
    "setsuna.replay",
    "setsuna.audit",
    "setsuna.models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setsuna", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.handler(args)
    except SetsunaError as exc:
        print(f"setsuna {args.command}: {exc}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
