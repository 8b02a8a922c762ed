"""Statistics for comparisons: intervals over problems and seeds, paired differences, preservation/improvement.

Every interval is 95%. The methods, as the report states them:

- accuracy over seeds: the mean over seeds and problems; interval from a two-level percentile bootstrap
  (resample seeds with replacement, and problems with replacement, the same problems for every seed),
  `RESAMPLES` draws with a fixed generator seed so a report is reproducible;
- paired difference (a run minus its baseline on the same seeds and problems): the mean difference with the
  same bootstrap interval, and the exact McNemar p-value (a two-sided binomial test on the discordant
  (seed, problem) pairs, `scipy.stats.binomtest`, pairs pooled over seeds);
- preservation (of the problems the starting policy solved, the share still solved) and improvement (of
  those it failed, the share now solved): for one run a Clopper-Pearson exact interval; over seeds the
  two-level bootstrap of the ratio;
- a scalar per run (the DCR metrics): the mean over seeds with a Student-t interval, and the paired
  difference against the baseline's seeds with a paired t-test (`scipy.stats.ttest_rel`); one seed has no
  interval.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import stats as sps

from prefopt.errors import PrefoptError

LEVEL = 0.95
RESAMPLES = 2000
BOOTSTRAP_SEED = 0


class StatsError(PrefoptError):
    """Per-problem results that cannot be compared (no shared problems, an unreadable file)."""


@dataclass(frozen=True)
class Interval:
    """An estimate with its 95% interval (low == high when nothing varies) and what it was computed over."""

    estimate: float
    low: float | None
    high: float | None
    n: int  # problems (or seeds, for a scalar) the estimate is over
    method: str

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Difference:
    """A paired difference (run - baseline) with its 95% interval and a two-sided p-value."""

    estimate: float
    low: float | None
    high: float | None
    p_value: float | None
    n: int  # pairs compared
    method: str


# --- per-problem files -------------------------------------------------------------------------------


def read_outcomes(path: str | Path) -> dict[int, bool]:
    """{problem index: correct} from a per-problem file `<run>/verified/<benchmark>.jsonl`."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as exc:
        raise StatsError(f"cannot read per-problem results {path}: {exc.strerror or exc}") from None
    out = {}
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[int(row["index"])] = bool(row["correct"])
        except (ValueError, KeyError, TypeError):
            raise StatsError(f"{path}:{number}: not a per-problem row with `index` and `correct`") from None
    return out


def read_benchmarks(directory: str | Path) -> dict[str, dict[int, bool]]:
    """{benchmark: outcomes} for every `<benchmark>.jsonl` in a run's `verified/` (or `verified_before/`)."""
    directory = Path(directory)
    if not directory.is_dir():
        return {}
    return {f.stem: read_outcomes(f) for f in sorted(directory.glob("*.jsonl"))}


# --- one run -------------------------------------------------------------------------------------------


def proportion(successes: int, trials: int) -> Interval | None:
    """A share with its Clopper-Pearson exact 95% interval; None when there are no trials."""
    if trials == 0:
        return None
    ci = sps.binomtest(successes, trials).proportion_ci(confidence_level=LEVEL, method="exact")
    return Interval(successes / trials, float(ci.low), float(ci.high), trials, "Clopper-Pearson exact")


def preservation(before: Mapping[int, bool], after: Mapping[int, bool]) -> dict[str, Interval | None]:
    """{"preserved": share of the problems solved before still solved after, "improved": share of the
    problems failed before solved after}, each with its exact interval (None when it has no problems)."""
    shared = sorted(set(before) & set(after))
    if not shared:
        raise StatsError(f"no problem is in both the results before ({len(before)}) and after ({len(after)})")
    solved = [i for i in shared if before[i]]
    failed = [i for i in shared if not before[i]]
    return {
        "preserved": proportion(sum(after[i] for i in solved), len(solved)),
        "improved": proportion(sum(after[i] for i in failed), len(failed)),
    }


