"""build_engines.tuning.tuned: the settings file the tuner writes and the build reads."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from build_engines.spec import ServingSpec
from build_engines.tuning.tuned import TUNED_PATH, apply_knobs, load_tuned, tuned_knobs, write_tuned
from setsuna.errors import ConfigError


def test_tuned_round_trip_overrides_only_the_knobs(tmp_path: Path) -> None:
    base = dataclasses.replace(ServingSpec(), gpu_instances=3)  # not a knob: kept
    chosen = dataclasses.replace(
        ServingSpec(), max_queue_delay_us=0, preferred_batch_sizes=(), cpu_instances=1
    )
    path = tmp_path / "tuned.json"
    write_tuned(path, {"a": {"serving": tuned_knobs(chosen), "note": "x"}}, date="today")
    write_tuned(path, {"b": {"serving": tuned_knobs(ServingSpec())}})  # merges, keeps "a"
    got = load_tuned(path, base=base)
    assert set(got) == {"a", "b"}
    assert got["a"] == dataclasses.replace(chosen, gpu_instances=3)
    assert got["b"] == base
    assert load_tuned(tmp_path / "missing.json") == {}


def test_tuned_refuses_what_it_cannot_build(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="unknown serving knobs"):
        apply_knobs({"max_batch_size": 8}, ServingSpec())
    with pytest.raises(ConfigError, match="integer"):
        apply_knobs({"cpu_instances": "2"}, ServingSpec())
    with pytest.raises(ConfigError, match="cpu_instances"):
        apply_knobs({"cpu_instances": 0}, ServingSpec())  # the spec's own validation
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": 99, "models": {}}))
    with pytest.raises(ConfigError, match="format"):
        load_tuned(bad)


def test_the_committed_settings_are_found_beside_the_package() -> None:
    """Found from any working directory, and every entry builds a spec."""
    assert TUNED_PATH.parent.name == "tuning" and TUNED_PATH.is_file()
    assert load_tuned(TUNED_PATH)
