"""The switch candidate: single-row engine below a crossover, batch engine above."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from build_engines import composite, gate
from build_engines.base import Candidate
from setsuna import runtime
from tests.helpers import logistic_candidate, logistic_onnx, logistic_source

W = np.random.default_rng(5).normal(size=4).astype(np.float32)
X = np.random.default_rng(6).normal(size=(500, 4)).astype(np.float32)
FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)


def _figures(name: str, p50: float, rps: float, passed: bool = True) -> gate.Figures:
    return gate.Figures(name, "onnxruntime", 0.0, 1.0, p50, p50, p50, rps, 0.0, 1, passed)


def _pair_inputs(tmp_path: Path, b_large: float = 0.0) -> tuple[Candidate, Candidate]:
    small = logistic_candidate(tmp_path / "small", W, 0.0, name="small")
    logistic_onnx(tmp_path / "large" / "large.onnx", W, b_large)
    large = replace(
        small,
        name="large",
        folder=tmp_path / "large",
        params={**small.params, "file": "large.onnx"},
    )
    return small, large


def test_pairs_the_single_row_and_the_batch_winner(tmp_path: Path) -> None:
    small, large = _pair_inputs(tmp_path)
    figs = {"small": _figures("small", 5.0, 100_000), "large": _figures("large", 9.0, 300_000)}
    combo = composite.pair([small, large], figs, tmp_path / "stage", X, threshold_rows=8)
    assert combo is not None and combo.engine == "switch" and combo.name == "small+large"
    assert sorted(p.name for p in combo.folder.iterdir()) == ["large.onnx", "model.onnx"]
    assert combo.params["threshold_rows"] == 8
    assert combo.container is None  # the container target cannot serve a Python switch
    src = logistic_source(W, 0.0)
    f = gate.judge(combo, src, X, src.reference(X), FAST)
    assert f.passed and f.max_abs_diff < 1e-6


def test_switch_routes_by_batch_size(tmp_path: Path) -> None:
    # Different intercepts make the two engines' outputs tell which one ran.
    small, large = _pair_inputs(tmp_path, b_large=5.0)
    figs = {"small": _figures("small", 5.0, 100_000), "large": _figures("large", 9.0, 300_000)}
    combo = composite.pair([small, large], figs, tmp_path / "stage", X, threshold_rows=4)
    assert combo is not None
    engine = runtime.load("switch", combo.folder, combo.params)
    by_small = runtime.load("onnxruntime", small.folder, small.params)
    by_large = runtime.load("onnxruntime", large.folder, large.params)
    np.testing.assert_array_equal(engine.predict(X[:3]), by_small.predict(X[:3]))
    np.testing.assert_array_equal(engine.predict(X[:4]), by_large.predict(X[:4]))


def test_no_pair_when_one_engine_wins_both_or_gains_too_little(tmp_path: Path) -> None:
    small, large = _pair_inputs(tmp_path)
    both = {"small": _figures("small", 5.0, 300_000), "large": _figures("large", 9.0, 100_000)}
    assert composite.pair([small, large], both, tmp_path / "s", X, threshold_rows=4) is None
    close = {"small": _figures("small", 5.0, 100_000), "large": _figures("large", 9.0, 110_000)}
    assert composite.pair([small, large], close, tmp_path / "s", X, threshold_rows=4) is None
    rejected = {"small": _figures("small", 5.0, 1e5), "large": _figures("large", 9, 3e5, False)}
    assert composite.pair([small, large], rejected, tmp_path / "s", X, threshold_rows=4) is None


def test_no_pair_when_files_would_collide(tmp_path: Path) -> None:
    small = logistic_candidate(tmp_path / "a", W, 0.0, name="small")
    large = logistic_candidate(tmp_path / "b", W, 0.0, name="large")  # both model.onnx
    figs = {"small": _figures("small", 5.0, 100_000), "large": _figures("large", 9.0, 300_000)}
    assert composite.pair([small, large], figs, tmp_path / "s", X, threshold_rows=4) is None
