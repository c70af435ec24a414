"""Engines loaded into an ensemble model's own process, instead of called through BLS.

``decide`` (the router's arms) and the in-process combiner (its members) use
this: one hop from features to an answer. A BLS call is a chain of hand-offs
(stub thread, the server's message thread, its BLS pool, the core, the member's
instance thread and stub, and back) that costs 1.3-2.0x a direct call at c=1
on its own (docs/architecture.md, "What a hop costs"); an engine call in
process costs the engine's own 5-30 us.

Each version folder's seal and manifest are verified first, exactly as the
model's own Triton wrapper does, so a tampered or foreign engine is refused
here too; a folder is only ever looked up inside the repository.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from ensembles import names
from setsuna import manifest, runtime
from setsuna.contract import Target


class InProcessEngines:
    """Engines of ``repo/<model>/<version>/``, loaded once per ``model:version``."""

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.engines: dict[str, runtime.Engine] = {}

    def prepare(self, targets: Iterable[Target]) -> None:
        """Load every target not loaded yet; all or nothing."""
        fresh = {}
        for t in targets:
            if t.label in self.engines or t.label in fresh:
                continue
            folder = names.inside(self.repo, t.model, str(t.version))  # never outside the repo
            m = manifest.verify_sealed(folder)  # signed by a trusted publisher, as a stub would
            fresh[t.label] = runtime.load(m.engine, folder, m.engine_params)
        self.engines.update(fresh)

    def predict(self, target: Target, x: npt.NDArray[np.float32]) -> Any:
        return self.engines[target.label].predict(x)
