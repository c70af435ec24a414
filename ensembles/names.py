"""Where a model name may lead on disk.

Experiment, member and selector files name the models an ensembles model
calls; :func:`setsuna.contract.model_name` says which names are allowed (a
name that breaks the rule is refused with the file, never looked up). Code
that opens a model's folder itself (``decide`` loads engines in
process) resolves the path and checks it is still inside the repository,
so a symlinked folder cannot lead outside it either.
"""

from __future__ import annotations

from pathlib import Path

from setsuna.errors import ConfigError


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
