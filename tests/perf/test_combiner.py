"""perf/combiner.py's arithmetic: the slowest member per round, the ratios, the verdicts."""

from __future__ import annotations

from perf import combiner as pc

MEMBERS = ("lightgbm", "xgboost", "mlp")


def _f(p50: float, p99: float, infer_s: float, stalls: int = 0) -> pc.Figures:
    return pc.Figures(p50, p99, infer_s, requests=1000, stalls=stalls)


def _round(combiner: tuple[float, float, float]) -> dict[str, dict[int, pc.Figures]]:
    return {
        "lightgbm": {1: _f(0.40, 1.0, 0), 32: _f(0, 0, 4000)},
        "xgboost": {1: _f(0.50, 2.0, 0), 32: _f(0, 0, 5000)},
        "mlp": {1: _f(0.30, 4.0, 0), 32: _f(0, 0, 3000)},
        pc.COMBINER: {1: _f(combiner[0], combiner[1], 0), 32: _f(0, 0, combiner[2], stalls=1)},
    }


def test_the_slowest_member_is_chosen_per_figure() -> None:
    d = pc._ratios(_round((1.0, 3.0, 1800)), MEMBERS, pc.COMBINER)
    assert d["c1_slowest"] == "xgboost"  # the highest c=1 p50, not the highest p99
    assert d["c1_p50_ratio"] == 2.0 and d["c1_p99_ratio"] == 1.5
    assert d["c32_slowest"] == "mlp" and d["c32_share"] == 0.6


def test_a_failed_run_leaves_that_ratio_out() -> None:
    r = _round((1.0, 3.0, 1800))
    del r["mlp"][32]
    d = pc._ratios(r, MEMBERS, pc.COMBINER)
    assert "c32_share" not in d and "c1_p50_ratio" in d


def test_verdicts_take_the_worst_round_and_skip_the_floors() -> None:
    rounds = [_round((0.9, 3.0, 1600)), _round((1.1, 3.0, 1400))]
    for r in rounds:
        r["bls_floor"] = r[pc.COMBINER]
    report = pc._report(rounds, MEMBERS, (pc.COMBINER, "bls_floor"))
    assert report["checks"] == [
        "MISS  combiner c=1 p50 <= 2x its slowest member: 1.80-2.20x over 2 rounds (p99 1.50x)",
        "MISS  combiner c=32 > 50% of its slowest member's throughput: 47-53 % over 2 rounds",
    ]
    assert "| combiner | 0.90-1.10 | 3.00 | 1,400-1,600 | 2 / 4,000 |" in report["table"]
