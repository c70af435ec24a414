"""The wire contract: what every setsuna model, ensemble and caller agree on, in one place.

- **Tensor names.** Every engine takes ``features`` (float32 ``[N, ...]``) and
  answers ``score`` (float32 ``[N, 1]``, a probability for classifiers; for a
  multiclass classifier ``[N, C]``, its class probabilities in the order its
  manifest's ``classes`` and its config's ``class_labels`` parameter give); the
  routed and deciding models add ``key`` (BYTES, the sticky key) and answer
  ``arm``, ``model`` (``name:version`` of the engine that scored the row),
  ``experiment_version``, ``instance`` (by name only), and with thresholds
  ``signal``, ``confidence`` and ``decided_by`` (``name:version`` of the model
  whose thresholds decided: a ``signal`` or ``decide`` version); the combiner
  answers ``models`` (every member).
- **Signal codes.** :class:`Signal`: BUY 1, HOLD 0, SELL -1, as int8 on the wire.
- **Model names and versions.** :func:`model_name` (Triton's rule, and a
  folder name) and :class:`Target` (a model and the version that answers:
  versions are pinned, never "latest").
- **The experiment document** (``experiment.json`` beside a router):
  :class:`ExperimentDoc` reads (:meth:`ExperimentDoc.from_json`, which
  validates the whole document) and writes (:meth:`ExperimentDoc.to_json`) it,
  so no caller builds or parses the dict by hand. How keys are assigned to
  arms from it is the router's business (``ensembles.experiment``).

Only the standard library and :mod:`setsuna.errors`: the SDK, the build and
the ensembles all import this.
"""

from __future__ import annotations

import json
import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Final

from setsuna.errors import ConfigError

# -- tensor names ------------------------------------------------------------------------

FEATURES: Final = "features"
SCORE: Final = "score"
KEY: Final = "key"
SIGNAL: Final = "signal"
CONFIDENCE: Final = "confidence"
MODEL: Final = "model"
MODELS: Final = "models"
ARM: Final = "arm"
EXPERIMENT_VERSION: Final = "experiment_version"
DECIDED_BY: Final = "decided_by"
INSTANCE: Final = "instance"


class Signal(IntEnum):
    """A decision's code on the wire (int8) and in the audit log."""

    SELL = -1
    HOLD = 0
    BUY = 1


# -- model names and versions -----------------------------------------------------------

#: A model name is a directory name: NAME_MAX on Linux.
MAX_NAME_BYTES: Final = 255
_CHARS: Final = frozenset(string.ascii_letters + string.digits + "_-.")


def model_name(value: object, what: str) -> str:
    """``value`` if it is a model name Triton and the repository accept; else ConfigError.

    Letters, digits, ``_``, ``-`` and ``.``; not ``.`` or ``..``; at most
    :data:`MAX_NAME_BYTES`. A name is also a folder of the model repository,
    so one that breaks the rule is refused with its file, never looked up.
    """
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


@dataclass(frozen=True)
class Target:
    """A model and the version of it that answers (versions are pinned, never 'latest')."""

    model: str
    version: int

    @property
    def label(self) -> str:
        """``model:version``, the name every response carries."""
        return f"{self.model}:{self.version}"

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "version": self.version}

    @classmethod
    def from_json(cls, raw: Any, what: str) -> Target:
        if not isinstance(raw, Mapping) or set(raw) - {"model", "version"}:
            raise ConfigError(f"{what}: give {{'model': NAME, 'version': N}}, got {raw!r}")
        model, version = model_name(raw.get("model"), what), raw.get("version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise ConfigError(
                f"{what}: version {version!r} must be an integer >= 1 (arms pin the version "
                "that answers, so the response can name it)"
            )
        return cls(model, version)


# -- the experiment document --------------------------------------------------------------

EXPERIMENT_FORMAT: Final = 1
#: Its name in a router's model folder.
EXPERIMENT_FILE: Final = "experiment.json"
_WEIGHT_TOLERANCE: Final = 1e-6


@dataclass(frozen=True)
class ExperimentVersion:
    """One step of an experiment: each arm's share of the keys from this version on."""

    version: int
    weights: Mapping[str, float]


