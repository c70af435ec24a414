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
from setsuna.errors import EngineError


class InProcessEngines:
    """Engines of ``repo/<model>/<version>/``, loaded once per ``model:version``.

    Only the engines the file in force names are kept, plus those of the file
    before it (a batch that began under the old file finishes with its
    engines): a model that sees a new version published every day does not
    keep every engine it ever loaded.
    """

    def __init__(self, repo: Path) -> None:
        self.repo = repo
        self.engines: dict[str, runtime.Engine] = {}
        self._previous: dict[str, runtime.Engine] = {}

    def prepare(self, targets: Iterable[Target]) -> None:
        """Hold exactly ``targets`` (and the previous set); load what is new. All or nothing."""
        wanted = {t.label: t for t in targets}
        fresh = {}
        for label, t in wanted.items():
            if label in self.engines or label in self._previous:
                continue
            folder = names.inside(self.repo, t.model, str(t.version))  # never outside the repo
            m = manifest.verify_sealed(folder)  # signed by a trusted publisher, as a stub would
            fresh[label] = runtime.load(m.engine, folder, m.engine_params)
        held = {**self._previous, **self.engines, **fresh}
        current = {label: held[label] for label in wanted}
        if current.keys() != self.engines.keys():
            self._previous = self.engines
        self.engines = current  # one assignment: a reader sees the old dict or the new one

    def predict(self, target: Target, x: npt.NDArray[np.float32]) -> Any:
        engine = self.engines.get(target.label) or self._previous.get(target.label)
        if engine is None:
            raise EngineError(
                f"{target.label} was released: its file changed twice during this batch; retry"
            )
        return engine.predict(x)