def preservation_metrics(
    before: Mapping[str, Mapping[int, bool]], after: Mapping[str, Mapping[int, bool]], prefix: str = "eval"
) -> dict[str, float]:
    """Flat metrics for summary.json / W&B: `<prefix>/preserved/<benchmark>` and `.../improved/...`, with
    `<prefix>/preserved_low/...`, `..._high/...` the interval (benchmarks in both, absent when undefined)."""
    metrics = {}
    for name in sorted(set(before) & set(after)):
        for what, interval in preservation(before[name], after[name]).items():
            if interval is not None:
                assert interval.low is not None and interval.high is not None  # Clopper-Pearson: always bounded
                metrics[f"{prefix}/{what}/{name}"] = interval.estimate
                metrics[f"{prefix}/{what}_low/{name}"] = interval.low
                metrics[f"{prefix}/{what}_high/{name}"] = interval.high
    return metrics


# --- over seeds and problems ---------------------------------------------------------------------------


def _two_level(num: np.ndarray, den: np.ndarray) -> tuple[float, float, float] | None:
    """(estimate, low, high) of sum(num)/sum(den) over a seeds x problems grid, the interval from resampling
    seeds and problems with replacement; None when sum(den) is 0."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    if den.sum() == 0:
        return None
    seeds, problems = num.shape
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    ws = rng.multinomial(seeds, np.full(seeds, 1 / seeds), size=RESAMPLES).astype(float)
    wp = rng.multinomial(problems, np.full(problems, 1 / problems), size=RESAMPLES).astype(float)
    top = np.einsum("bs,sp,bp->b", ws, num, wp)
    bottom = np.einsum("bs,sp,bp->b", ws, den, wp)
    with np.errstate(invalid="ignore", divide="ignore"):
        draws = top / bottom
    draws = draws[np.isfinite(draws)]
    estimate = float(num.sum() / den.sum())
    alpha = (1 - LEVEL) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    # a percentile interval of draws that all equal the estimate is [estimate, estimate], not rounding noise
    return estimate, min(float(low), estimate), max(float(high), estimate)


def clustered_share(hits: Sequence[float], counts: Sequence[int]) -> Interval | None:
    """sum(hits) / sum(counts) over groups (e.g. the sample pairs of one problem), with a percentile bootstrap
    that resamples whole groups; None when there is nothing to count."""
    result = _two_level(np.array([list(hits)], float), np.array([list(counts)], float))
    if result is None:
        return None
    estimate, low, high = result
    return Interval(estimate, low, high, len(counts), f"percentile bootstrap over problems ({RESAMPLES} resamples)")


def _grid(runs: Sequence[Mapping[int, bool]], problems: Sequence[int]) -> np.ndarray:
    return np.array([[float(run[i]) for i in problems] for run in runs]).reshape(len(runs), len(problems))


def _shared(runs: Sequence[Mapping[int, bool]]) -> list[int]:
    if not runs:
        raise StatsError("no runs to compare")
    shared = set(runs[0]).intersection(*runs[1:])
    if not shared:
        raise StatsError("the runs share no problem: they were evaluated on different problems")
    return sorted(shared)


BOOTSTRAP = f"{LEVEL:.0%} percentile bootstrap over seeds and problems ({RESAMPLES} resamples)"


def seed_accuracy(runs: Sequence[Mapping[int, bool]]) -> Interval:
    """Accuracy over seeds (one {problem: correct} per seed, on the problems all share) with its interval."""
    problems = _shared(runs)
    grid = _grid(runs, problems)
    result = _two_level(grid, np.ones_like(grid))
    assert result is not None  # _shared found problems: the denominator is positive
    estimate, low, high = result
    return Interval(estimate, low, high, len(problems), BOOTSTRAP)


def seed_preservation(
    before: Sequence[Mapping[int, bool]], after: Sequence[Mapping[int, bool]]
) -> dict[str, Interval | None]:
    """Preservation and improvement pooled over seeds (seed i's run after vs. seed i's starting policy)."""
    if len(before) != len(after):
        raise StatsError(f"{len(before)} starting policies for {len(after)} runs")
    problems = _shared([*before, *after])
    b, a = _grid(before, problems), _grid(after, problems)
    out = {}
    for what, den in (("preserved", b), ("improved", 1 - b)):
        result = _two_level(a * den, den)
        out[what] = None if result is None else Interval(*result, int(den.sum()), BOOTSTRAP)
    return out


def paired_difference(runs: Sequence[Mapping[int, bool]], baseline: Sequence[Mapping[int, bool]]) -> Difference:
    """Accuracy of `runs` minus `baseline`, seed i against seed i on the problems all share: the mean
    difference, its bootstrap interval and the exact McNemar p-value on the discordant (seed, problem) pairs."""
    if len(runs) != len(baseline) or not runs:
        raise StatsError(f"a paired difference needs the same seeds: {len(runs)} runs vs {len(baseline)} baseline")
    problems = _shared([*runs, *baseline])
    a, b = _grid(runs, problems), _grid(baseline, problems)
    result = _two_level(a - b, np.ones_like(a))
    assert result is not None  # _shared found problems: the denominator is positive
    estimate, low, high = result
    wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = 1.0 if wins + losses == 0 else float(sps.binomtest(wins, wins + losses, 0.5).pvalue)
    return Difference(estimate, low, high, p, a.size, f"{BOOTSTRAP}; exact McNemar p ({wins} vs {losses} discordant)")


def problem_mean(values: Sequence[float]) -> Interval:
    """The mean of one value per problem (e.g. the difference of two accuracies interpolated per problem), with
    the percentile bootstrap over problems."""
    grid = np.asarray(values, float).reshape(1, -1)
    if grid.size == 0:
        raise StatsError("no problems to average over")
    result = _two_level(grid, np.ones_like(grid))
    assert result is not None  # at least one problem: the denominator is positive
    return Interval(*result, grid.shape[1], f"percentile bootstrap over problems ({RESAMPLES} resamples)")


# --- a scalar per seed ---------------------------------------------------------------------------------


def _finite(values: Sequence[float | None]) -> np.ndarray:
    return np.array([v for v in values if v is not None and math.isfinite(v)], float)


def scalar_mean(values: Sequence[float | None], bounds: tuple[float, float] | None = None) -> Interval | None:
    """The mean of one value per seed with its Student-t 95% interval (none for a single seed); with `bounds`
    (a share: (0, 1)) the interval is cut to them, where the value itself can lie."""
    interval = _t_mean(values)
    if bounds is None or interval is None or interval.low is None or interval.high is None:
        return interval
    return Interval(
        interval.estimate,
        max(interval.low, bounds[0]),
        min(interval.high, bounds[1]),
        interval.n,
        interval.method + f", cut to [{bounds[0]:g}, {bounds[1]:g}]",
    )


def _t_mean(values: Sequence[float | None]) -> Interval | None:
    x = _finite(values)
    if x.size == 0:
        return None
    mean = float(x.mean())
    if x.size == 1:
        return Interval(mean, None, None, 1, "one seed: no interval")
    sem = float(x.std(ddof=1) / math.sqrt(x.size))
    if sem == 0:
        return Interval(mean, mean, mean, int(x.size), "Student t over seeds")
    low, high = sps.t.interval(LEVEL, x.size - 1, loc=mean, scale=sem)
    return Interval(mean, float(low), float(high), int(x.size), "Student t over seeds")


def scalar_difference(values: Sequence[float | None], baseline: Sequence[float | None]) -> Difference | None:
    """Paired difference of one value per seed (seed i vs the baseline's seed i): mean, t interval, paired
    t-test p-value; None when no seed has both values."""
    pairs = [
        (v, b)
        for v, b in zip(values, baseline)
        if v is not None and b is not None and math.isfinite(v) and math.isfinite(b)
    ]
    if not pairs:
        return None
    d = np.array([v - b for v, b in pairs])
    interval = scalar_mean(list(d))
    if d.size == 1:
        return Difference(float(d[0]), None, None, None, 1, "one seed: no interval or test")
    if np.all(d == d[0]):  # no spread: the t statistic is undefined
        return Difference(
            float(d[0]),
            float(d[0]),
            float(d[0]),
            1.0 if d[0] == 0 else None,
            int(d.size),
            "paired t (no spread between seeds)",
        )
    p = float(sps.ttest_rel([v for v, _ in pairs], [b for _, b in pairs]).pvalue)
    assert interval is not None  # two seeds or more
    return Difference(interval.estimate, interval.low, interval.high, p, int(d.size), "paired t-test over seeds")
