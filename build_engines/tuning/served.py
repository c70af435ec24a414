"""A built model and the ``config.pbtxt`` each variant serves it with.

The sweep serves copies of a model built by ``python -m build_engines`` that
differ only in ``config.pbtxt``, written by the builder's own
:func:`~build_engines.repository.build_config` from the model's manifest: the
tuner measures exactly the configs the builder would write.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format

from build_engines.base import Candidate
from build_engines.repository import VERSION, build_config
from build_engines.spec import ModelSpec
from build_engines.tuning.variants import Variant
from setsuna import manifest, model_config
from setsuna.errors import ConfigError
from setsuna.schema import FeatureSchema


@dataclass(frozen=True)
class ServedModel:
    """A model folder of the built (local-target) repository and its manifest."""

    name: str
    version_dir: Path
    manifest: manifest.Manifest

    @classmethod
    def load(cls, repo: Path, name: str) -> ServedModel:
        version_dir = repo / name / str(VERSION)
        m = manifest.verify(version_dir)
        if m.model != name:
            raise ConfigError(f"{version_dir}: manifest names model {m.model!r}, not {name!r}")
        return cls(name=name, version_dir=version_dir, manifest=m)

    @property
    def schema(self) -> FeatureSchema:
        return self.manifest.schema

    def config_text(self, variant: Variant) -> str:
        """``config.pbtxt`` for ``variant``, built by the builder's own build_config."""
        m = self.manifest
        candidate = Candidate(
            name=m.candidate,
            engine=m.engine,
            folder=self.version_dir,
            params=dict(m.engine_params),
            local=True,
        )
        spec = ModelSpec(name=self.name, serving=variant.serving)
        cfg = build_config(spec, m.schema.row_shape, candidate, "local")
        text = str(text_format.MessageToString(cfg))
        model_config.parse(text)
        return text

    def stage(self, repo: Path) -> Path:
        """Copy the version folder into ``repo/<name>/`` (configs are written per variant)."""
        dest = repo / self.name
        if dest.exists():
            shutil.rmtree(dest)
        shutil.copytree(
            self.version_dir, dest / str(VERSION), ignore=shutil.ignore_patterns("__pycache__")
        )
        return dest

    def config_drift(self, default: Variant) -> str:
        """Whether the built repository's config differs from what ServingSpec() builds now."""
        path = self.version_dir.parent / model_config.CONFIG_NAME
        try:
            built = model_config.parse(path.read_text())
        except (OSError, ConfigError) as exc:
            return f"cannot read {path}: {exc}"
        now = model_config.parse(self.config_text(default))
        if built == now:
            return ""
        return (
            f"{path} differs from what build_config(ServingSpec()) writes now "
            "(built before a spec change?); the sweep uses the latter; `make build-engines` "
            "to rebuild"
        )
