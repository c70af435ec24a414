"""The direction rule (3-class models -> BUY/HOLD/SELL) and what decide accepts (issue 15).

No server here: the rule on hand-made rows, the thresholds files, the SDK's
DirectionPolicy, and the refusals ``ensembles.repository.write_router`` makes
before a multiclass experiment is ever served (the served side is
``tests/setsuna/test_multiclass_served.py``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ensembles import repository as rep
from ensembles import signal
from setsuna import policy
from setsuna.contract import ExperimentDoc, Target
from setsuna.errors import ConfigError, InputError

T = signal.ClassThresholds(margin=0.1, min_prob=0.4)
DFU = (0, 1, 2)  # columns of down, flat, up in ("down", "flat", "up")


def _rows(*rows: tuple[float, float, float]) -> Any:
    return np.array(rows, dtype=np.float32)


def test_the_rule_on_hand_made_rows() -> None:
    p = _rows(
        (0.10, 0.30, 0.60),  # up beats flat by 0.30: BUY, confidence 0.30
        (0.60, 0.30, 0.10),  # SELL, 0.30
        (0.20, 0.60, 0.20),  # flat wins: HOLD, confidence 0.40
        (0.25, 0.30, 0.45),  # up by 0.15 but under min_prob 0.4? no: 0.45 >= 0.4 -> BUY 0.15
        (0.30, 0.32, 0.38),  # up by only 0.06 < margin: HOLD, flat loses to up: 0
        (0.05, 0.60, 0.35),  # HOLD 0.25
    )
    code, conf = signal.decide_classes(p, T, DFU)
    assert code.tolist() == [1, -1, 0, 1, 0, 0]
    np.testing.assert_allclose(conf, [0.30, 0.30, 0.40, 0.15, 0.0, 0.25], atol=1e-6)


def test_min_prob_and_the_margin_edge() -> None:
    t = signal.ClassThresholds(margin=0.1, min_prob=0.5)
    code, _ = signal.decide_classes(_rows((0.15, 0.30, 0.55), (0.1, 0.45, 0.45)), t, DFU)
    assert code.tolist() == [1, 0]
    low = signal.ClassThresholds(margin=0.1, min_prob=0.6)
    assert signal.decide_classes(_rows((0.15, 0.30, 0.55)), low, DFU)[0].tolist() == [0]
    exact = _rows((0.2, 0.3, 0.5))  # edge 0.2 in float32 against margin 0.2: BUY (>=)
    assert signal.decide_classes(exact, signal.ClassThresholds(0.2, 0.4), DFU)[0].tolist() == [1]
    tie = _rows((0.45, 0.10, 0.45))  # margin 0: up and down tie: HOLD, never both
    assert signal.decide_classes(tie, signal.ClassThresholds(0.0, 0.1), DFU)[0].tolist() == [0]


def test_the_class_order_comes_from_the_model() -> None:
    p = _rows((0.10, 0.30, 0.60), (0.60, 0.30, 0.10))
    order = ("up", "down", "flat")
    columns = signal.direction_columns(order, "m")
    permuted = p[:, [2, 0, 1]]  # the same rows with the model's columns in that order
    a = signal.decide_classes(p, T, DFU)
    b = signal.decide_classes(permuted, T, columns)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


@pytest.mark.parametrize(
    "row",
    [(0.2, 0.2, 0.2), (np.nan, 0.5, 0.5), (-0.1, 0.6, 0.5), (0.0, 0.0, 1.2)],
    ids=["sum", "nan", "negative", "above-one"],
)
def test_rows_that_are_not_probabilities_are_refused(row: tuple[float, float, float]) -> None:
    with pytest.raises(InputError, match="row 1"):
        signal.decide_classes(_rows((0.2, 0.3, 0.5), row), T, DFU)


def test_thresholds_files(tmp_path: Path) -> None:
    f = tmp_path / signal.THRESHOLDS_FILE
    f.write_text(json.dumps({"margin": 0.05, "min_prob": 0.4}))
    assert signal.load_any_thresholds(f) == signal.ClassThresholds(0.05, 0.4)
    with pytest.raises(ConfigError, match="buy_at"):  # the signal model reads binary ones only
        signal.load_thresholds(f)
    f.write_text(json.dumps({"margin": 0.05}))
    with pytest.raises(ConfigError, match="'margin': m, 'min_prob': q"):
        signal.load_any_thresholds(f)
    f.write_text(json.dumps({"margin": 1.5, "min_prob": 0.4}))
    with pytest.raises(ConfigError, match="0 <= margin < 1"):
        signal.load_any_thresholds(f)
    f.write_text(json.dumps({"buy_at": 0.6, "sell_at": 0.4}))
    assert signal.load_any_thresholds(f) == signal.Thresholds(0.6, 0.4)


def test_direction_classes_are_required() -> None:
    with pytest.raises(ConfigError, match="not the direction classes"):
        signal.direction_columns(("0", "1", "2"), "m")
    with pytest.raises(ConfigError, match="not the direction classes"):
        policy.DirectionPolicy(3, classes=("sell", "hold", "buy"))


def test_the_sdk_policy_checks_the_model_it_reads() -> None:
    p = policy.DirectionPolicy(2, classes=("down", "flat", "up"), margin=0.1, min_prob=0.4)
    p.check_model(("down", "flat", "up"), "m:1")
    with pytest.raises(ConfigError, match="answers classes"):
        p.check_model(("up", "flat", "down"), "m:2")
    with pytest.raises(ConfigError, match="one score per row"):
        p.check_model((), "binary:1")
    out = p.decide({"score": _rows((0.1, 0.3, 0.6), (0.6, 0.3, 0.1))}, np.arange(2), np.zeros(2))
    assert out.tolist() == [1, -1] and p.stance.tolist() == [1, -1]
    cfg = {"config": {"parameters": {"class_labels": {"string_value": '["down","flat","up"]'}}}}
    assert policy.class_labels_from_config(cfg) == ("down", "flat", "up")
    assert policy.class_labels_from_config({"parameters": {}}) == ()
    with pytest.raises(ConfigError, match="class_labels"):
        policy.class_labels_from_config({"parameters": {"class_labels": {"string_value": "["}}})


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository with a direction model, a 0/1/2 model and a binary one (ONNX only)."""
    pytest.importorskip("lightgbm")
    import lightgbm as lgb

    from build_engines import gate
    from build_engines.base import Built, Source
    from build_engines.build import build_model, converter_for
    from build_engines.sources.trees import from_lightgbm
    from build_engines.spec import ModelSpec
    from tests.build_engines.test_multiclass import lgbm_source, three_class

    def onnx_only(source: Source, workdir: Path, calib: Any) -> list[Built]:
        return [b for b in converter_for(source)(source, workdir, calib) if b.name == "onnx"]

    root = tmp_path_factory.mktemp("mc-ens")
    x, y = three_class()
    fast = gate.GateSettings(latency_calls=20, batch_budget_s=0.01, row_by_row_rows=50)
    numbered = lgb.train(
        {"objective": "multiclass", "num_class": 3, "verbose": -1, "num_threads": 1},
        lgb.Dataset(x[:2000], y[:2000]),
        5,
    )
    binary = lgb.train(
        {"objective": "binary", "verbose": -1, "num_threads": 1},
        lgb.Dataset(x[:2000], (y[:2000] == 2).astype(np.int32)),
        5,
    )
    sources = {
        "direction": lgbm_source(x, y),
        "numbered": from_lightgbm(numbered, name="numbered"),
        "binary": from_lightgbm(binary, name="binary"),
    }
    for name, src in sources.items():
        build_model(
            src, x[2000:], ModelSpec(name=name, gate=fast), root, ("local",), root / "work",
            echo=False, converter=onnx_only,
        )  # fmt: skip
    return root / "local"


