"""The feedback model: realised outcomes in, running accuracy per model version out.

Trading code sends, for predictions whose outcome is now known, the
``model`` (``name:version`` a response named), the ``score`` it returned and
the ``outcome`` (1 up, 0 not). A hit is a decision (score >= threshold) that
matched the outcome. Hits and counts go to the outcomes database in one
transaction per batch (array counting, no Python per row beyond grouping by
model); the selector reads them. Outputs per row: ``accuracy`` and
``outcomes`` (the running totals of that row's model).

Config parameters: ``outcomes_db`` (required: a SQLite path, relative to the model
folder or absolute, or a ``postgresql://`` URL shared by replicas; see
:mod:`ensembles.statedb`), ``threshold`` (default 0.5).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from ensembles import outcomes as outcome_store
from ensembles.models import common
from setsuna.errors import ConfigError, InputError


class TritonPythonModel:
    def initialize(self, args: dict[str, Any]) -> None:
        self.name = args["model_name"]
        params = common.model_parameters(args)
        if not params.get("outcomes_db"):
            raise ConfigError(f"{self.name}: config parameter 'outcomes_db' is required")
        self.outcomes = outcome_store.from_config(
            Path(args["model_repository"]), params["outcomes_db"], self.name
        )
        self.threshold = float(params.get("threshold", "0.5"))

    def execute(self, requests: list[Any]) -> list[Any]:
        responses: list[Any] = [None] * len(requests)
        kept, models, scores, outcomes = [], [], [], []
        for i, r in enumerate(requests):
            m = pb_utils.get_input_tensor_by_name(r, "model").as_numpy().reshape(-1)
            s = pb_utils.get_input_tensor_by_name(r, "score").as_numpy().reshape(-1)
            o = pb_utils.get_input_tensor_by_name(r, "outcome").as_numpy().reshape(-1)
            if not (np.isfinite(s).all() and np.isin(o, (0.0, 1.0)).all()):
                exc = InputError("'score' must be finite and 'outcome' 0 or 1 on every row")
                responses[i] = common.refusal(self.name, exc)
                continue
            kept.append(i)
            models.append(m)
            scores.append(s)
            outcomes.append(o)
        if not kept:
            return responses
        m = np.concatenate(models)
        hit = (np.concatenate(scores) >= self.threshold) == (np.concatenate(outcomes) >= 0.5)
        names, inverse = np.unique(m.astype(np.bytes_), return_inverse=True)
        hits = np.bincount(inverse, weights=hit, minlength=len(names)).astype(int)
        counts = np.bincount(inverse, minlength=len(names))
        totals = self.outcomes.add(
            {n.decode(): (int(h), int(c)) for n, h, c in zip(names, hits, counts, strict=True)}
        )
        acc = np.array([totals[n.decode()][0] / totals[n.decode()][1] for n in names])
        tot = np.array([totals[n.decode()][1] for n in names], dtype=np.int64)
        row_acc = acc[inverse].astype(np.float32).reshape(-1, 1)
        row_n = tot[inverse].reshape(-1, 1)
        for i, sl in zip(kept, common.split(len(m), [len(v) for v in models]), strict=True):
            responses[i] = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("accuracy", row_acc[sl]),
                    pb_utils.Tensor("outcomes", row_n[sl]),
                ]
            )
        return responses

    def finalize(self) -> None:
        self.outcomes.close()
