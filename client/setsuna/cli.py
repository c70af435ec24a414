"""The ``setsuna`` command: a thin dispatcher over subcommands that register themselves.

Each subcommand lives beside the code it drives and exposes
``register(subparsers)``, which adds its parser and sets ``handler`` (a
function of the parsed namespace returning an exit code). To add one, append
its module to :data:`SUBCOMMAND_MODULES`. A module listed in :data:`VERB_MODULES`
adds verbs to a subcommand another module registered (``register_verbs(sub)``):
that is how ``setsuna models`` carries the lifecycle verbs of
:mod:`ensembles.lifecycle` while the SDK imports nothing above it (this
module is the command's composition root and names them, it does not import
them at import time). A :class:`SetsunaError` becomes a
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
#: Subcommand -> modules with a ``register_verbs(subparsers)`` adding verbs to it.
VERB_MODULES: dict[str, tuple[str, ...]] = {"models": ("ensembles.lifecycle",)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="setsuna", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    for command, modules in VERB_MODULES.items():
        group = subparsers.choices[command]
        verbs = next(a for a in group._actions if isinstance(a, argparse._SubParsersAction))
        for name in modules:
            importlib.import_module(name).register_verbs(verbs)
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
