"""prefopt.stats against hand-worked cases: intervals, paired differences, preservation/improvement."""

import json
import math

import pytest

from prefopt import stats
from prefopt.stats import StatsError


def outcomes(bits: str) -> dict[int, bool]:
    return {i: b == "1" for i, b in enumerate(bits)}


def test_known_paired_difference_and_exact_mcnemar():
    # 10 problems: the run solves 8 the baseline fails, and both solve the other 2 -> +0.8; 8 discordant
    # pairs all one way: two-sided exact binomial p = 2 * 0.5**8
    run, base = outcomes("1111111111"), outcomes("0000000011")
    d = stats.paired_difference([run], [base])
    assert d.estimate == pytest.approx(0.8)
    assert d.p_value == pytest.approx(2 * 0.5**8)
    assert 0 < d.low <= 0.8 <= d.high <= 1
    assert d.n == 10 and "McNemar" in d.method
    # one win and one loss cancel: difference 0, p = 1 (binomtest(1, 2))
    d = stats.paired_difference([outcomes("10")], [outcomes("01")])
    assert d.estimate == 0 and d.p_value == pytest.approx(1.0)


def test_paired_difference_pairs_seed_with_seed():
    # seed 0: +1 on problem 0; seed 1: -1 on problem 1 -> mean difference 0 over 4 (seed, problem) pairs
    d = stats.paired_difference([outcomes("10"), outcomes("00")], [outcomes("00"), outcomes("01")])
    assert d.estimate == 0 and d.n == 4 and d.p_value == pytest.approx(1.0)
    with pytest.raises(StatsError, match="same seeds"):
        stats.paired_difference([outcomes("1")], [outcomes("1"), outcomes("0")])


def test_all_equal_outcomes_give_a_point_interval():
    same = outcomes("111111")
    acc = stats.seed_accuracy([same, same])
    assert (acc.estimate, acc.low, acc.high) == (1.0, 1.0, 1.0)
    d = stats.paired_difference([same, same], [same, same])
    assert (d.estimate, d.low, d.high, d.p_value) == (0.0, 0.0, 0.0, 1.0)


def test_single_seed_interval_comes_from_the_problems():
    acc = stats.seed_accuracy([outcomes("1100")])
    assert acc.estimate == 0.5 and acc.n == 4
    assert 0 <= acc.low < 0.5 < acc.high <= 1
    assert stats.scalar_mean([0.3]) == stats.Interval(0.3, None, None, 1, "one seed: no interval")
    d = stats.scalar_difference([0.3], [0.1])
    assert d.estimate == pytest.approx(0.2) and d.low is None and d.p_value is None


def test_benchmark_with_one_problem():
    assert stats.seed_accuracy([{7: True}]).low == 1.0
    # two seeds disagree on the only problem: the seed resamples give 0, 0.5 or 1
    acc = stats.seed_accuracy([{7: True}, {7: False}])
    assert acc.estimate == 0.5 and acc.low == 0.0 and acc.high == 1.0
    d = stats.paired_difference([{7: True}], [{7: False}])
    assert d.estimate == 1.0 and d.p_value == 1.0  # one discordant pair: binomtest(1, 1) p = 1


def test_only_shared_problems_are_compared():
    acc = stats.seed_accuracy([{0: True, 1: False, 2: True}, {0: True, 1: True}])
    assert acc.n == 2 and acc.estimate == pytest.approx(0.75)
    with pytest.raises(StatsError, match="share no problem"):
        stats.seed_accuracy([{0: True}, {1: True}])


def test_scalar_mean_is_a_student_t_interval():
    m = stats.scalar_mean([1.0, 2.0, 3.0, None, float("nan")])  # missing values are left out
    half = 4.302652729911275 / math.sqrt(3)  # t(0.975, df=2) * sd 1 / sqrt(3)
    assert m.estimate == 2.0 and m.n == 3
    assert m.low == pytest.approx(2 - half) and m.high == pytest.approx(2 + half)
    assert stats.scalar_mean([]) is None
    share = stats.scalar_mean([1.0, 1.0, 0.97], bounds=(0.0, 1.0))  # a share's t interval stops at 1
    assert share.high == 1.0 and share.low < 0.99 and "cut to [0, 1]" in share.method


