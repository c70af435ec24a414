"""Model names a file may use, and where a name may lead on disk.

Experiment, member and selector files name the models an ensembles model
calls. A name is also a folder of the model repository, so it follows
Triton's rules for a model name and more: letters, digits, ``_``, ``-`` and
``.``; not ``.`` or ``..``; at most :data:`MAX_NAME_BYTES` (a directory
name). A name that breaks them is refused with the file, never looked up.
Code that opens a model's folder itself (``decide`` loads engines in
process) resolves the path and checks it is still inside the repository,
so a symlinked folder cannot lead outside it either.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Final

from setsuna.errors import ConfigError

#: A model name is a directory name: NAME_MAX on Linux.
MAX_NAME_BYTES: Final = 255
_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_-.")


def model_name(value: object, what: str) -> str:
    """``value`` if it is a model name Triton and the repository accept; else ConfigError."""
    if (
        not isinstance(value, str)
        or not value
        or set(value) - _CHARS
        or value in (".", "..")
        or len(value) > MAX_NAME_BYTES
    ):
        shown = (
            repr(value) if not isinstance(value, str) or len(value) <= 80 else f"{value[:80]!r}..."
        )
        raise ConfigError(
            f"{what}: model {shown} is not a Triton model name: use letters, digits, "
            f"'_', '-' and '.', not '.' or '..', at most {MAX_NAME_BYTES} characters"
        )
    return value


def inside(repo: Path, *parts: str) -> Path:
    """``repo/parts...`` resolved; ConfigError if it leads outside ``repo`` (``..``, a symlink)."""
    root = repo.resolve()
    path = root.joinpath(*parts).resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"{'/'.join(parts)} resolves to {path}, outside the model repository {root}; "
            "models are loaded from inside the repository only: replace the link with the folder"
        )
    return path
