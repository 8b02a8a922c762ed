"""Comparisons over seeds: runs grouped by every override except `seed`, intervals and paired differences.

Per group and benchmark: accuracy over seeds with its interval, preservation and improvement, and the paired
difference against the baseline group (the group with the same overrides but `loss=<baseline>`), from the
per-problem files every verified evaluation writes (`<run>/verified/<benchmark>.jsonl`, `verified_before/`).
The DCR metrics (one value per run) get a mean over seeds and a paired difference too. Methods: `prefopt.stats`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from prefopt.reporting.runs import VERIFIED, RunRecord
from prefopt.stats import (
    BOOTSTRAP,
    Difference,
    Interval,
    StatsError,
    paired_difference,
    scalar_difference,
    scalar_mean,
    seed_accuracy,
    seed_preservation,
)

SHARES = {"eval/rewards/accuracies", "eval/dcr/chosen_reward_below_zero"}  # in [0, 1]: intervals cut to it
DCR_METRICS = [
    ("rewards/chosen", "eval/rewards/chosen"),
    ("rewards/rejected", "eval/rewards/rejected"),
    ("reward accuracy", "eval/rewards/accuracies"),
    ("chosen reward < 0", "eval/dcr/chosen_reward_below_zero"),
    ("chosen Δlogp/token", "eval/dcr/chosen_logp_delta_per_token"),
]
NO_BASELINE = ("", "none", "null")


@dataclass
class Group:
    """The runs (one per seed, sorted by seed) of one setting: every override except `seed` equal."""

    setting: dict[str, str]  # the overrides besides seed, with `loss` always present
    runs: list[RunRecord]
    label: str = ""
    accuracy: dict[str, Interval] = field(default_factory=dict)  # per benchmark
    before: dict[str, Interval] = field(default_factory=dict)
    preserved: dict[str, Interval | None] = field(default_factory=dict)
    improved: dict[str, Interval | None] = field(default_factory=dict)
    versus: dict[str, Difference] = field(default_factory=dict)  # per benchmark, against the baseline
    scalars: dict[str, Interval | None] = field(default_factory=dict)  # DCR metric key -> mean over seeds
    scalar_versus: dict[str, Difference | None] = field(default_factory=dict)

    @property
    def seeds(self) -> list[str | None]:
        return [r.seed for r in self.runs]


def _seed_order(seed: str | None) -> tuple:
    return (0, int(seed), "") if seed is not None and seed.lstrip("-").isdigit() else (1, 0, str(seed))


def group_runs(records: Sequence[RunRecord]) -> list[Group]:
    """Runs grouped by their overrides without `seed` and `*.seed` (first-seen order), labelled by what tells
    groups apart."""
    groups: dict[tuple, Group] = {}
    for r in records:
        r.seed = r.seed if r.seed is not None else r.overrides.get("seed")  # W&B records: from the flat config
        # `seed` and the stage seeds that follow it (warmup.seed, pairs.seed: in a W&B run's flat config)
        setting = {k: v for k, v in r.overrides.items() if k != "seed" and not k.endswith(".seed")}
        setting["loss"] = setting.get("loss") or r.loss or "?"
        key = tuple(sorted(setting.items()))
        groups.setdefault(key, Group(setting=setting, runs=[])).runs.append(r)
    out = list(groups.values())
    keys = list(dict.fromkeys(k for g in out for k in g.setting))
    # `loss.key` (a W&B run's flat config) says what `loss` says
    differ = [k for k in keys if k != "loss.key" and len({g.setting.get(k) for g in out}) > 1] or ["loss"]
    for g in out:
        g.runs.sort(key=lambda r: _seed_order(r.seed))
        g.label = " ".join(f"{k}={g.setting[k]}" for k in differ if k in g.setting)
    return out


def default_baseline(groups: Sequence[Group], baseline: str | None) -> str | None:
    """`baseline` as given ("none" turns comparisons off); unset: dpo when some group trained with it."""
    if baseline is not None:
        return None if str(baseline).lower() in NO_BASELINE else str(baseline)
    return "dpo" if any(g.setting["loss"] == "dpo" for g in groups) else None


def baseline_of(group: Group, groups: Sequence[Group], baseline: str | None) -> Group | None:
    """The group with `group`'s setting but the baseline loss (None for the baseline itself or when absent)."""
    if baseline is None or group.setting["loss"] == baseline:
        return None
    want = {**group.setting, "loss": baseline}
    return next((g for g in groups if g.setting == want), None)


