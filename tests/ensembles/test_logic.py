"""ensembles.signal, ensembles.members and ensembles.watch: the array logic, no server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from ensembles import members, signal
from ensembles.watch import Watched
from setsuna.errors import ConfigError, InputError

T = signal.Thresholds(buy_at=0.6, sell_at=0.4)


def test_signal_zones_and_confidence() -> None:
    p = np.array([0.0, 0.4, 0.45, 0.5, 0.55, 0.6, 0.8, 1.0], dtype=np.float32)
    code, conf = signal.decide(p, T)
    assert code.tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    np.testing.assert_allclose(conf, [1.0, 0.0, 0.5, 1.0, 0.5, 0.0, 0.5, 1.0], atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, -0.01, 1.5, np.inf])
def test_signal_refuses_what_is_not_a_probability(bad: float) -> None:
    with pytest.raises(InputError, match="outside \\[0, 1\\]"):
        signal.decide(np.array([0.5, bad], dtype=np.float32), T)


def test_thresholds_are_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="0 < sell_at < buy_at < 1"):
        signal.Thresholds(buy_at=0.4, sell_at=0.6)
    f = tmp_path / "thresholds.json"
    f.write_text(json.dumps({"buy_at": 0.7}))
    with pytest.raises(ConfigError, match="give exactly"):
        signal.load_thresholds(f)
    f.write_text(json.dumps(T.to_json()))
    assert signal.load_thresholds(f) == T


def _members(method: str = "mean", **extra: object) -> dict[str, object]:
    return {
        "format": 1,
        "method": method,
        "members": [
            {"model": "alpha", "version": 1, "weight": 3.0},
            {"model": "beta", "version": 2, "weight": 1.0},
        ],
        **extra,
    }


def test_mean_and_logit_stacking_by_hand() -> None:
    a = np.array([[0.2], [0.9]], dtype=np.float32)
    b = np.array([[0.6], [0.5]], dtype=np.float32)
    m = members.parse(_members())
    np.testing.assert_allclose(m.combine([a, b]), 0.75 * a + 0.25 * b, rtol=1e-6)
    assert m.label == "alpha:1,beta:2"
    s = members.parse(_members("logit", bias=-0.5))
    logit = lambda p: np.log(p / (1 - p))  # noqa: E731
    want = 1 / (1 + np.exp(-(-0.5 + 3 * logit(a.astype(float)) + logit(b.astype(float)))))
    np.testing.assert_allclose(s.combine([a, b]), want, rtol=1e-6)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ({**_members(), "members": _members()["members"][:1]}, "at least two"),  # type: ignore[index]
        (_members(bias=1.0), "'logit' only"),
        (_members("median"), "not one of"),
        ({**_members(), "members": [_members()["members"][0]] * 2}, "listed twice"),  # type: ignore[index]
    ],
)
def test_bad_member_files_are_refused(doc: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        members.parse(doc)


def test_watched_file_keeps_the_last_good_copy(tmp_path: Path) -> None:
    f = tmp_path / "members.json"
    f.write_text(json.dumps(_members()))
    w = Watched(f, members.loads)
    assert w.poll() == []  # unchanged: no reload
    f.write_text("{broken")
    os.utime(f, ns=(1, 1))
    (change,) = w.poll()
    assert not change.took_effect and "not JSON" in change.refused and w.failures == 1
    assert w.current.label == "alpha:1,beta:2"  # still serving the previous file
    doc = _members()
    doc["members"][1]["version"] = 3  # type: ignore[index]
    f.write_text(json.dumps(doc))
    (change,) = w.poll()
    assert change.took_effect and change.refused == "" and w.current.label == "alpha:1,beta:3"
