"""The manifest that travels with every model version folder.

``manifest.json`` records where the engine came from (source kind and hash),
the sha256 of every file in the folder, the feature schema in order, which
runtime serves it with which parameters, and the accuracy-gate report that let
it in. One function, :func:`verify`, checks a folder against it: the build
calls it after writing, the Python-backend wrappers call it in ``initialize``
(and refuse to load on mismatch), and the tests call it on tampered copies.
No pickle is ever written or read: only JSON and the engines' own formats.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from setsuna.errors import ArtifactError, ConfigError, TamperedArtifactError
from setsuna.schema import FeatureSchema

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1
#: The ``config.pbtxt`` parameter naming a multiclass model's classes, in the
#: order of its ``score`` columns, as a JSON list of strings.
CLASS_LABELS_PARAMETER = "class_labels"
#: Files beside the artifacts that the manifest cannot list: itself and the seal that
#: signs it (setsuna.seal). A ``__pycache__`` is NOT ignored: the stub guard never
#: writes bytecode, so one found here was planted (and would run instead of model.py).
_IGNORED = frozenset({MANIFEST_NAME, "seal.json"})
_CHUNK_BYTES = 1 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What a model version folder holds and how to serve it."""

    model: str
    engine: str
    candidate: str
    task: str
    schema: FeatureSchema
    source: Mapping[str, Any]
    files: Mapping[str, str]
    engine_params: Mapping[str, Any] = field(default_factory=dict)
    decision_threshold: float = 0.5
    gate: Mapping[str, Any] = field(default_factory=dict)
    #: A multiclass model's class labels, in the order of its ``score`` columns
    #: (``score`` is ``[C]``); empty for a binary classifier or a regressor (``[1]``).
    classes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_classes(self.classes, "manifest classes")

    @property
    def n_outputs(self) -> int:
        """Scores per row: the number of classes of a multiclass model, else 1."""
        return len(self.classes) if self.classes else 1

    def to_json(self) -> dict[str, Any]:
        extra: dict[str, Any] = {"classes": list(self.classes)} if self.classes else {}
        return {
            "format": FORMAT_VERSION,
            "model": self.model,
            "engine": self.engine,
            "candidate": self.candidate,
            "task": self.task,
            "decision_threshold": self.decision_threshold,
            "schema": self.schema.to_json(),
            "source": dict(self.source),
            "engine_params": dict(self.engine_params),
            "files": dict(sorted(self.files.items())),
            "gate": dict(self.gate),
            **extra,
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Manifest:
        if data.get("format") != FORMAT_VERSION:
            raise ArtifactError(
                f"manifest format {data.get('format')!r} is not {FORMAT_VERSION}: "
                "rebuild the model with this version of setsuna (make build-engines)"
            )
        try:
            return cls(
                model=str(data["model"]),
                engine=str(data["engine"]),
                candidate=str(data["candidate"]),
                task=str(data["task"]),
                schema=FeatureSchema.from_json(data["schema"]),
                source=dict(data["source"]),
                files={str(k): str(v) for k, v in data["files"].items()},
                engine_params=dict(data.get("engine_params", {})),
                decision_threshold=float(data.get("decision_threshold", 0.5)),
                gate=dict(data.get("gate", {})),
                classes=tuple(data.get("classes", ())),
            )
        except (KeyError, TypeError, ValueError, ConfigError) as exc:
            raise ArtifactError(f"malformed manifest: {exc}; rebuild the model") from exc


def check_classes(classes: Any, what: str) -> tuple[str, ...]:
    """``classes`` if it is empty or 3+ distinct non-empty strings; else ConfigError."""
    labels = tuple(classes)
    if labels and (
        len(labels) < 3
        or len(set(labels)) != len(labels)
        or not all(isinstance(c, str) and c for c in labels)
    ):
        raise ConfigError(
            f"{what} {list(labels)!r}: give none (binary or regression) or 3 or more "
            "distinct non-empty labels in the order of the score columns"
        )
    return labels


def write(folder: Path, manifest: Manifest) -> Path:
    """Write ``manifest.json`` into ``folder`` and return its path."""
    path = folder / MANIFEST_NAME
    path.write_text(json.dumps(manifest.to_json(), indent=2, sort_keys=False) + "\n")
    return path


def hash_folder(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (relative POSIX paths), manifest excluded."""
    return {
        p.relative_to(folder).as_posix(): sha256_file(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not _IGNORED.intersection(p.relative_to(folder).parts)
    }


def read(folder: Path) -> Manifest:
    """Read a folder's manifest without checking its files."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(
            f"{path} is missing: this folder was not written by build_engines; "
            "rebuild it with `make build-engines`"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {path}: {exc}; rebuild the model") from exc
    return Manifest.from_json(data)


def verify(folder: Path) -> Manifest:
    """Re-hash every file in ``folder`` and return its manifest if all match.

    Raises :class:`TamperedArtifactError` when a listed file is missing or
    differs, or when a file the manifest does not list has appeared (a planted
    shared library is tampering too).
    """
    manifest = read(folder)
    actual = hash_folder(folder)
    missing = sorted(set(manifest.files) - set(actual))
    if missing:
        raise TamperedArtifactError(
            f"{folder}: missing {missing}; the version folder is incomplete, rebuild it "
            "with `make build-engines`"
        )
    changed = sorted(n for n, h in manifest.files.items() if actual[n] != h)
    if changed:
        raise TamperedArtifactError(
            f"{folder}: sha256 of {changed} does not match manifest.json; the artifact was "
            "modified after the build. Do not serve it: rebuild with `make build-engines`"
        )
    extra = sorted(set(actual) - set(manifest.files))
    if extra:
        raise TamperedArtifactError(
            f"{folder}: unexpected files {extra} not listed in manifest.json; remove them "
            "or rebuild the model"
        )
    return manifest


def verify_sealed(folder: Path) -> Manifest:
    """:func:`verify` plus the publisher's signed seal (:mod:`setsuna.seal`): what serving uses.

    The seal covers ``manifest.json`` itself and the model's ``config.pbtxt``,
    so a re-hashed manifest or an edited config is refused too.
    """
    from setsuna.seal import verify_version

    verify_version(folder)
    return verify(folder)
