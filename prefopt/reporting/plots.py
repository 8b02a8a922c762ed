"""The report's figures: reward curves, the share of chosen rewards below zero, verified accuracy per run.

Drawn with matplotlib's object API on the Agg canvas (no pyplot, no global backend switch), at fixed sizes
(`SIZES` × `DPI` pixels) so a figure looks the same whatever the number of runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 100
SIZES = {"rewards.png": (15.0, 4.8), "chosen_below_zero.png": (9.0, 4.8), "verified_accuracy.png": (11.0, 5.0)}
REWARDS = (
    ("rewards/chosen", "chosen reward"),
    ("rewards/rejected", "rejected reward"),
    ("rewards/margins", "margin (chosen − rejected)"),
)


def _figure(name: str, ncols: int = 1) -> tuple[Figure, Any]:
    fig = Figure(figsize=SIZES[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, ncols, squeeze=False)[0]


def _color(i: int, n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def _curve(ax, runs: Sequence[Any], key: str) -> bool:
    """Train (solid) and eval (dotted, dots) curves of `key` for each run; False when no run logged it."""
    drawn = False
    for i, run in enumerate(runs):
        for split, style in (("train", dict(ls="-", lw=1.6)), ("eval", dict(ls=":", marker="o", ms=3.5, lw=1.2))):
            points = run.history.get(f"{split}/{key}", [])
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, color=_color(i, len(runs)), **style)
                drawn = True
    return drawn


def _legend(fig: Figure, runs: Sequence[Any]) -> None:
    handles = [Line2D([], [], color=_color(i, len(runs)), lw=2) for i in range(len(runs))]
    handles += [Line2D([], [], color="gray", ls="-"), Line2D([], [], color="gray", ls=":", marker="o", ms=3.5)]
    labels = [r.label for r in runs] + ["train", "eval"]
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)


def reward_curves(runs: Sequence[Any], path: Path) -> Path:
    fig, axes = _figure(path.name, ncols=len(REWARDS))
    for ax, (key, title) in zip(axes, REWARDS):
        if not _curve(ax, runs, key):
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.axhline(0.0, color="black", lw=0.9, ls="--", zorder=0)
        ax.set(title=title, xlabel="optimizer step")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("β · log π/π_ref")
    _legend(fig, runs)
    fig.savefig(path, dpi=DPI)
    return path


def chosen_below_zero(runs: Sequence[Any], path: Path) -> Path:
    fig, (ax,) = _figure(path.name)
    if not _curve(ax, runs, "dcr/chosen_reward_below_zero"):
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    ax.set(
        title="share of pairs with chosen reward < 0",
        xlabel="optimizer step",
        ylabel="fraction of pairs",
        ylim=(-0.03, 1.03),
    )
    ax.axhline(0.5, color="gray", lw=0.8, ls="--", zorder=0)
    ax.grid(alpha=0.3)
    _legend(fig, runs)
    fig.savefig(path, dpi=DPI)
    return path


def verified_bars(groups: Sequence[Any], names: Sequence[str], path: Path) -> Path:
    """Grouped bars: one group of bars per benchmark, one bar per setting (the mean over its seeds) with its 95%
    interval as an error bar; a black tick marks the starting policy's accuracy when that was measured."""
    fig, (ax,) = _figure(path.name)
    width = 0.8 / max(len(groups), 1)
    has_before = False
    for i, group in enumerate(groups):
        xs = [g - 0.4 + width * (i + 0.5) for g in range(len(names))]
        found = [group.accuracy.get(n) for n in names]
        values = [100 * iv.estimate if iv else float("nan") for iv in found]
        err = [
            [100 * (iv.estimate - iv.low) if iv and iv.low is not None else 0 for iv in found],
            [100 * (iv.high - iv.estimate) if iv and iv.high is not None else 0 for iv in found],
        ]
        ax.bar(
            xs,
            values,
            width * 0.92,
            color=_color(i, len(groups)),
            label=f"{group.label} ({len(group.runs)})",
            yerr=err,
            capsize=3,
            error_kw={"lw": 1.2},
        )
        for x, name in zip(xs, names):
            before = group.before.get(name)
            if before is not None:
                ax.hlines(100 * before.estimate, x - width * 0.46, x + width * 0.46, color="black", lw=2)
                has_before = True
    ax.set_xticks(range(len(names)), names)
    ax.set(
        ylabel="accuracy (%)", title="verified accuracy per benchmark (mean over seeds, 95% interval)", ylim=(0, 100)
    )
    ax.grid(axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if has_before:
        handles.append(Line2D([], [], color="black", lw=2))
        labels.append("before preference training")
    fig.legend(handles, labels, loc="outside right upper", fontsize="small", frameon=False)
    fig.savefig(path, dpi=DPI)
    return path


def plot_all(runs: Sequence[Any], out_dir: Path, groups: Sequence[Any] = (), names: Sequence[str] = ()) -> list[Path]:
    """Every figure the report has data for; returns their paths. `groups` (prefopt.reporting.compare.Group)
    carry the verified accuracy over seeds of each setting on the benchmarks `names`."""
    out_dir = Path(out_dir)
    paths = [reward_curves(runs, out_dir / "rewards.png"), chosen_below_zero(runs, out_dir / "chosen_below_zero.png")]
    stale = out_dir / "verified_accuracy.png"
    if names and any(g.accuracy for g in groups):
        paths.append(verified_bars(groups, names, stale))
    elif stale.exists():
        stale.unlink()  # a chart from an earlier report would contradict this one
    return paths
