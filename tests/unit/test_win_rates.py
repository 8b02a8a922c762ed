"""Judged-evaluation statistics on hand-worked cases: ties ½, the length-controlled fit, bootstrap intervals."""

from __future__ import annotations

import math

import pytest

from prefopt.errors import DataError
from prefopt.mathloop.judging.win_rates import (
    judged_stats,
    length_controlled_win_rate,
    length_feature,
    preference_from_scores,
    win_rate,
)


def test_win_rate_counts_ties_half():
    assert win_rate([1, 0.5, 0, 1]) == 0.625
    assert [preference_from_scores(*s) for s in [(2.0, 1.0), (1.0, 1.0), (0.5, 1.0)]] == [1.0, 0.5, 0.0]


def test_equal_lengths_leave_the_win_rate_as_it_is():
    # no length difference: the length term is 0 and sigmoid(a) is the mean preference (up to the 1e-4 ridge)
    assert length_feature([5, 7], [5, 7]).tolist() == [0.0, 0.0]
    assert length_controlled_win_rate([1, 1, 0, 0.5], [10] * 4, [10] * 4) == pytest.approx(0.625, abs=1e-3)


def test_length_controlled_win_rate_hand_worked():
    # 8 prompts where the policy is 10 characters longer (7 wins, 1 loss) and 2 where it is 10 shorter (a tie
    # and a loss). Δ = +10 x8, -10 x2: mean 6, σ = sqrt(100 - 36) = 8, so x = ±tanh(1.25). Two distinct x
    # values make the model saturated: sigmoid(a + b x) = 7/8 and sigmoid(a - b x) = 1/4, so
    # a = (ln 7 + ln(1/3)) / 2 = 0.423649 and the LC win rate is sigmoid(a) = 0.604356; the raw win rate is 0.75.
    prefs = [1] * 7 + [0] + [0.5, 0]
    policy = [20] * 8 + [0] * 2
    baseline = [10] * 8 + [10] * 2
    assert length_feature(policy, baseline)[0] == pytest.approx(math.tanh(1.25))
    assert win_rate(prefs) == 0.75
    assert length_controlled_win_rate(prefs, policy, baseline) == pytest.approx(0.604356, abs=1e-3)
    stats = judged_stats(prefs, policy, baseline, resamples=200)
    assert stats.lc_win_rate == pytest.approx(0.604356, abs=1e-3)
    assert stats.length_slope == pytest.approx((math.log(7) + math.log(3)) / 2 / math.tanh(1.25), abs=1e-2)
    assert (stats.wins, stats.ties, stats.losses) == (7, 1, 2)
    assert (stats.policy_length, stats.baseline_length) == (16.0, 10.0)


def test_bootstrap_intervals():
    even = judged_stats([1] * 5 + [0] * 5, [10] * 10, [10] * 10, resamples=2000, seed=1)
    # the mean of 10 Bernoulli(½) draws: sd 0.158, so the 95% interval is about 0.5 ± 0.3
    assert 0.1 <= even.win_rate_low <= 0.3 and 0.7 <= even.win_rate_high <= 0.9
    assert even.win_rate_low <= even.win_rate == 0.5 <= even.win_rate_high
    sure = judged_stats([1] * 6, [3, 4, 5, 6, 7, 8], [3] * 6, resamples=100)
    assert sure.win_rate_low == sure.win_rate_high == 1.0 and sure.lc_win_rate > 0.99
    assert even.metrics("judge")["judge/win_rate"] == 0.5


def test_judged_stats_refuses_bad_input():
    with pytest.raises(DataError, match="as many preferences"):
        judged_stats([1, 0], [1], [1, 2])
    with pytest.raises(DataError, match=r"in \[0, 1\]"):
        judged_stats([2], [1], [1])
