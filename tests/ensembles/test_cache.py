"""The routers' answer cache without a server: keys, expiry, the byte cap, the settings."""

from __future__ import annotations

import numpy as np
import pytest

from ensembles.cache import ENTRY_OVERHEAD_BYTES, ScoreCache, row_keys
from ensembles.limits import Limits
from setsuna.errors import ConfigError

RNG = np.random.default_rng(3)
X = RNG.normal(size=(8, 6)).astype(np.float32)
KEYS = row_keys(X).tolist()
SCORES = RNG.uniform(size=(8, 1)).astype(np.float32)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_row_keys_are_the_rows_bytes_trailing_zeros_and_signed_zero_included() -> None:
    x = np.array([[1.0, 0.0], [0.0, 0.0], [-0.0, 0.0]], dtype=np.float32)
    got = row_keys(x).tolist()
    assert got == [row.tobytes() for row in x]
    assert all(len(k) == 8 for k in got)
    assert got[1] != got[2]  # -0.0 is another row: a miss, never a wrong answer
    view = x[::2]  # not contiguous: copied, same bytes
    assert row_keys(view).tolist() == [x[0].tobytes(), x[2].tobytes()]


def test_a_stored_row_is_a_hit_with_its_score_and_others_miss() -> None:
    c = ScoreCache(1 << 20, 1000)
    exp = object()
    hit, got = c.lookup(exp, "alpha:1", KEYS[:4])
    assert not hit.any() and len(got) == 0 and (c.hits, c.misses) == (0, 4)
    c.store(exp, "alpha:1", KEYS[:4], SCORES[:4])
    hit, got = c.lookup(exp, "alpha:1", KEYS[2:6])  # two held, two not
    assert hit.tolist() == [True, True, False, False]
    np.testing.assert_array_equal(got, SCORES[2:4].reshape(-1))
    assert (c.hits, c.misses) == (2, 6)
    # another arm (model:version) is another key, even for the same row
    hit, _ = c.lookup(exp, "alpha:2", KEYS[:4])
    assert not hit.any()


def test_another_experiment_drops_everything_and_a_late_answer_is_not_stored() -> None:
    c = ScoreCache(1 << 20, 1000)
    v1, v2 = object(), object()
    c.lookup(v1, "alpha:1", KEYS)
    c.store(v1, "alpha:1", KEYS, SCORES)
    assert c.lookup(v1, "alpha:1", KEYS)[0].all()
    assert not c.lookup(v2, "alpha:1", KEYS)[0].any()  # v2 took effect: nothing older
    assert len(c) == 0 and c.bytes == 0
    c.store(v1, "alpha:1", KEYS, SCORES)  # a batch of v1 that finished after the switch
    assert len(c) == 0 and not c.lookup(v2, "alpha:1", KEYS)[0].any()


def test_an_entry_is_served_until_its_ttl_and_then_computed_again() -> None:
    clock = Clock()
    c = ScoreCache(1 << 20, 250, clock=clock)
    exp = object()
    c.lookup(exp, "m:1", KEYS[:1])
    c.store(exp, "m:1", KEYS[:1], SCORES[:1])
    clock.now += 0.2499
    assert c.lookup(exp, "m:1", KEYS[:1])[0].tolist() == [True]
    clock.now += 0.0001  # exactly ttl after it was stored: expired
    assert c.lookup(exp, "m:1", KEYS[:1])[0].tolist() == [False]
    c.store(exp, "m:1", KEYS[:1], SCORES[1:2])  # stored again, with a fresh expiry
    hit, got = c.lookup(exp, "m:1", KEYS[:1])
    assert hit.tolist() == [True] and got.tolist() == [SCORES[1, 0]]


def test_the_byte_cap_holds_through_a_flood_of_distinct_rows() -> None:
    cap = 64 << 10
    c = ScoreCache(cap, 60_000)
    exp = object()
    size = 6 * 4 + ENTRY_OVERHEAD_BYTES
    for _ in range(100):
        x = RNG.normal(size=(200, 6)).astype(np.float32)
        k = row_keys(x).tolist()
        c.lookup(exp, "m:1", k)
        c.store(exp, "m:1", k, np.zeros(200, np.float32))
        assert c.bytes <= cap and c.bytes == len(c) * size
    assert c.clears >= 100 * 200 * size // cap - 1
    assert cap - 200 * size < c.peak <= cap
    assert len(c._score) <= cap // size  # the arrays never outgrow what may be held


def test_a_batch_larger_than_the_whole_cache_keeps_what_fits() -> None:
    size = 6 * 4 + ENTRY_OVERHEAD_BYTES
    c = ScoreCache(3 * size, 60_000)
    exp = object()
    c.store(exp, "m:1", KEYS, SCORES)  # not bound yet: nothing
    c.lookup(exp, "m:1", KEYS)
    c.store(exp, "m:1", KEYS, SCORES)
    assert c.lookup(exp, "m:1", KEYS)[0].tolist() == [True] * 3 + [False] * 5
    assert c.bytes == 3 * size
    tiny = ScoreCache(size - 1, 60_000)  # not one row fits
    tiny.lookup(exp, "m:1", KEYS)
    tiny.store(exp, "m:1", KEYS, SCORES)
    assert len(tiny) == 0


@pytest.mark.parametrize(("max_bytes", "ttl_ms"), [(0, 1000.0), (1 << 20, 0.0)])
def test_zero_turns_it_off(max_bytes: int, ttl_ms: float) -> None:
    c = ScoreCache(max_bytes, ttl_ms)
    assert not c.on
    c.lookup(None, "m:1", KEYS)
    c.store(None, "m:1", KEYS, SCORES)
    assert len(c) == 0


def test_the_settings_are_config_parameters_with_units_validated_once() -> None:
    lim = Limits.from_parameters({"cache_max_bytes": "1048576", "cache_ttl_ms": "250"}, "decide")
    assert (lim.cache_max_bytes, lim.cache_ttl_ms) == (1 << 20, 250.0)
    assert Limits.from_parameters(lim.parameters(), "decide") == lim
    assert Limits().cache_max_bytes == 0  # off unless a model turns it on
    with pytest.raises(ConfigError, match=r"decide: config parameter cache_max_bytes='1M'"):
        Limits.from_parameters({"cache_max_bytes": "1M"}, "decide")
    with pytest.raises(ConfigError, match=r"cache_max_bytes=-1: give a whole number of bytes"):
        Limits(cache_max_bytes=-1)
    with pytest.raises(ConfigError, match=r"cache_max_bytes=1.5: give a whole number"):
        Limits(cache_max_bytes=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"cache_ttl_ms=-1.0: give milliseconds"):
        Limits(cache_ttl_ms=-1.0)
    with pytest.raises(ConfigError, match=r"cache_ttl_ms=nan"):
        Limits(cache_ttl_ms=float("nan"))