def _paired_runs(group: Group, base: Group) -> tuple[list[RunRecord], list[RunRecord]]:
    """Seed i of the group against seed i of the baseline (by seed value; by order when seeds are unknown)."""
    if None in group.seeds or None in base.seeds:
        n = min(len(group.runs), len(base.runs))
        return group.runs[:n], base.runs[:n]
    by_seed = {r.seed: r for r in base.runs}
    mine = [r for r in group.runs if r.seed in by_seed]
    return mine, [by_seed[r.seed] for r in mine]


def benchmarks(records: Sequence[RunRecord]) -> list[str]:
    """The benchmarks any run has per-problem results or a final accuracy for (sorted; `mean` left out)."""
    names = {b for r in records for b in r.outcomes}
    names |= {
        k[len(VERIFIED) :] for r in records for k in r.final if k.startswith(VERIFIED) and "/" not in k[len(VERIFIED) :]
    }
    return sorted(names - {"mean"})


def _accuracy(runs: Sequence[RunRecord], name: str, before: bool = False) -> Interval | None:
    """Over the runs' per-problem results when every run has them, else over their final accuracies."""
    files = [(r.outcomes_before if before else r.outcomes).get(name) for r in runs]
    if files and all(f for f in files):
        return seed_accuracy(cast(list[Mapping[int, bool]], files))
    prefix = "eval/verified_before/" if before else VERIFIED
    return scalar_mean([r.final.get(prefix + name) for r in runs])


def _fill(group: Group, names: Sequence[str], base: Group | None) -> None:
    for name in names:
        for target, before in ((group.accuracy, False), (group.before, True)):
            interval = _accuracy(group.runs, name, before)
            if interval is not None:
                target[name] = interval
        pairs = cast(
            list[tuple[Mapping[int, bool], Mapping[int, bool]]],
            [(r.outcomes_before.get(name), r.outcomes.get(name)) for r in group.runs],
        )
        if pairs and all(b and a for b, a in pairs):
            result = seed_preservation([b for b, _ in pairs], [a for _, a in pairs])
            group.preserved[name], group.improved[name] = result["preserved"], result["improved"]
        if base is not None:
            mine, theirs = _paired_runs(group, base)
            files = cast(list[Mapping[int, bool]], [r.outcomes.get(name) for r in mine + theirs])
            if mine and all(files):
                group.versus[name] = paired_difference(files[: len(mine)], files[len(mine) :])
    for _, key in DCR_METRICS:
        group.scalars[key] = scalar_mean([r.final.get(key) for r in group.runs], (0.0, 1.0) if key in SHARES else None)
        if base is not None:
            mine, theirs = _paired_runs(group, base)
            group.scalar_versus[key] = scalar_difference(
                [r.final.get(key) for r in mine], [r.final.get(key) for r in theirs]
            )


def compare(records: Sequence[RunRecord], baseline: str | None = None) -> dict[str, Any]:
    """{"groups", "baseline", "benchmarks"}: every group's intervals and differences against the baseline."""
    groups = group_runs(records)
    chosen = default_baseline(groups, baseline)
    names = benchmarks(records)
    for g in groups:
        try:
            _fill(g, names, baseline_of(g, groups, chosen))
        except StatsError as exc:
            raise StatsError(f"group {g.label}: {exc}") from None
    return {"groups": groups, "baseline": chosen, "benchmarks": names}


# --- text ----------------------------------------------------------------------------------------------


def pct(iv: Interval | Difference | None, signed: bool = False) -> str:
    """`52.0 [47.1, 57.6]` in % (or points, signed); `-` when missing."""
    if iv is None:
        return "-"
    f = (lambda v: f"{100 * v:+.1f}") if signed else (lambda v: f"{100 * v:.1f}")
    text = f(iv.estimate)
    if iv.low is not None:
        text += f" [{f(iv.low)}, {f(iv.high)}]"
    p = getattr(iv, "p_value", None)
    return text + (f" p={p:.3g}" if p is not None else "")


