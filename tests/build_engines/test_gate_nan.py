"""The gate's NaN probe: every candidate of an ``allow_nan`` source, whatever converted it.

It used to live in the tree converter, so a neural or custom converter's
candidates were never asked about NaN. :func:`build_engines.build.evaluate`
now runs :func:`build_engines.gate.screen_nan` on whatever the converter
returned. Logistic ONNX models keep these fast; the real tree and neural
cases are in ``test_trees.py`` and ``test_neural.py``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from build_engines import gate
from build_engines.base import F32, Built, Candidate, Skipped, Source
from build_engines.build import evaluate
from build_engines.spec import ModelSpec
from tests.helpers import logistic_candidate, logistic_source

FAST = gate.GateSettings(latency_calls=20, batch_budget_s=0.01)
RNG = np.random.default_rng(0)
W = RNG.normal(size=6).astype(np.float32)
X = RNG.normal(size=(600, 6)).astype(np.float32)


def _imputing(source: Source) -> Source:
    """The same model, but its library scores a NaN feature as 0 (as trees often do)."""
    plain = source.reference

    def reference(x: F32) -> F32:
        return plain(np.nan_to_num(x, nan=0.0))

    return dataclasses.replace(source, reference=reference, reference_label="imputing logit")


def _evaluate(source: Source, tmp_path: Path) -> tuple[dict[str, Built], list[str]]:
    def convert(s: Source, d: Path, c: F32) -> list[Built]:
        return [logistic_candidate(d / "onnx", W, 0.0)]

    ev = evaluate(source, X, ModelSpec("m", gate=FAST), ("local",), tmp_path, converter=convert)
    built: dict[str, Built] = {s.name: s for s in ev.report.skipped}
    judged = [f.name for f in ev.report.candidates]
    return built, judged


def test_a_custom_converters_candidate_is_probed_and_skipped(tmp_path: Path) -> None:
    source = _imputing(logistic_source(W, 0.0, allow_nan=True))
    skipped, judged = _evaluate(source, tmp_path)
    assert judged == []  # never reaches the judgement
    onnx = skipped["onnx"]
    assert isinstance(onnx, Skipped)
    assert "disagrees with imputing logit on rows with NaN" in onnx.reason
    assert "NaN on one side only" in onnx.reason and "allow_nan=False" in onnx.reason
    assert not (tmp_path / "m" / "onnx").exists()  # a skipped engine leaves no files


def test_nan_where_the_source_gives_nan_agrees(tmp_path: Path) -> None:
    # numpy's logistic and the ONNX graph both propagate NaN: same handling, kept.
    skipped, judged = _evaluate(logistic_source(W, 0.0, allow_nan=True), tmp_path)
    assert judged == ["onnx"] and not skipped


def test_without_allow_nan_nothing_is_probed(tmp_path: Path) -> None:
    source = _imputing(logistic_source(W, 0.0))
    calls: list[int] = []
    plain = source.reference

    def counting(x: F32) -> F32:
        calls.append(int(np.isnan(x).sum()))
        return plain(x)

    source = dataclasses.replace(source, reference=counting)
    built = [logistic_candidate(tmp_path / "onnx", W, 0.0)]
    assert gate.screen_nan(built, source, X[:100]) == built
    assert calls == []


def test_the_probe_plants_nan_in_the_calibration_rows(tmp_path: Path) -> None:
    seen: list[F32] = []
    source = logistic_source(W, 0.0, allow_nan=True)
    plain = source.reference

    def spy(x: F32) -> F32:
        seen.append(x.copy())
        return plain(x)

    source = dataclasses.replace(source, reference=spy)
    kept = gate.screen_nan([logistic_candidate(tmp_path / "onnx", W, 0.0)], source, X)
    assert isinstance(kept[0], Candidate)
    (rows,) = seen
    assert rows.shape == (256, 6) and np.isnan(rows[0]).all()
    assert 0.1 < np.isnan(rows[1:]).mean() < 0.3
    finite = ~np.isnan(rows)
    np.testing.assert_array_equal(rows[finite], X[:256][finite])  # the rest untouched


def test_a_candidate_that_cannot_load_is_skipped_with_the_cause(tmp_path: Path) -> None:
    source = logistic_source(W, 0.0, allow_nan=True)
    cand = logistic_candidate(tmp_path / "onnx", W, 0.0)
    (cand.folder / "model.onnx").write_bytes(b"not onnx")
    (out,) = gate.screen_nan([cand], source, X)
    assert isinstance(out, Skipped) and out.reason.startswith("cannot score rows with NaN")
    assert not cand.folder.exists()


def test_skipped_entries_pass_through(tmp_path: Path) -> None:
    source = logistic_source(W, 0.0, allow_nan=True)
    skip = Skipped(name="x", reason="not here")
    assert gate.screen_nan([skip], source, X) == [skip]
