"""ensembles.selection: the budget rule with hysteresis, on hand-made measurements."""

from __future__ import annotations

import math
from typing import Any

import pytest

from ensembles import selection as sel
from setsuna.errors import ConfigError


def _spec(**kw: Any) -> sel.SelectorSpec:
    doc = {
        "format": 1,
        "family": "f",
        "budget_p99_ms": 10.0,
        "variants": [
            {"model": "accurate", "version": 1, "prior_accuracy": 0.99},
            {"model": "fast", "version": 1, "prior_accuracy": 0.95},
        ],
        "margin": 0.2,
        "min_dwell_calls": 5,
        **kw,
    }
    return sel.parse(doc)


ACC = [0.99, 0.95]


def test_starts_on_the_most_accurate_and_keeps_it_while_it_fits() -> None:
    s = _spec()
    assert sel.initial(s) == 0
    assert sel.choose(s, 0, [11.9, 1.0], ACC, 100) == 0  # within budget * (1 + margin)
    assert sel.choose(s, 0, [12.1, 1.0], ACC, 100) == 1  # over it: the one that fits


def test_no_switch_within_the_dwell_unless_the_variant_failed() -> None:
    s = _spec()
    assert sel.choose(s, 0, [50.0, 1.0], ACC, 4) == 0
    assert sel.choose(s, 0, [50.0, 1.0], ACC, 4, failed=True) == 1


def test_going_back_needs_the_lower_edge_of_the_budget() -> None:
    s = _spec()
    assert sel.choose(s, 1, [8.5, 1.0], ACC, 100) == 1  # 8.5 > 10 * 0.8: not yet
    assert sel.choose(s, 1, [7.5, 1.0], ACC, 100) == 0


def test_nothing_fits_then_the_fastest_measured() -> None:
    s = _spec()
    assert sel.choose(s, 0, [40.0, 30.0], ACC, 100) == 1
    assert sel.choose(s, 1, [40.0, 30.0], ACC, 100) == 1
    assert sel.choose(s, 1, [34.0, 40.0], ACC, 100) == 1  # 34 > 40 * 0.8: a spike, stay
    assert sel.choose(s, 0, [40.0, math.inf], ACC, 100) == 0  # unmeasured: no blind jump


def test_accuracy_blends_prior_and_outcomes() -> None:
    assert sel.accuracy(0.9, 100, 0, 0) == 0.9
    assert sel.accuracy(0.9, 100, 100, 100) == pytest.approx(0.95)
    assert sel.accuracy(0.99, 100, 0, 300) == pytest.approx(0.2475)


def test_latency_window_is_unknown_until_measured() -> None:
    lat = sel.Latency(window=20)
    for _ in range(9):
        lat.add(1.0)
    assert math.isinf(lat.p99_ms())
    lat.add(5.0)
    assert 1.0 < lat.p99_ms() <= 5.0


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"budget_p99_ms": 0}, "budget_p99_ms"),
        ({"margin": 1.5}, "margin"),
        ({"variants": [{"model": "a", "version": 1, "prior_accuracy": 0.5}]}, "at least two"),
        ({"variants": [{"model": "a", "version": 1, "prior_accuracy": 1.5}] * 2}, "prior_accuracy"),
        ({"oops": 1}, "unknown fields"),
    ],
)
def test_bad_selector_files_are_refused(kw: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        _spec(**kw)
