"""Run one probe in isolation, and the throwaway workspace every probe builds in.

A probe is a function returning an :class:`Outcome`; :func:`probe` times
it and turns any exception into a FAIL row carrying the message, so one
broken probe never stops the rest. The :class:`Lab` is a temporary
directory with its own signing key, trust file and admin token (set in
this process's environment for the run and restored after): nothing the
probes build or sign touches ``model_repository/`` or the operator's keys.
"""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Generic, TypeVar

from reliability.report import FAIL, PASS, Figure, Probe
from setsuna import seal
from setsuna.server import ADMIN_TOKEN_ENV

#: Longest exception text kept in a FAIL row (the JSON file keeps it whole).
_MAX_ERROR_CHARS: Final = 600
#: Lab folders open now: paths under them are shown relative in the table.
_LABS: list[str] = []
T = TypeVar("T")


@dataclass
class Outcome:
    """What a probe observed, whether that is what was expected, and its figures."""

    observed: str
    ok: bool
    figures: dict[str, Figure] = field(default_factory=dict)


def probe(
    pid: str, name: str, expected: str, check: Callable[[], Outcome], *, note: str = ""
) -> Probe:
    """Run ``check`` and return its row; an exception is a FAIL with the message."""
    began = time.monotonic()
    try:
        out = check()
    except Exception as exc:  # isolate: any failure of a probe is its own FAIL row
        text = f"{type(exc).__name__}: {exc}"
        out = Outcome(f"error: {text[:_MAX_ERROR_CHARS]}", False, {"error": text})
    took = time.monotonic() - began
    observed = out.observed
    for root in _LABS:
        observed = observed.replace(root + "/", "")
    row = Probe(pid, name, expected, observed, PASS if out.ok else FAIL, took, out.figures, note)
    print(f"  {row.verdict}  {row.label}  ({took:.1f} s)", file=sys.stderr, flush=True)
    return row


class Shared(Generic[T]):
    """Something several probes use (a server): the thing, or why it could not be made."""

    def __init__(self, what: str, value: T | None = None, error: str = "") -> None:
        self.what, self._value, self.error = what, value, error

    def get(self) -> T:
        if self._value is None:
            raise RuntimeError(f"{self.what} is not available: {self.error}")
        return self._value


@contextmanager
def shared(what: str, make: Callable[[], T], close: Callable[[T], None]) -> Iterator[Shared[T]]:
    """``make()`` once for a group of probes; its failure fails each probe that needs it."""
    try:
        value = make()
    except Exception as exc:  # reported by every probe that asks for it
        print(f"  could not set up {what}: {exc}", file=sys.stderr, flush=True)
        yield Shared(what, None, f"{type(exc).__name__}: {str(exc)[:_MAX_ERROR_CHARS]}")
        return
    try:
        yield Shared(what, value)
    finally:
        close(value)


@dataclass
class Lab:
    """The run's temporary directory, key pair and admin token."""

    root: Path
    token: str

    def path(self, *parts: str) -> Path:
        """A fresh directory under the lab (created)."""
        p = self.root.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p

    @classmethod
    @contextmanager
    def open(cls, *, keep: bool = False) -> Iterator[Lab]:
        root = Path(tempfile.mkdtemp(prefix="setsuna-reliability-"))
        token = "reliability-" + secrets.token_urlsafe(24)
        env = {
            ADMIN_TOKEN_ENV: token,
            seal.SIGNING_KEY_ENV: str(root / "keys" / "signing_key"),
            seal.TRUSTED_KEYS_ENV: str(root / "keys" / "trusted_keys"),
        }
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        _LABS.append(str(root))
        try:
            seal.signing_key()  # generated (0600) and trusted for this run only
            yield cls(root, token)
        finally:
            _LABS.remove(str(root))
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            if keep:
                print(f"kept the lab at {root}", file=sys.stderr)
            else:
                shutil.rmtree(root, ignore_errors=True)
