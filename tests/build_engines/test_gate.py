from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from build_engines import gate
from build_engines.base import Candidate
from build_engines.build import choose
from setsuna.errors import ConfigError
from tests.helpers import logistic_candidate, logistic_source

FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
RNG = np.random.default_rng(0)
W = RNG.normal(size=6).astype(np.float32)
X = RNG.normal(size=(2000, 6)).astype(np.float32)


def test_an_agreeing_candidate_passes_with_its_figures(tmp_path: Path) -> None:
    src = logistic_source(W, 0.1)
    cand = logistic_candidate(tmp_path, W, 0.1)
    f = gate.judge(cand, src, X, src.reference(X), FAST)
    assert f.passed, f.reason
    assert f.identical_decisions == 1.0
    assert f.max_abs_diff < 1e-6
    assert f.p50_us > 0 and f.p99_us >= f.p50_us and f.rows_per_s_at_1024 > 0
    assert f.size_bytes == (tmp_path / "model.onnx").stat().st_size


def test_a_disagreeing_candidate_is_rejected_with_its_figures(tmp_path: Path) -> None:
    src = logistic_source(W, 0.1)
    # A shifted intercept flips the rows near the boundary: a few percent of decisions.
    cand = logistic_candidate(tmp_path, W, 0.25)
    f = gate.judge(cand, src, X, src.reference(X), FAST)
    assert not f.passed
    assert 0.9 < f.identical_decisions < 0.999
    assert "identical decisions" in f.reason
    assert np.isfinite(f.p50_us)  # a rejection still reports what was measured


def test_the_threshold_is_settable_per_model(tmp_path: Path) -> None:
    src = logistic_source(W, 0.1)
    cand = logistic_candidate(tmp_path, W, 0.25)
    lax = gate.GateSettings(min_identical_decisions=0.5, latency_calls=20, batch_budget_s=0.01)
    assert gate.judge(cand, src, X, src.reference(X), lax).passed


def test_a_broken_engine_fails_the_gate_instead_of_raising(tmp_path: Path) -> None:
    src = logistic_source(W, 0.1)
    cand = logistic_candidate(tmp_path, W, 0.1)
    (tmp_path / "model.onnx").write_bytes(b"not onnx")
    f = gate.judge(cand, src, X, src.reference(X), FAST)
    assert not f.passed and f.reason.startswith("failed")


@pytest.mark.parametrize("share", [0.0, 1.5])
def test_gate_settings_are_validated(share: float) -> None:
    with pytest.raises(ConfigError):
        gate.GateSettings(min_identical_decisions=share)


def _figures(name: str, p50: float, rps: float, passed: bool = True) -> gate.Figures:
    return gate.Figures(name, "x", 0.0, 1.0, p50, p50, p50, rps, 0.0, 1, passed)


def test_choose_picks_the_fastest_survivor_for_the_profile(tmp_path: Path) -> None:
    cands = [logistic_candidate(tmp_path / n, W, 0.1, name=n) for n in ("slow", "fast", "rejected")]
    figs = {
        "slow": _figures("slow", 30.0, 900_000.0),
        "fast": _figures("fast", 10.0, 100_000.0),
        "rejected": _figures("rejected", 1.0, 9e9, passed=False),
    }
    assert choose(cands, figs, "local", "latency") is cands[1]
    assert choose(cands, figs, "local", "throughput") is cands[0]
    assert choose([cands[2]], figs, "local", "latency") is None


def test_container_prefers_native_tree_backend(tmp_path: Path) -> None:
    from build_engines.base import ContainerSpec

    onnx = logistic_candidate(tmp_path / "o", W, 0.1, name="onnx")
    fil = Candidate(
        "fil",
        "",
        tmp_path,
        local=False,
        gate_engine="gtil",
        container=ContainerSpec("model.txt", backend="fil"),
    )
    figs = {"onnx": _figures("onnx", 5.0, 1.0), "fil": _figures("fil", float("nan"), 0.0)}
    assert choose([onnx, fil], figs, "container", "latency") is fil
    assert choose([onnx, fil], figs, "local", "latency") is onnx


def test_a_candidate_whose_decisions_depend_on_batch_mates_is_rejected(tmp_path: Path) -> None:
    from tests.helpers import batch_dependent_onnx

    src = logistic_source(W, 0.0)
    cand = logistic_candidate(tmp_path, W, 0.0)
    batch_dependent_onnx(tmp_path / "model.onnx", W)  # same folder, batch-dependent graph
    x = X - X.mean(axis=0)  # centred: in one big batch the mean shift is ~0
    f = gate.judge(cand, src, x, src.reference(x), FAST)
    assert not f.passed
    assert f.identical_decisions < 0.9  # alone, every row scores exactly 0.5


def test_within_timing_noise_the_more_faithful_survivor_wins(tmp_path: Path) -> None:
    cands = [logistic_candidate(tmp_path / n, W, 0.1, name=n) for n in ("int8", "fp32")]
    figs = {
        "int8": gate.Figures("int8", "x", 1e-2, 0.9994, 7.3, 8.0, 1.0, 2.9e6, 0.0, 1, True),
        "fp32": gate.Figures("fp32", "x", 1e-7, 1.0, 7.4, 8.0, 1.0, 1.4e6, 0.0, 1, True),
    }
    assert choose(cands, figs, "local", "latency") is cands[1]  # 1.4 % slower: a tie
    # Throughput: twice the rows/s is no tie, so speed decides.
    assert choose(cands, figs, "local", "throughput") is cands[0]
