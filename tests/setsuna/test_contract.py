"""setsuna.contract: the experiment document's writer and reader agree; the codes are fixed."""

from __future__ import annotations

import json

import pytest

from setsuna.contract import ExperimentDoc, Signal, Target, model_name
from setsuna.errors import ConfigError


def test_an_experiment_round_trips_through_its_file_text() -> None:
    doc = ExperimentDoc.single(
        "ab",
        {"treatment": Target("xgboost", 2), "control": Target("lightgbm", 1)},
        {"control": 0.5, "treatment": 0.5},
        shadow=Target("mlp", 1),
    )
    again = ExperimentDoc.loads(doc.dumps())
    assert again == doc and again.to_json() == json.loads(doc.dumps())
    assert again.arm_names == ("control", "treatment")  # sorted: bucket tables index them
    assert again.salt == "ab" and again.shadow == Target("mlp", 1)


def test_a_new_split_is_a_new_version_and_is_validated() -> None:
    v1 = ExperimentDoc.single("ab", {"a": Target("m", 1), "b": Target("n", 1)}, {"a": 1.0})
    v2 = v1.then({"a": 0.8, "b": 0.2})
    assert [v.version for v in v2.versions] == [1, 2] and v2.latest.weights["b"] == 0.2
    with pytest.raises(ConfigError, match=r"versions\[2\]: weights sum to 1.1, not 1"):
        v2.then({"a": 0.9, "b": 0.2})
    with pytest.raises(ConfigError, match=r"weights for unknown arms \['c'\]"):
        v2.then({"c": 1.0})


def test_the_reader_names_what_is_wrong() -> None:
    with pytest.raises(ConfigError, match=r"x\.json: not valid JSON"):
        ExperimentDoc.loads("{", origin="x.json")
    with pytest.raises(ConfigError, match=r"arm 'a': version 0 must be an integer >= 1"):
        ExperimentDoc.from_json(
            {
                "format": 1,
                "name": "e",
                "salt": "s",
                "arms": {"a": {"model": "m", "version": 0}},
                "versions": [{"version": 1, "weights": {"a": 1.0}}],
            }
        )


def test_signal_codes_and_model_names_are_the_wire_contract() -> None:
    assert (Signal.BUY, Signal.HOLD, Signal.SELL) == (1, 0, -1)
    assert model_name("lightgbm_v2.1", "t") == "lightgbm_v2.1"
    for bad in ("..", "a/b", "", "x" * 256):
        with pytest.raises(ConfigError, match="not a Triton model name"):
            model_name(bad, "t")
