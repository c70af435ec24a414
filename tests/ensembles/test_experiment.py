"""ensembles.experiment: sticky, weighted, minimal-movement bucketing, and file validation."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ensembles import experiment as ex
from setsuna.errors import ConfigError

ARMS = {
    "a": {"model": "alpha", "version": 1},
    "b": {"model": "beta", "version": 1},
    "c": {"model": "gamma", "version": 2},
}


def _doc(*weights: dict[str, float], salt: str = "s") -> dict[str, Any]:
    return {
        "format": 1,
        "name": "t",
        "salt": salt,
        "arms": copy.deepcopy(ARMS),
        "versions": [{"version": i + 1, "weights": w} for i, w in enumerate(weights)],
    }


KEYS = [f"acct-{i}" for i in range(10_000)]


def test_split_is_within_a_binomial_bound() -> None:
    e = ex.parse(_doc({"a": 0.2, "b": 0.3, "c": 0.5}))
    counts = np.bincount(e.assign(KEYS), minlength=3)
    for arm, share in zip(e.arms, (0.2, 0.3, 0.5), strict=True):
        n, sd = len(KEYS), math.sqrt(len(KEYS) * share * (1 - share))
        assert abs(counts[e.arm_index(arm)] - n * share) <= 4 * sd, (arm, counts)


def test_assignment_is_stable_and_salted() -> None:
    doc = _doc({"a": 0.5, "b": 0.5})
    first, again = ex.parse(doc).assign(KEYS), ex.parse(copy.deepcopy(doc)).assign(KEYS)
    np.testing.assert_array_equal(first, again)  # no process state: same on restart
    other = ex.parse(_doc({"a": 0.5, "b": 0.5}, salt="t")).assign(KEYS)
    assert 0.4 < np.mean(first != other) < 0.6  # a new salt reshuffles everyone
    e = ex.parse(doc)
    assert e.assign([b"acct-7"])[0] == e.assign(["acct-7"])[0]  # bytes == str


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.integers(0, 100), min_size=3, max_size=3).filter(lambda w: sum(w) > 0),
    st.lists(st.integers(0, 100), min_size=3, max_size=3).filter(lambda w: sum(w) > 0),
)
def test_a_weight_change_moves_only_the_keys_it_must(old: list[int], new: list[int]) -> None:
    w0 = {a: x / sum(old) for a, x in zip("abc", old, strict=True)}
    w1 = {a: x / sum(new) for a, x in zip("abc", new, strict=True)}
    before, after = ex.parse(_doc(w0)), ex.parse(_doc(w0, w1))
    q0, q1 = ex.quotas(w0, before.arms), ex.quotas(w1, after.arms)
    moved = before.table != after.table
    assert int(moved.sum()) == int(np.maximum(q1 - q0, 0).sum())  # the minimum
    np.testing.assert_array_equal(np.bincount(after.table, minlength=3), q1)
    # every moved bucket leaves an arm that shrank for one that grew
    assert all(q1[f] < q0[f] for f in before.table[moved])
    assert all(q1[t] > q0[t] for t in after.table[moved])


def test_unchanged_weights_move_nothing_across_versions() -> None:
    w = {"a": 0.3, "b": 0.7}
    np.testing.assert_array_equal(ex.parse(_doc(w)).table, ex.parse(_doc(w, w, w)).table)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format=2), "'format' must be 1"),
        (lambda d: d.update(salt=""), "'salt'"),
        (lambda d: d["versions"][0]["weights"].update(a=0.7), "sum to 1.2"),
        (lambda d: d["versions"][0]["weights"].update(z=0.0), "unknown arms"),
        (lambda d: d["versions"][0]["weights"].update(a=-0.5, b=1.5), ">= 0"),
        (lambda d: d["versions"].append(d["versions"][0]), "must be an integer > 1"),
        (lambda d: d["arms"]["a"].pop("version"), "version None"),
        (lambda d: d["arms"]["a"].update(model="Bad Name"), "not a Triton model name"),
        (lambda d: d.update(extra=1), "unknown fields"),
    ],
)
def test_bad_files_are_refused_with_the_reason(mutate: Any, message: str) -> None:
    doc = _doc({"a": 0.5, "b": 0.5})
    mutate(doc)
    with pytest.raises(ConfigError, match=message):
        ex.parse(doc)


def test_load_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "exp.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match=r"exp\.json is not JSON"):
        ex.load(bad)
    bad.write_text(json.dumps(_doc({"a": 1.0})))
    assert ex.load(bad).version == 1
    with pytest.raises(ConfigError, match="unknown arm 'zz'"):
        ex.load(bad).arm_index("zz")