def test_scalar_difference_is_a_paired_t_test():
    # differences 1, 2, 2: mean 5/3, sd 1/sqrt(3), t = 5 with 2 df -> p = 1 - 5 / sqrt(27)
    d = stats.scalar_difference([1.0, 2.0, 3.0], [0.0, 0.0, 1.0])
    assert d.estimate == pytest.approx(5 / 3)
    assert d.p_value == pytest.approx(1 - 5 / math.sqrt(27))
    half = 4.302652729911275 * (1 / math.sqrt(3)) / math.sqrt(3)
    assert d.low == pytest.approx(5 / 3 - half)
    same = stats.scalar_difference([1.0, 2.0], [0.5, 1.5])  # constant difference: no spread
    assert (same.estimate, same.low, same.high) == (0.5, 0.5, 0.5)


def test_preservation_and_improvement_of_one_run():
    before, after = outcomes("11001"), outcomes("10101")
    r = stats.preservation(before, after)
    # solved before: 0, 1, 4 -> still solved 0, 4: 2/3; failed before: 2, 3 -> now solved 2: 1/2
    assert r["preserved"].estimate == pytest.approx(2 / 3) and r["preserved"].n == 3
    assert r["improved"].estimate == 0.5 and r["improved"].n == 2
    # Clopper-Pearson: 2 of 3 -> (0.0943, 0.9916); 1 of 2 -> (0.0126, 0.9874)
    assert (r["preserved"].low, r["preserved"].high) == pytest.approx((0.094299, 0.991596), abs=1e-5)
    assert (r["improved"].low, r["improved"].high) == pytest.approx((0.012579, 0.987421), abs=1e-5)
    assert stats.preservation(outcomes("11"), outcomes("01"))["improved"] is None  # nothing failed before


def _write(path, bits):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(
            json.dumps({"benchmark": path.stem, "index": 10 + i, "correct": b == "1", "output": "x"}) + "\n"
            for i, b in enumerate(bits)
        )
    )


def test_preservation_metrics_from_per_problem_files(tmp_path):
    _write(tmp_path / "verified_before" / "arith.jsonl", "1100")
    _write(tmp_path / "verified" / "arith.jsonl", "1011")
    _write(tmp_path / "verified" / "math500.jsonl", "1")  # no `before` for it: no metric
    before = stats.read_benchmarks(tmp_path / "verified_before")
    after = stats.read_benchmarks(tmp_path / "verified")
    assert before == {"arith": {10: True, 11: True, 12: False, 13: False}}
    m = stats.preservation_metrics(before, after)
    assert m["eval/preserved/arith"] == 0.5 and m["eval/improved/arith"] == 1.0
    assert m["eval/preserved_low/arith"] < 0.5 < m["eval/preserved_high/arith"]
    assert not any("math500" in k for k in m)


def test_seed_preservation_pools_the_seeds():
    # seed 0: solved {0,1} before, {0} after; seed 1: solved {0} before, {0, 1} after
    r = stats.seed_preservation([outcomes("110"), outcomes("100")], [outcomes("100"), outcomes("110")])
    assert r["preserved"].estimate == pytest.approx(2 / 3) and r["preserved"].n == 3  # (0,0) (0,1) (1,0)
    assert r["improved"].estimate == pytest.approx(1 / 3) and r["improved"].n == 3  # (0,2) (1,1) (1,2)


def test_bad_per_problem_file_is_one_line(tmp_path):
    bad = tmp_path / "arith.jsonl"
    bad.write_text('{"index": 0}\n')
    with pytest.raises(StatsError, match=r"arith.jsonl:1: not a per-problem row"):
        stats.read_outcomes(bad)
    with pytest.raises(StatsError, match="cannot read"):
        stats.read_outcomes(tmp_path / "missing.jsonl")
    with pytest.raises(StatsError, match="no problem is in both"):
        stats.preservation({0: True}, {1: True})
