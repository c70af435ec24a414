"""The signal model: a score -> BUY / SELL / HOLD with a confidence.

Stateless and deterministic, so it may sit behind Triton's response cache.
Thresholds come from ``thresholds.json`` in the version folder, and say which
rule (:mod:`ensembles.signal`): ``buy_at``/``sell_at`` for a probability,
``margin``/``min_prob`` for down/flat/up class probabilities (input ``score``
[3], the class order in the config parameter ``class_labels``), or
``buy_above_return``/``sell_below_return`` for a predicted return. A new
threshold is a new version, and ``decided_by`` names the ``signal:version``
that decided every row. A row the rule refuses (a probability outside [0, 1],
classes not summing to 1, a non-finite return) is refused (INVALID_ARG) for
its own request only.
"""

from __future__ import annotations

import json
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
        self.thresholds = signal.load_any_thresholds(folder / signal.THRESHOLDS_FILE)
        raw = common.model_parameters(args).get("class_labels", "")
        classes = tuple(json.loads(raw)) if raw else ()
        signal.check_pairing(
            self.thresholds,
            classes,
            self.name,
            "regression" if isinstance(self.thresholds, signal.ReturnThresholds) else "",
        )
        self.columns = signal.direction_columns(classes, self.name) if classes else None
        self.label = f"{self.name}:{args['model_version']}"

    def execute(self, requests: list[Any]) -> list[Any]:
        ps = [pb_utils.get_input_tensor_by_name(r, OUTPUT_NAME).as_numpy() for r in requests]
        p = ps[0] if len(ps) == 1 else np.concatenate(ps)
        try:
            code, conf = signal.apply(p, self.thresholds, self.columns)
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
            code, conf = signal.apply(p, self.thresholds, self.columns)
        except SetsunaError as exc:
            return common.refusal(self.name, exc)
        columns = {
            SIGNAL: code.reshape(-1, 1),
            CONFIDENCE: conf.reshape(-1, 1),
            DECIDED_BY: common.constant(self.label, len(p)),
        }
        return common.answer(request, columns, slice(0, len(p)))