def _exp(tmp: Path, *models: str) -> Path:
    arms = {f"a{i}": Target(m, 1) for i, m in enumerate(models)}
    doc = ExperimentDoc.single("e", arms, {a: 1.0 / len(arms) for a in arms})
    path = tmp / "exp.json"
    path.write_text(doc.dumps())
    return path


def test_decide_over_a_direction_model_is_written_with_its_classes(
    repo: Path, tmp_path: Path
) -> None:
    from setsuna import model_config

    folder = rep.write_router(
        repo, _exp(tmp_path, "direction"), 8, name="dd", in_process=True,
        thresholds=signal.ClassThresholds(),
    )  # fmt: skip
    cfg = model_config.load(folder / "config.pbtxt", name="dd")
    score = next(o for o in cfg.output if o.name == "score")
    assert list(score.dims) == [3]
    assert json.loads(cfg.parameters["class_labels"].string_value) == ["down", "flat", "up"]
    assert json.loads((folder / "1" / signal.THRESHOLDS_FILE).read_text()) == {
        "margin": 0.05,
        "min_prob": 0.4,
    }


@pytest.mark.parametrize(
    ("models", "kwargs", "match"),
    [
        (("direction",), {"in_process": False}, "in_process=True"),
        (("direction", "binary"), {"in_process": True}, "different classes"),
        (
            ("direction",),
            {"in_process": True, "thresholds": signal.Thresholds()},
            "give \\{'margin'",
        ),
        (
            ("binary",),
            {"in_process": True, "thresholds": signal.ClassThresholds()},
            "give \\{'buy_at'",
        ),
        (
            ("numbered",),
            {"in_process": True, "thresholds": signal.ClassThresholds()},
            "not the direction classes",
        ),
    ],
    ids=["bls-router", "mixed-arms", "binary-rule", "class-rule-on-binary", "not-direction"],
)
def test_what_cannot_be_served_is_refused_with_the_reason(
    repo: Path, tmp_path: Path, models: tuple[str, ...], kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match):
        rep.write_router(repo, _exp(tmp_path, *models), 8, name="r", **kwargs)
