"""Policies: hysteresis, cooldown (event time), position limits, repeats in one batch."""

from __future__ import annotations

import numpy as np
import pytest

from setsuna.errors import ConfigError
from setsuna.pipeline import PipelineSettings
from setsuna.policy import (
    PolicySettings,
    ReturnThresholdPolicy,
    ServedSignalPolicy,
    ThresholdPolicy,
)

MS = 1_000_000


def _run(
    policy: ThresholdPolicy | ReturnThresholdPolicy, scores: list[float], step_ms: int = 1
) -> list[int]:
    out = []
    for t, p in enumerate(scores):
        s = policy.decide(
            {"score": np.array([[p]], np.float32)}, np.array([0]), np.array([t * step_ms * MS])
        )
        out.append(int(s[0]))
    return out


def test_hysteresis_holds_a_stance_until_the_exit_level() -> None:
    pol = ThresholdPolicy(1, buy_at=0.6, sell_at=0.4, hysteresis=0.05)
    # enter long at 0.6; 0.56 is above the exit (0.55): still long; 0.54 exits to flat
    assert _run(pol, [0.59, 0.60, 0.56, 0.58, 0.54, 0.57]) == [0, 1, 0, 0, -1, 0]
    assert pol.stance[0] == 0
    # short mirrors it: enter at 0.4, stay until above 0.45, then flat
    assert _run(pol, [0.39, 0.44, 0.46]) == [-1, 0, 1]
    # without hysteresis the same path flips on every crossing
    plain = ThresholdPolicy(1, buy_at=0.6, sell_at=0.4, hysteresis=0.0)
    assert _run(plain, [0.60, 0.59, 0.60, 0.59]) == [1, -1, 1, -1]


def test_cooldown_suppresses_changes_in_event_time_and_counts_them() -> None:
    pol = ThresholdPolicy(1, buy_at=0.6, sell_at=0.4, settings=PolicySettings(cooldown_ms=10))
    got = _run(pol, [0.7, 0.3, 0.3, 0.3, 0.3], step_ms=4)  # t = 0, 4, 8, 12, 16 ms
    assert got == [1, 0, 0, -1, 0]  # the change to short waits until 10 ms after the entry
    assert pol.suppressed["cooldown"] == 2 and pol.stance[0] == -1


def test_position_limit_refuses_entries_beyond_it_in_row_order() -> None:
    pol = ThresholdPolicy(4, settings=PolicySettings(max_open_positions=2))
    ids, ts = np.arange(4), np.zeros(4, np.int64)
    s = pol.decide({"score": np.array([[0.9], [0.1], [0.9], [0.9]], np.float32)}, ids, ts)
    assert s.tolist() == [1, -1, 0, 0] and pol.suppressed["position_limit"] == 2
    # symbol 0 leaves, which makes room for symbol 3 in the same batch
    s = pol.decide({"score": np.array([[0.5], [0.1], [0.5], [0.9]], np.float32)}, ids, ts + 1)
    assert s.tolist() == [-1, 0, 0, 1] and pol.open_positions == 2


def test_a_symbol_twice_in_one_batch_is_applied_in_order() -> None:
    pol = ThresholdPolicy(2, buy_at=0.6, sell_at=0.4, hysteresis=0.0)
    ids = np.array([0, 1, 0, 0])
    scores = np.array([[0.9], [0.1], [0.5], [0.1]], np.float32)
    s = pol.decide({"score": scores}, ids, np.arange(4, dtype=np.int64))
    assert s.tolist() == [1, -1, -1, -1] and pol.stance.tolist() == [-1, -1]


def test_served_signal_is_the_wanted_stance() -> None:
    pol = ServedSignalPolicy(2)
    s = pol.decide({"signal": np.array([[1], [-1]], np.int8)}, np.arange(2), np.zeros(2, np.int64))
    assert s.tolist() == [1, -1]
    s = pol.decide({"signal": np.array([[1], [0]], np.int8)}, np.arange(2), np.ones(2, np.int64))
    assert s.tolist() == [0, 1]


def test_settings_are_validated_once() -> None:
    with pytest.raises(ConfigError):
        ThresholdPolicy(1, buy_at=0.4, sell_at=0.6)
    with pytest.raises(ConfigError):
        ThresholdPolicy(1, buy_at=0.6, sell_at=0.4, hysteresis=0.1)
    with pytest.raises(ConfigError):
        PolicySettings(cooldown_ms=-1)
    with pytest.raises(ConfigError, match="max_consecutive_failed_requests=0"):
        PipelineSettings("m", max_consecutive_failed_requests=0)
    assert PipelineSettings("m").max_consecutive_failed_requests == 50


def test_a_return_regressors_policy_trades_on_levels_in_return_units() -> None:
    pol = ReturnThresholdPolicy(
        1, buy_above_return=0.0005, sell_below_return=-0.0005, hysteresis_return=0.0002
    )
    # long at +5 bps, held down to +3 bps, flat below it; short mirrors; NaN never trades
    path = [0.0004, 0.0005, 0.00035, 0.00025, -0.0005, float("nan")]
    assert _run(pol, path) == [0, 1, 0, -1, -1, 1]
    with pytest.raises(ConfigError, match=r"0\.0005 is 5 bps"):
        ReturnThresholdPolicy(1, buy_above_return=-0.001, sell_below_return=0.001)
    with pytest.raises(ConfigError, match="exit levels do not cross"):
        ReturnThresholdPolicy(1, hysteresis_return=0.0006)
