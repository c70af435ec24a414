"""Two engines in one model: the fastest for single rows, the fastest for batches.

On the example LightGBM the tl2cgen library wins a single row (19 vs 23 us)
and lleaves wins a 1,024-row batch (132k vs 85k rows/s): no one engine is
best at both, and Triton's dynamic batcher hands a model both kinds of
batch. This engine holds both and routes each batch by its row count, at a
crossover the build measured. Both engines passed the gate on their own and
the composite is gated again as a whole.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from setsuna import runtime
from setsuna.errors import EngineError
from setsuna.runtime import F32


class SwitchEngine:
    """``small`` below ``threshold_rows`` rows, ``large`` from there on."""

    def __init__(self, small: runtime.Engine, large: runtime.Engine, threshold_rows: int) -> None:
        if threshold_rows < 2:
            raise EngineError(f"threshold_rows={threshold_rows} must be >= 2; rebuild the model")
        self._small, self._large, self._threshold = small, large, threshold_rows

    def predict(self, x: F32) -> F32:
        return (self._small if len(x) < self._threshold else self._large).predict(x)


def load(folder: Path, params: Mapping[str, Any]) -> SwitchEngine:
    try:
        small, large = params["small"], params["large"]
        return SwitchEngine(
            runtime.load(str(small["engine"]), folder, small["params"]),
            runtime.load(str(large["engine"]), folder, large["params"]),
            int(params["threshold_rows"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise EngineError(f"malformed switch params {dict(params)}: {exc}; rebuild") from exc