def num(iv: Interval | Difference | None, signed: bool = False) -> str:
    if iv is None:
        return "-"
    f = (lambda v: f"{v:+.3f}") if signed else (lambda v: f"{v:.3f}")
    text = f(iv.estimate) + (f" [{f(iv.low)}, {f(iv.high)}]" if iv.low is not None else "")
    p = getattr(iv, "p_value", None)
    return text + (f" p={p:.3g}" if p is not None else "")


def tables(result: dict[str, Any]) -> dict[str, tuple[list[str], list[list[str]]]]:
    """(header, rows) of each comparison table; the report renders them with `markdown_table`."""
    groups, names, base = result["groups"], result["benchmarks"], result["baseline"]
    seeds = lambda g: f"{len(g.runs)}"  # noqa: E731
    out = {
        "accuracy": (
            ["setting", "seeds", *(f"{n} before" for n in names), *names],
            [
                [g.label, seeds(g), *(pct(g.before.get(n)) for n in names), *(pct(g.accuracy.get(n)) for n in names)]
                for g in groups
            ],
        )
    }
    if any(g.preserved for g in groups):
        out["preservation"] = (
            ["setting", "seeds", *(f"{n} {w}" for n in names for w in ("preserved", "improved"))],
            [
                [g.label, seeds(g), *(pct(getattr(g, w).get(n)) for n in names for w in ("preserved", "improved"))]
                for g in groups
            ],
        )
    versus = [g for g in groups if g.versus or any(g.scalar_versus.values())]
    if base and versus:
        out["versus"] = (
            ["setting", "pairs", *names],
            [
                [
                    g.label,
                    str(max((d.n for d in g.versus.values()), default=len(g.runs))),
                    *(pct(g.versus.get(n), signed=True) for n in names),
                ]
                for g in versus
            ],
        )
    out["dcr"] = (
        ["setting", "seeds", *(name for name, _ in DCR_METRICS)],
        [[g.label, seeds(g), *(num(g.scalars.get(k)) for _, k in DCR_METRICS)] for g in groups],
    )
    if base and versus:
        out["dcr_versus"] = (
            ["setting", "seeds", *(name for name, _ in DCR_METRICS)],
            [
                [g.label, str(len(g.runs)), *(num(g.scalar_versus.get(k), signed=True) for _, k in DCR_METRICS)]
                for g in versus
            ],
        )
    return out


METHODS = (
    f"Intervals are 95%. Accuracy, preservation and improvement over seeds: the pooled mean with a "
    f"{BOOTSTRAP} (the same problems resampled for every seed); with a single seed the interval is over "
    f"problems only. Paired differences (a setting minus its `{{baseline}}` run of the same seed, on the same "
    f"problems): the mean difference in points with the same bootstrap interval, and the exact McNemar "
    f"p-value (two-sided binomial test on the discordant seed-problem pairs, pooled over seeds). Preservation: "
    f"of the problems the starting policy solved, the share still solved; improvement: of those it failed, "
    f"the share now solved. DCR metrics (one value per run): mean over seeds with a Student-t interval, "
    f"paired t-test against the baseline's seeds; one seed has no interval. Accuracy without per-problem "
    f"files (e.g. from W&B) is the t interval over the runs' final accuracies."
)


def rows_for_csv(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per group, benchmark (or DCR metric) and statistic, with estimate, interval, p and method."""
    rows = []
    for g in result["groups"]:
        items = [
            (n, kind, getattr(g, kind).get(n))
            for n in result["benchmarks"]
            for kind in ("before", "accuracy", "preserved", "improved", "versus")
        ]
        items += [(k, "mean", g.scalars.get(k)) for _, k in DCR_METRICS]
        items += [(k, "versus", g.scalar_versus.get(k)) for _, k in DCR_METRICS]
        for what, kind, iv in items:
            if iv is not None:
                rows.append(
                    {
                        "setting": g.label,
                        "seeds": " ".join(str(s) for s in g.seeds),
                        "metric": what,
                        "statistic": kind,
                        "estimate": iv.estimate,
                        "low": iv.low,
                        "high": iv.high,
                        "p_value": getattr(iv, "p_value", None),
                        "n": iv.n,
                        "method": iv.method,
                        "baseline": result["baseline"] if kind == "versus" else None,
                    }
                )
    return rows
