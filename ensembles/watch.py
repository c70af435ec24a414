"""A config file that can change under a running model, and the last good copy of it.

Experiment and member files are edited while Triton serves. Each execute
calls :meth:`Watched.poll` (one ``stat``); when the file changed it is
parsed and validated as a whole, and only a valid file replaces the one in
force. A bad file keeps the previous one serving and the reason is kept in
:attr:`Watched.last_error` for the model to log and count.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, Generic, TypeVar

from setsuna.errors import ConfigError, SetsunaError

T = TypeVar("T")


def read_json(path: Path, what: str) -> Any:
    """The JSON document in ``path``; ConfigError names the ``what`` file and the fault."""
    try:
        return json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read {what} file {path}: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} file {path} is not JSON: {exc}") from exc


class Watched(Generic[T]):
    """``load(path)`` at start (its error propagates: a model must not start on a bad file)."""

    def __init__(self, path: Path, load: Callable[[Path], T]) -> None:
        self.path, self._load = path, load
        self._stamp = self._stat()
        self.current: T = load(path)
        self._previous: T = self.current
        self.last_error = ""
        self.reloads = 0
        self.failures = 0

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def poll(self) -> bool:
        """Reload if the file changed; True when a new valid copy took effect."""
        stamp = self._stat()
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            fresh = self._load(self.path)
        except SetsunaError as exc:
            self.failures += 1
            self.last_error = f"{exc} (still serving the previous file)"
            return False
        self._previous, self.current, self.last_error = self.current, fresh, ""
        self.reloads += 1
        return True

    def rollback(self, why: str) -> None:
        """Undo the last reload: the file parsed but could not take effect."""
        self.current = self._previous
        self.failures += 1
        self.last_error = why
