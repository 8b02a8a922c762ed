"""Losses compared at equal distance from the reference: accuracy against KL(π‖π_ref) over each loss's β values.

β does not mean the same thing in DPO, IPO, SLiC, Cal-DPO and BPO, so a comparison at one nominal β may only say
which loss moved less. Each run's verified evaluation estimates KL(π‖π_ref) on the policy's greedy answers
(`eval/kl/greedy`, `prefopt.mathloop.policy_kl`); here every setting of a sweep (the runs of one override set but
`seed`) is a point (KL, verified accuracy), and the settings that differ only in `beta` make one line, its
frontier. Where β hardly moves the distance, another knob can trace the line too (`along=("beta", "lr")`: the
settings of a loss that differ in β or the learning rate). The matched-KL table reads each line's accuracy,
interpolated linearly between its points ordered by KL, at a few KL values inside every line's KL range; the
nominal table beside it is the comparison at equal β (and equal other knobs).
Drawn with matplotlib's object API on the Agg canvas, as `prefopt.reporting.plots`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prefopt.reporting.plots import DPI, _color
from prefopt.stats import Interval, problem_mean, scalar_mean

KL = "eval/kl/greedy"
ACCURACY = "eval/verified/mean"
BETA_KEYS = ("beta", "loss.beta")
MATCHED = 3  # common KL values in the matched-KL table
PLOT = "kl_frontier.png"


@dataclass
class Point:
    beta: float
    kl: Interval
    accuracy: Interval
    knobs: dict[str, str] = field(default_factory=dict)  # the other `along` overrides of this point
    solved: dict[int, float] | None = None  # per problem of the one benchmark: the share of seeds that solved it

    @property
    def name(self) -> str:
        """`β = 0.1`, with the other knobs after it (`β = 0.1, lr = 1e-4`)."""
        return ", ".join([f"β = {self.beta:g}", *(f"{k} = {v}" for k, v in sorted(self.knobs.items()))])


@dataclass
class Line:
    """The settings that differ only in β (one loss, unless other overrides differ too), ordered by KL."""

    label: str
    loss: str = ""
    points: list[Point] = field(default_factory=list)

    @property
    def kl(self) -> np.ndarray:
        return np.array([p.kl.estimate for p in self.points])

    @property
    def accuracy(self) -> np.ndarray:
        return np.array([p.accuracy.estimate for p in self.points])


def _beta(setting: dict[str, str], runs: Sequence[Any] = ()) -> float | None:
    """The setting's `beta` override, else its runs' resolved β (a run left at the loss's default)."""
    for key in BETA_KEYS:
        try:
            return float(setting[key])
        except (KeyError, TypeError, ValueError):
            continue
    resolved = {getattr(r, "beta", None) for r in runs} - {None}
    return resolved.pop() if len(resolved) == 1 else None


def _kl(runs: Sequence[Any]) -> Interval | None:
    """One run: its estimate with the interval over prompts; several seeds: their mean with a t interval."""
    if len(runs) == 1:
        final = runs[0].final
        if final.get(KL) is None:
            return None
        return Interval(final[KL], final.get(KL + "_low"), final.get(KL + "_high"), 1, "Student t over prompts")
    return scalar_mean([r.final.get(KL) for r in runs])


def _accuracy(group: Any, names: Sequence[str]) -> Interval | None:
    """The group's accuracy on its one benchmark (interval over seeds and problems), else the mean over them."""
    if len(names) == 1 and names[0] in group.accuracy:
        return group.accuracy[names[0]]
    return scalar_mean([r.final.get(ACCURACY) for r in group.runs])


def _solved(group: Any, names: Sequence[str]) -> dict[int, float] | None:
    """Per problem, the share of the group's seeds that solved it (one benchmark, every run's answers on disk)."""
    found = [getattr(r, "outcomes", {}).get(names[0]) for r in group.runs] if len(names) == 1 else [None]
    files: list[dict[int, bool]] = [f for f in found if f is not None]
    if not files or len(files) < len(found):
        return None
    shared = set(files[0]).intersection(*files[1:])
    return {i: float(np.mean([f[i] for f in files])) for i in sorted(shared)}


def interpolated_solved(line: Line, x: float) -> dict[int, float] | None:
    """The line's per-problem solved share at KL `x`, interpolated with the same weights as its accuracy (so its
    mean is `accuracy_at`); None without per-problem answers or outside the line's range."""
    if any(p.solved is None for p in line.points) or not line.kl.min() <= x <= line.kl.max():
        return None
    weights = [float(np.interp(x, line.kl, np.eye(len(line.points))[k])) for k in range(len(line.points))]
    used: list[tuple[float, dict[int, float]]] = []
    for w, p in zip(weights, line.points):
        if w > 0 and p.solved is not None:
            used.append((w, p.solved))
    shared = set.intersection(*(set(solved) for _, solved in used))
    return {i: sum(w * solved[i] for w, solved in used) for i in sorted(shared)}


def frontier_lines(groups: Sequence[Any], names: Sequence[str], along: Sequence[str] = ("beta",)) -> list[Line]:
    """The lines of the comparison's groups (`prefopt.reporting.compare.Group`) that have a β, KL and accuracy;
    the settings of one line differ only in the `along` overrides (β always among them)."""
    lines: dict[tuple, Line] = {}
    knobs = set(along) - set(BETA_KEYS)
    rests = [{k: v for k, v in g.setting.items() if k not in BETA_KEYS and k not in knobs} for g in groups]
    keys = dict.fromkeys(k for rest in rests for k in rest if k not in ("loss", "loss.key"))
    differ = [k for k in keys if len({rest.get(k) for rest in rests}) > 1]  # what tells lines of one loss apart
    for g, rest in zip(groups, rests):
        beta, kl, accuracy = _beta(g.setting, g.runs), _kl(g.runs), _accuracy(g, names)
        if beta is None or kl is None or accuracy is None:
            continue
        label = rest["loss"] + "".join(f" {k}={rest[k]}" for k in differ if k in rest)
        point = Point(beta, kl, accuracy, {k: v for k, v in g.setting.items() if k in knobs}, _solved(g, names))
        lines.setdefault(tuple(sorted(rest.items())), Line(label, rest["loss"])).points.append(point)
    for line in lines.values():
        line.points.sort(key=lambda p: (p.kl.estimate, p.beta))
    return list(lines.values())


def common_kl(lines: Sequence[Line], count: int = MATCHED) -> list[float]:
    """`count` KL values evenly spread over the range every line covers ([] when the ranges do not overlap)."""
    if not lines:
        return []
    low = max(float(line.kl.min()) for line in lines)
    high = min(float(line.kl.max()) for line in lines)
    if low > high:
        return []
    return [low] if low == high else np.linspace(low, high, count).tolist()


def accuracy_at(line: Line, kl: Sequence[float]) -> list[float | None]:
    """The line's accuracy at each KL value, linear between its points ordered by KL; None outside its range."""
    xs, ys = line.kl, line.accuracy
    return [float(np.interp(x, xs, ys)) if xs.min() <= x <= xs.max() else None for x in kl]


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def matched_table(lines: Sequence[Line], kl: Sequence[float]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): accuracy (%) of each line at the common KL values."""
    header = ["loss", *(f"KL = {x:.3g}" for x in kl)]
    return header, [[line.label, *map(_pct, accuracy_at(line, kl))] for line in lines]


def versus_table(lines: Sequence[Line], baseline: str) -> tuple[list[str], list[list[str]]] | None:
    """(header, rows): each line against the baseline loss's line of the same other overrides, at the low end,
    middle and high end of the KL range the two share ("-" where they share none); None without a baseline line.
    When all lines' ranges do not overlap, two of them often still do."""
    by_label = {line.label: line for line in lines}
    header = ["loss", "shared KL range", "KL", f"{baseline} (%)", "loss (%)", "difference (points, 95% CI)"]
    rows: list[list[str]] = []
    for line in lines:
        if line.loss == baseline:
            continue
        base = by_label.get(baseline + line.label[len(line.loss) :])
        if base is None:
            continue
        kl = common_kl([base, line])
        if not kl:
            rows.append([line.label, "none", "-", "-", "-", "-"])
            continue
        shared = f"[{kl[0]:.3g}, {kl[-1]:.3g}]"
        for x, a, b in zip(kl, accuracy_at(base, kl), accuracy_at(line, kl)):
            assert a is not None and b is not None  # inside both ranges
            rows.append([line.label, shared, f"{x:.3g}", _pct(a), _pct(b), _difference(base, line, x, b - a)])
    return (header, rows) if rows else None


def _difference(base: Line, line: Line, x: float, estimate: float) -> str:
    """The difference in points at KL `x`, with the bootstrap interval over the problems both answered when every
    point has its per-problem answers (the interpolated per-problem differences: paired, same problems)."""
    mine, theirs = interpolated_solved(line, x), interpolated_solved(base, x)
    shared = sorted(set(mine or {}) & set(theirs or {}))
    if mine is None or theirs is None or not shared:
        return f"{100 * estimate:+.1f}"
    diff = problem_mean([mine[i] - theirs[i] for i in shared])
    assert diff.low is not None and diff.high is not None  # a bootstrap interval always has both ends
    return f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"


def nominal_table(lines: Sequence[Line]) -> tuple[list[str], list[list[str]]]:
    """(header, rows): accuracy (%) and KL of each line at each β (and other knobs) it was trained with."""
    order = {p.name: (sorted(p.knobs.items()), p.beta) for line in lines for p in line.points}
    columns = sorted(order, key=lambda name: order[name])
    rows = []
    for line in lines:
        at = {p.name: p for p in line.points}
        rows.append(
            [line.label]
            + [f"{_pct(at[c].accuracy.estimate)} (KL {at[c].kl.estimate:.3g})" if c in at else "-" for c in columns]
        )
    return ["loss", *columns], rows


def _bars(interval: Interval, scale: float = 1.0) -> list[float]:
    """Distances from the estimate to the interval's ends (0 where it has none), for `errorbar`."""
    if interval.low is None or interval.high is None:
        return [0.0, 0.0]
    return [scale * (interval.estimate - interval.low), scale * (interval.high - interval.estimate)]


def plot_frontier(lines: Sequence[Line], kl: Sequence[float], path: Path, before: float | None = None) -> Path:
    """Accuracy (%) against KL per line, 95% interval bars on both, β beside each point; the common KL values
    dotted, the accuracy before preference training dashed."""
    fig = Figure(figsize=(9.0, 5.5), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, line in enumerate(lines):
        color = _color(i, len(lines))
        xerr = np.array([_bars(p.kl) for p in line.points]).T
        yerr = np.array([_bars(p.accuracy, 100) for p in line.points]).T
        ax.errorbar(line.kl, 100 * line.accuracy, xerr=xerr, yerr=yerr, color=color, marker="o", capsize=3)
        ax.plot([], [], color=color, marker="o", label=line.label)
        for p in line.points:
            ax.annotate(
                p.name.replace(" = ", "="),
                (p.kl.estimate, 100 * p.accuracy.estimate),
                xytext=(4, 4),
                textcoords="offset points",
                fontsize="x-small",
                color=color,
            )
    for x in kl:
        ax.axvline(x, color="gray", ls=":", lw=1)
    if before is not None:
        ax.axhline(100 * before, color="black", ls="--", lw=1, label="before preference training")
    ax.set_xlabel("KL(π‖π_ref) on the greedy answers (nats per prompt)")
    ax.set_ylabel("verified accuracy (%)")
    ax.legend(fontsize="small", frameon=False)
    fig.savefig(path)
    return path


def frontier_section(
    groups: Sequence[Any],
    names: Sequence[str],
    out_dir: Path,
    markdown_table: Callable[..., str],
    baseline: str | None = None,
    along: Sequence[str] = ("beta",),
) -> tuple[str, list[Path]]:
    """The report's section (markdown, tables drawn by the report's `markdown_table`) and its plot; ("", []) when
    no run has a β, KL and accuracy. With a `baseline` loss, also each loss against it where their KL ranges
    overlap."""
    lines = frontier_lines(groups, names, along)
    if not lines:
        return "", []
    kl = common_kl(lines)
    befores = {g.before[names[0]].estimate for g in groups if len(names) == 1 and names[0] in g.before}
    plot = plot_frontier(lines, kl, out_dir / PLOT, befores.pop() if len(befores) == 1 else None)
    text = [
        "",
        "## Accuracy against KL to the reference",
        "",
        f"![KL frontier]({PLOT})",
        "",
        "Each point: one setting (mean over its seeds), its verified accuracy against KL(π‖π_ref) estimated on "
        "the policy's greedy answers (`eval/kl/greedy`: log π − log π_ref of each answer, mean over prompts; a "
        "plug-in value at the policy's mode, not an unbiased estimate). Bars: 95% intervals (accuracy: bootstrap "
        "over seeds and problems; KL: Student t over prompts for one seed, over seeds for several).",
        "",
        "### Accuracy (%) at matched KL",
        "",
    ]
    if kl:
        text += [
            markdown_table(*matched_table(lines, kl)),
            "",
            "Linear interpolation between each loss's points ordered by KL, at KL values inside every loss's range.",
        ]
    else:
        ranges = ", ".join(f"{line.label} [{line.kl.min():.3g}, {line.kl.max():.3g}]" for line in lines)
        text += [f"The losses' KL ranges do not overlap ({ranges}): no KL at which all can be compared."]
    versus = versus_table(lines, baseline) if baseline else None
    if versus is not None:
        text += [
            "",
            f"### Against {baseline} at matched KL",
            "",
            markdown_table(*versus),
            "",
            f"Each loss and {baseline} interpolated as above at the low end, middle and high end of the KL range "
            "the two share. The interval: each problem's answers interpolated with the accuracy's weights (the "
            "share of seeds that solved it), differences paired on the same problems, percentile bootstrap over "
            "problems; it does not count the uncertainty of where each run's KL lies.",
        ]
    knobs = " and ".join(["β", *sorted(set(along) - set(BETA_KEYS))])
    text += ["", f"### Accuracy (%) at nominal {knobs}", "", markdown_table(*nominal_table(lines)), ""]
    return "\n".join(text), [plot]
