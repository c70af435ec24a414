"""Serving settings chosen by measurement, read back by the build.

``python -m build_engines.tuning`` (``make perf``) sweeps each model's Triton
config with perf_analyzer and writes, per model, the knobs it measured to be
best into ``tuned.json`` beside this module (committed and shipped with the
package, so the build finds it from any working directory). :func:`load_tuned`
turns that file into one :class:`~build_engines.spec.ServingSpec` per model:
the tuned knobs laid over a base spec (default ``ServingSpec()``), so every
knob the sweep did not measure (queue bounds, timeouts, versions) keeps the
builder's default.

Only :data:`TUNABLE` knobs may appear; a file naming anything else, or a
value the spec rejects, raises :class:`~setsuna.errors.ConfigError` rather
than building a config nobody measured. A missing file means "not tuned":
``{}``. The rest of each entry (budget, figures, host) is provenance for
humans and is not read.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from build_engines.spec import ServingSpec
from setsuna.errors import ConfigError

#: Found by the package, not the working directory: the build reads the same settings
#: wherever it runs (``python -m build_engines --tuned PATH`` overrides it).
TUNED_PATH: Final = Path(__file__).with_name("tuned.json")
FORMAT_VERSION: Final = 1
#: The knobs the sweep (:mod:`build_engines.tuning.variants`) varies.
TUNABLE: Final = (
    "dynamic_batching",
    "max_queue_delay_us",
    "preferred_batch_sizes",
    "cpu_instances",
    "response_cache",
)
_INT_KNOBS: Final = ("max_queue_delay_us", "cpu_instances")
_BOOL_KNOBS: Final = ("dynamic_batching", "response_cache")


def tuned_knobs(spec: ServingSpec) -> dict[str, Any]:
    """The :data:`TUNABLE` knobs of ``spec`` as JSON values (what ``tuned.json`` holds)."""
    out: dict[str, Any] = {}
    for name in TUNABLE:
        value = getattr(spec, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def apply_knobs(knobs: Mapping[str, Any], base: ServingSpec, *, where: str = "") -> ServingSpec:
    """``base`` with ``knobs`` (a tuned entry's ``serving``) applied, validated."""
    at = f"{where}: " if where else ""
    unknown = sorted(set(knobs) - set(TUNABLE))
    if unknown:
        raise ConfigError(
            f"{at}unknown serving knobs {unknown}; the sweep tunes only {list(TUNABLE)}. "
            "Regenerate the file with `make perf`"
        )
    changes: dict[str, Any] = {}
    for name, value in knobs.items():
        if name in _INT_KNOBS:
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{at}{name}={value!r} must be an integer")
        elif name in _BOOL_KNOBS:
            if not isinstance(value, bool):
                raise ConfigError(f"{at}{name}={value!r} must be true or false")
        elif name == "preferred_batch_sizes":
            if not isinstance(value, list) or any(
                isinstance(b, bool) or not isinstance(b, int) for b in value
            ):
                raise ConfigError(f"{at}{name}={value!r} must be a list of integers")
            value = tuple(value)
        changes[name] = value
    return dataclasses.replace(base, **changes)  # __post_init__ validates (ConfigError)


def load_tuned(
    path: Path = TUNED_PATH, *, base: ServingSpec | None = None
) -> dict[str, ServingSpec]:
    """Per model name, the tuned :class:`ServingSpec`; ``{}`` when ``path`` does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read {path}: {exc}; regenerate it with `make perf`") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        got = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ConfigError(
            f"{path} has format {got!r}, this setsuna reads {FORMAT_VERSION}; "
            "regenerate it with `make perf`"
        )
    models = data.get("models")
    if not isinstance(models, dict):
        raise ConfigError(f"{path}: 'models' must be an object of model name -> entry")
    start = ServingSpec() if base is None else base
    out: dict[str, ServingSpec] = {}
    for name, entry in models.items():
        knobs = entry.get("serving") if isinstance(entry, dict) else None
        if not isinstance(knobs, dict):
            raise ConfigError(f"{path}: model {name!r} has no 'serving' object")
        out[str(name)] = apply_knobs(knobs, start, where=f"{path} model {name!r}")
    return out


def write_tuned(path: Path, entries: Mapping[str, Mapping[str, Any]], **meta: Any) -> Path:
    """Merge ``entries`` (model -> entry with a ``serving`` object) into ``path``.

    Models already in the file and not in ``entries`` are kept, so tuning one
    model does not forget the others. ``meta`` lands at the top level.
    """
    models: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(f"cannot read {path} to merge into it: {exc}") from exc
        if isinstance(old, dict) and old.get("format") == FORMAT_VERSION:
            models = dict(old.get("models") or {})
    for name, entry in entries.items():
        apply_knobs(entry["serving"], ServingSpec(), where=f"model {name!r}")  # refuse junk
        models[name] = dict(entry)
    doc = {"format": FORMAT_VERSION, **meta, "models": dict(sorted(models.items()))}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path
