"""The signal model: probability -> BUY / SELL / HOLD with a confidence.

Stateless and deterministic, so it may sit behind Triton's response cache.
Thresholds come from ``thresholds.json`` in the version folder (``buy_at``,
``sell_at``): a new threshold is a new version, and ``decided_by`` names the
``signal:version`` that decided every row. A probability outside [0, 1] is
refused (INVALID_ARG) for its own request only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ensembles import signal
from ensembles.models import common
from setsuna.contract import CONFIDENCE, DECIDED_BY, SIGNAL
from setsuna.errors import SetsunaError
from setsuna.schema import OUTPUT_NAME


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        folder = Path(args["model_repository"]) / args["model_version"]
        self.thresholds = signal.load_thresholds(folder / signal.THRESHOLDS_FILE)
        self.label = f"{self.name}:{args['model_version']}"

    def execute(self, requests: list[Any]) -> list[Any]:
        ps = [pb_utils.get_input_tensor_by_name(r, OUTPUT_NAME).as_numpy() for r in requests]
        p = ps[0] if len(ps) == 1 else np.concatenate(ps)
        try:
            code, conf = signal.decide(p, self.thresholds)
        except SetsunaError:  # rare: find which requests hold the bad rows
            return [self._one(r, x) for r, x in zip(requests, ps, strict=True)]
        columns = {
            SIGNAL: code.reshape(-1, 1),
            CONFIDENCE: conf.reshape(-1, 1),
            DECIDED_BY: common.constant(self.label, len(p)),
        }
        spans = common.split(len(p), [len(x) for x in ps])
        return [common.answer(r, columns, sl) for r, sl in zip(requests, spans, strict=True)]

    def _one(self, request: Any, p: Any) -> Any:
        try:
            code, conf = signal.decide(p, self.thresholds)
        except SetsunaError as exc:
            return common.refusal(self.name, exc)
        columns = {
            SIGNAL: code.reshape(-1, 1),
            CONFIDENCE: conf.reshape(-1, 1),
            DECIDED_BY: common.constant(self.label, len(p)),
        }
        return common.answer(request, columns, slice(0, len(p)))