@dataclass(frozen=True)
class ExperimentDoc:
    """An experiment file, validated: arms pinned to model versions, versions oldest first.

    ::

        {"format": 1, "name": "trees-ab", "salt": "trees-ab-2026-11",
         "arms": {"control": {"model": "lightgbm", "version": 1},
                  "treatment": {"model": "xgboost", "version": 1}},
         "shadow": {"model": "mlp", "version": 1},
         "versions": [{"version": 1, "weights": {"control": 0.5, "treatment": 0.5}}]}

    Every version is kept (the router replays them to move the fewest keys
    per change); a new split is a new version appended (:meth:`then`).
    """

    name: str
    salt: str
    arms: Mapping[str, Target]
    versions: tuple[ExperimentVersion, ...]
    shadow: Target | None = None
    #: Arm names, sorted: an arm's index in a bucket table is its position here.
    arm_names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "arm_names", tuple(sorted(self.arms)))

    @classmethod
    def single(
        cls,
        name: str,
        arms: Mapping[str, Target],
        weights: Mapping[str, float],
        *,
        salt: str | None = None,
        shadow: Target | None = None,
    ) -> ExperimentDoc:
        """Version 1 of an experiment (validated): the usual way to start one."""
        doc = cls(name, salt or name, dict(arms), (ExperimentVersion(1, dict(weights)),), shadow)
        return cls.from_json(doc.to_json(), origin=f"experiment {name!r}")

    def then(self, weights: Mapping[str, float]) -> ExperimentDoc:
        """This experiment with one more version: ``weights`` from now on (validated)."""
        step = ExperimentVersion(self.latest.version + 1, dict(weights))
        doc = ExperimentDoc(self.name, self.salt, self.arms, (*self.versions, step), self.shadow)
        return ExperimentDoc.from_json(doc.to_json(), origin=f"experiment {self.name!r}")

    @property
    def latest(self) -> ExperimentVersion:
        return self.versions[-1]

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "format": EXPERIMENT_FORMAT,
            "name": self.name,
            "salt": self.salt,
            "arms": {a: t.to_json() for a, t in self.arms.items()},
            "versions": [{"version": v.version, "weights": dict(v.weights)} for v in self.versions],
        }
        if self.shadow is not None:
            doc["shadow"] = self.shadow.to_json()
        return doc

    def dumps(self) -> str:
        """The file's text (what ``experiment.json`` should hold)."""
        return json.dumps(self.to_json(), indent=2) + "\n"

    @classmethod
    def from_json(cls, doc: Any, *, origin: str = "experiment") -> ExperimentDoc:
        """Validate a whole document; ConfigError says what is wrong and where."""
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{origin}: expected a JSON object")
        if doc.get("format") != EXPERIMENT_FORMAT:
            raise ConfigError(
                f"{origin}: 'format' must be {EXPERIMENT_FORMAT}, got {doc.get('format')!r}"
            )
        unknown = set(doc) - {"format", "name", "salt", "arms", "shadow", "versions"}
        if unknown:
            raise ConfigError(f"{origin}: unknown fields {sorted(unknown)}")
        name, salt = doc.get("name"), doc.get("salt")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{origin}: 'name' must be a non-empty string")
        if not isinstance(salt, str) or not salt:
            raise ConfigError(f"{origin}: 'salt' must be a non-empty string")
        raw_arms = doc.get("arms")
        if not isinstance(raw_arms, Mapping) or not raw_arms:
            raise ConfigError(f"{origin}: 'arms' must map arm names to {{model, version}}")
        arms = {
            str(a): Target.from_json(raw_arms[a], f"{origin}: arm {a!r}")
            for a in sorted(raw_arms, key=str)
        }
        shadow_raw = doc.get("shadow")
        shadow = None if shadow_raw is None else Target.from_json(shadow_raw, f"{origin}: shadow")
        raw_versions = doc.get("versions")
        if not isinstance(raw_versions, list) or not raw_versions:
            raise ConfigError(f"{origin}: 'versions' must be a non-empty list, oldest first")
        versions = []
        last = 0
        for i, v in enumerate(raw_versions):
            at = f"{origin}: versions[{i}]"
            if not isinstance(v, Mapping) or set(v) != {"version", "weights"}:
                raise ConfigError(f"{at}: give exactly {{'version': N, 'weights': {{arm: share}}}}")
            number = v["version"]
            if not isinstance(number, int) or isinstance(number, bool) or number <= last:
                raise ConfigError(f"{at}: version {number!r} must be an integer > {last}")
            versions.append(ExperimentVersion(number, _weights(v["weights"], arms, at)))
            last = number
        return cls(name, salt, arms, tuple(versions), shadow)

    @classmethod
    def loads(cls, text: str | bytes, *, origin: str = "experiment") -> ExperimentDoc:
        try:
            doc = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{origin}: not valid JSON ({exc})") from None
        return cls.from_json(doc, origin=origin)


def _weights(w: Any, arms: Mapping[str, Target], at: str) -> dict[str, float]:
    if not isinstance(w, Mapping) or not w:
        raise ConfigError(f"{at}: 'weights' must map arms to shares")
    stray = sorted(set(w) - set(arms))
    if stray:
        raise ConfigError(f"{at}: weights for unknown arms {stray}; arms: {list(arms)}")
    values = [w[a] for a in w]
    if any(
        not isinstance(x, int | float) or isinstance(x, bool) or not math.isfinite(x) or x < 0
        for x in values
    ):
        raise ConfigError(f"{at}: weights must be finite numbers >= 0, got {dict(w)}")
    total = float(sum(values))
    if abs(total - 1.0) > _WEIGHT_TOLERANCE:
        raise ConfigError(f"{at}: weights sum to {total:g}, not 1")
    return {a: float(w.get(a, 0.0)) for a in arms}
