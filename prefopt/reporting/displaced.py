"""The report's token-level displacement section: per run, its last evaluation's displacement file
(`prefopt.displacement`): the share and size of the displaced pairs, histograms over pairs, the position profile,
and the most displaced pairs with their texts.

Figures are drawn with matplotlib's object API on the Agg canvas, as `prefopt.reporting.plots` draws its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from prefopt import displacement
from prefopt.reporting.plots import DPI

HIST, PROFILE = "displacement_hist.png", "displacement_profile.png"
SIZES = {HIST: (12.0, 4.4), PROFILE: (12.0, 4.4)}
WORST = 5  # pairs listed
SIDES = (("chosen", "chosen response"), ("rejected", "rejected response"))


def final_evaluations(records: Sequence[Any]) -> list[tuple[Any, int, Path, list[dict]]]:
    """(run, step, file, pairs) of each run's last evaluation that wrote a displacement file (local runs only)."""
    found = []
    for run in records:
        source = Path(run.source)
        files = displacement.steps(source) if source.is_dir() else {}
        if files:
            step = max(files)
            found.append((run, step, files[step], displacement.read(files[step])))
    return found


def _figure(name: str) -> tuple[Figure, Any]:
    fig = Figure(figsize=SIZES[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.subplots(1, 2, squeeze=False)[0]


def _color(i: int, n: int):
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return cmap(i % cmap.N)


def histograms(found: Sequence[tuple], path: Path) -> Path:
    """Per response side: the distribution over pairs of the per-token change, one outline per run."""
    fig, axes = _figure(path.name)
    for ax, (side, title) in zip(axes, SIDES):
        key = f"{side}_delta_per_token"
        values = [np.array([r[key] for r in pairs if r[key] is not None]) for _, _, _, pairs in found]
        edges = np.histogram_bin_edges(np.concatenate(values) if values else [0.0], bins=30)
        for i, ((run, step, _, _), v) in enumerate(zip(found, values)):
            ax.hist(
                v, bins=edges, histtype="step", lw=1.6, color=_color(i, len(found)), label=f"{run.label} (step {step})"
            )
        ax.axvline(0.0, color="black", lw=0.9, ls="--", zorder=0)
        ax.set(title=f"{title}: change per token", xlabel="(log π − log π_ref) / tokens", ylabel="pairs")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", frameon=False, loc="upper right")
    fig.savefig(path, dpi=DPI)
    return path


def position_profile(found: Sequence[tuple], path: Path) -> Path:
    """Per response side: the mean per-token change in each relative-position bin, over pairs (band: the middle
    half of the pairs, for a single run)."""
    fig, axes = _figure(path.name)
    for ax, (side, title) in zip(axes, SIDES):
        for i, (run, step, _, pairs) in enumerate(found):
            bins = displacement.profile(pairs, side)
            x = (np.arange(bins.shape[1]) + 0.5) * 100 / bins.shape[1]
            color = _color(i, len(found))
            with np.errstate(all="ignore"):
                mean = np.nanmean(bins, axis=0) if len(bins) else np.full(len(x), np.nan)
            ax.plot(x, mean, color=color, marker="o", ms=3.5, lw=1.6, label=f"{run.label} (step {step})")
            if len(found) == 1 and len(bins):
                low, high = np.nanpercentile(bins, [25, 75], axis=0)
                ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0, label="middle half of the pairs")
        ax.axhline(0.0, color="black", lw=0.9, ls="--", zorder=0)
        ax.set(title=f"{title}: where it changes", xlabel="position in the response (%)", xlim=(0, 100))
        ax.set_ylabel("mean change per token")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize="small", frameon=False, loc="best")
    fig.savefig(path, dpi=DPI)
    return path


def _short(text: str | None, width: int = 60) -> str:
    flat = " ".join((text or "").split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _runs_table(found: Sequence[tuple], table: Callable) -> str:
    head = ["run", "step", "pairs", "chosen fell", "median Δ/token where it fell", "rejected fell", "both fell"]
    head += [f"chosen Δ/token, first {displacement.FIRST_TOKENS}", "chosen Δ/token, rest"]
    rows = []
    for run, step, _, pairs in found:
        s = {k[len(displacement.PREFIX) :]: v for k, v in displacement.summary(pairs).items()}
        keys = ("chosen_fell", "chosen_fell_median_per_token", "rejected_fell", "both_fell")
        rows.append([run.label, step, len(pairs), *(s.get(k) for k in keys)])
        rows[-1] += [s.get("chosen_first_delta_per_token"), s.get("chosen_rest_delta_per_token")]
    return table(head, rows)


def worst_pairs(found: Sequence[tuple], n: int = WORST) -> list[tuple[Any, dict]]:
    """The `n` pairs whose chosen log-prob fell most per token at their run's last evaluation, over all runs."""
    ranked = [(run, r) for run, _, _, pairs in found for r in displacement.most_displaced(pairs, n)]
    return sorted(ranked, key=lambda x: x[1]["chosen_delta_per_token"])[:n]


def section(records: Sequence[Any], out: Path, table: Callable) -> tuple[str, list[Path], str]:
    """(markdown, figures, terminal text) of the displacement section; empty when no run wrote a displacement
    file (a reference-free loss, no held-out pairs, W&B runs). `table(header, rows)` draws a markdown table."""
    found = final_evaluations(records)
    if not found:
        for name in (HIST, PROFILE):  # a figure from an earlier report would contradict this one
            (out / name).unlink(missing_ok=True)
        return "", [], ""
    plots = [histograms(found, out / HIST), position_profile(found, out / PROFILE)]
    worst = worst_pairs(found)
    head = ["run", "step", "pair", "Δ chosen", "Δ chosen/token", "Δ rejected/token", "prompt", "chosen"]
    rows = [
        [run.label, r["step"], r["pair_id"], r["chosen_delta"], r["chosen_delta_per_token"]]
        + [r["rejected_delta_per_token"], _short(r.get("prompt_text")), _short(r.get("chosen_text"))]
        for run, r in worst
    ]
    md = [
        "",
        "## Token-level displacement on the held-out pairs",
        "",
        "At each run's last evaluation: the change log π − log π_ref of each held-out pair's chosen and rejected "
        "response against the reference (Δ; per token = divided by the response's tokens). 'Fell': the share of "
        "pairs whose log-prob went down. See docs/displacement.md.",
        "",
        _runs_table(found, table),
        "",
        f"![displacement histograms]({HIST})",
        "",
        f"![displacement position profile]({PROFILE})",
        "",
        f"### The {len(worst)} most displaced pairs (largest fall of the chosen log-prob per token)",
        "",
        table(head, rows),
        "",
        "Every pair, with its full texts and per-token changes: "
        + ", ".join(f"`{path}`" for _, _, path, _ in found[:4])
        + (" ..." if len(found) > 4 else ""),
        "",
    ]
    return "\n".join(md), plots, _terminal(worst)


def _terminal(worst: Sequence[tuple[Any, dict]]) -> str:
    lines = ["", f"The {len(worst)} most displaced held-out pairs (chosen log-prob change per token):"]
    for run, r in worst:
        lines += [
            f"  {run.label} step {r['step']} pair {r['pair_id']}: chosen Δ {r['chosen_delta']:+.3f} "
            f"({r['chosen_delta_per_token']:+.4f}/token), rejected Δ {r['rejected_delta']:+.3f}",
            f"    prompt:   {_short(r.get('prompt_text'), 200)}",
            f"    chosen:   {_short(r.get('chosen_text'), 200)}",
            f"    rejected: {_short(r.get('rejected_text'), 200)}",
        ]
    return "\n".join(lines)
