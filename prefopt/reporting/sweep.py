"""Sweep reports: a table and plots over run directories, a multirun directory, or a W&B group.

    python -m prefopt.report outputs/multirun/2026-11-22/06-20-12            # a sweep
    python -m prefopt.report outputs/runs/a outputs/runs/b --out reports/ab  # any runs
    python -m prefopt.report wandb:ENTITY/PROJECT/GROUP                      # through the W&B API

Writes `report.md`, `report.csv` and PNG plots (`prefopt.reporting.plots`) into the sweep directory (or `--out`)
and prints the table; runs are read by `prefopt.reporting.runs`, W&B groups by `prefopt.reporting.wandb_runs`. A run
without `summary.json` (killed, failed, still running) is a row with
status `incomplete` and the last values it logged. `ReportCallback` runs the same at the end of a Hydra
multirun (and of a single run).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import OmegaConf

from prefopt import ranks
from prefopt.io import atomic_write_text
from prefopt.reporting.compare import METHODS, compare, rows_for_csv, tables
from prefopt.reporting.displaced import section as displaced_section
from prefopt.reporting.frontier import frontier_section
from prefopt.reporting.plots import plot_all
from prefopt.reporting.runs import (
    CSV_METRICS,
    TABLE_METRICS,
    VERIFIED,
    VERIFIED_BEFORE,
    ReportError,
    RunRecord,
    find_runs,
    read_run,
)
from prefopt.reporting.wandb_runs import read_wandb
from prefopt.stats import StatsError

log = logging.getLogger(__name__)


def collect(paths: Iterable[str | Path]) -> tuple[list[RunRecord], Path | None]:
    """The runs under `paths` (directories or `wandb:` groups) and the directory they share."""
    local = [Path(p) for p in paths if not str(p).startswith("wandb:")]
    for directory in local:
        if not directory.exists():
            raise ReportError(f"no such directory: {directory}")
    root = Path(os.path.commonpath([p.resolve() for p in local])) if local else None
    records: list[RunRecord] = []
    for p in paths:
        if str(p).startswith("wandb:"):
            records += read_wandb(str(p))
            continue
        runs = find_runs(Path(p))
        if not runs:
            raise ReportError(f"no run directories under {p} (a run has metrics.jsonl, summary.json or .hydra/)")
        for run in runs:
            name = os.path.relpath(run.resolve(), root)
            records.append(read_run(run, run.name if name == "." else name))
    return records, root


# --- the table -----------------------------------------------------------------------------------------


def differing(records: list[RunRecord]) -> tuple[list[str], dict[str, str]]:
    """Override keys whose values differ between runs (in first-seen order), and the ones all runs share."""
    keys = list(dict.fromkeys(k for r in records for k in r.overrides))
    differ = [k for k in keys if len({r.overrides.get(k) for r in records}) > 1]
    common = {k: records[0].overrides[k] for k in keys if k not in differ}
    return differ, common


def _verified_keys(records: list[RunRecord], prefix: str) -> list[str]:
    keys = {k for r in records for k in r.final if k.startswith(prefix) and "/" not in k[len(prefix) :]}
    return sorted(keys, key=lambda k: (k.endswith("/mean"), k))


def build_table(records: list[RunRecord]) -> dict[str, Any]:
    """Columns and rows (dicts of raw values) for the CSV, and the subset the markdown table shows."""
    differ, common = differing(records)
    for r in records:
        r.label = " ".join(f"{k}={r.overrides[k]}" for k in differ if k in r.overrides) or r.name
    if len({r.label for r in records}) < len(records):
        for r in records:
            r.label = f"{r.name}: {r.label}" if r.label != r.name else r.name
    show_loss = len({r.loss for r in records}) > 1 and "loss" not in differ
    verified = [
        k
        for prefix in (VERIFIED, VERIFIED_BEFORE, "eval/preserved/", "eval/improved/", "eval/kl/")
        for k in _verified_keys(records, prefix)
    ]
    has = lambda k: any(k in r.final for r in records)  # noqa: E731
    metrics = [k for k in CSV_METRICS if has(k)]
    columns = (
        ["run", "dir", *differ, "status", "step"]
        + (["loss"] if show_loss else [])
        + metrics
        + verified
        + ["wall_time_s", "peak_memory_mb"]
    )
    rows = []
    for r in records:
        row = {
            "run": r.name,
            "dir": r.source,
            "status": r.status,
            "step": r.step,
            "loss": r.loss,
            "wall_time_s": r.wall_time_s,
            "peak_memory_mb": r.peak_memory_mb,
        }
        row.update({k: r.overrides.get(k, "") for k in differ})  # "" = not overridden: the default
        row.update({k: r.final.get(k) for k in metrics + verified})
        rows.append({c: row.get(c) for c in columns})
    shown = (
        ["run", *differ, "status", "step"]
        + (["loss"] if show_loss else [])
        + [k for k in TABLE_METRICS if has(k)]
        + [k for k in ("eval/kl/greedy", "eval/kl/sampled") if has(k)]
        + ["wall_time_s"]
    )  # accuracy has its own table
    return {
        "columns": columns,
        "rows": rows,
        "shown": shown,
        "differ": differ,
        "common": common,
        "verified": [k for k in verified if k.startswith(VERIFIED)],
    }


def fmt(value: Any) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [[fmt(v).replace("|", "\\|") for v in row] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) if cells else len(h) for i, h in enumerate(header)]
    line = lambda vals: "| " + " | ".join(v.ljust(w) for v, w in zip(vals, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, cells)])


def verified_table(records: list[RunRecord], keys: list[str]) -> str:
    """The paper's layout: one row per run (and the policy before preference training), accuracy in %."""
    names = [k[len(VERIFIED) :] for k in keys]
    pct = lambda v: None if v is None else f"{100 * v:.1f}"  # noqa: E731
    before = [tuple(r.final.get(VERIFIED_BEFORE + n) for n in names) for r in records]
    rows = []
    if any(any(v is not None for v in b) for b in before):
        if len(set(before)) == 1:  # every run started from the same policy
            rows.append(["before preference training", *map(pct, before[0])])
        else:
            rows += [[f"{r.label} (before)", *map(pct, b)] for r, b in zip(records, before)]
    rows += [[r.label, *(pct(r.final.get(k)) for k in keys)] for r in records]
    return markdown_table(["run", *names], rows)


# --- writing -------------------------------------------------------------------------------------------


def csv_text(columns: list[str], rows: list[dict]) -> str:
    """Rows as CSV text (missing values empty)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return buffer.getvalue()


def write_report(
    paths: Iterable[str | Path],
    out_dir: str | Path | None = None,
    echo: bool = False,
    baseline: str | None = None,
    along: Sequence[str] = ("beta",),
) -> dict:
    """Write `report.md`, `report.csv`, `comparison.csv` and the plots for the runs under `paths`; returns what
    it wrote. `baseline`: the loss every other setting is compared with (None: dpo when present; "none": off).
    `along`: the overrides whose settings of one loss make one line of the KL frontier (β always)."""
    names = [str(p) for p in paths]
    records, root = collect(names)
    if out_dir is None:
        group = next((p.rsplit("/", 1)[-1] for p in names if p.startswith("wandb:")), "wandb")
        out_dir = root if root is not None else Path("outputs") / "reports" / group
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(records)
    try:
        comparison = compare(records, baseline)
    except StatsError as exc:
        raise ReportError(str(exc)) from None

    csv_path = out / "report.csv"
    atomic_write_text(csv_path, csv_text(table["columns"], table["rows"]), what="report")
    comparison_rows = rows_for_csv(comparison)
    comparison_path = out / "comparison.csv"
    atomic_write_text(
        comparison_path,
        csv_text(
            [
                "setting",
                "seeds",
                "metric",
                "statistic",
                "estimate",
                "low",
                "high",
                "p_value",
                "n",
                "method",
                "baseline",
            ],
            comparison_rows,
        ),
        what="report",
    )

    plots = plot_all(records, out, comparison["groups"], comparison["benchmarks"])
    main = markdown_table(table["shown"], [[row.get(c) for c in table["shown"]] for row in table["rows"]])
    vtable = verified_table(records, table["verified"]) if table["verified"] else ""
    seeds = seed_section(comparison)
    frontier, frontier_plots = frontier_section(
        comparison["groups"], comparison["benchmarks"], out, markdown_table, comparison["baseline"], along
    )
    plots += frontier_plots
    md = _markdown(records, names, table, main, vtable, {p.name for p in plots}) + seeds + frontier
    displaced_md, displaced_plots, displaced_text = displaced_section(records, out, markdown_table)
    md, plots = md + displaced_md, plots + displaced_plots
    md_path = out / "report.md"
    atomic_write_text(md_path, md, what="report")
    if echo:
        print(main + ("\n\nVerified accuracy (%):\n" + vtable if vtable else "") + "\n" + seeds + displaced_text)
        written = ", ".join([csv_path.name, comparison_path.name] + [p.name for p in plots])
        print(f"\nreport: {md_path} ({len(records)} run{'s' * (len(records) != 1)}; {written})")
    return {
        "out_dir": out,
        "runs": records,
        "columns": table["columns"],
        "rows": table["rows"],
        "table": main,
        "comparison": comparison,
        "files": {"md": md_path, "csv": csv_path, "comparison": comparison_path, "plots": plots},
    }


TITLES = {
    "accuracy": "Verified accuracy over seeds (%)",
    "preservation": "Preservation and improvement (%)",
    "versus": "Paired difference in accuracy against {baseline} (points)",
    "dcr": "DCR metrics over seeds (final values on the held-out pairs)",
    "dcr_versus": "DCR metrics: paired difference against {baseline}",
}


def seed_section(comparison: dict) -> str:
    """The report's comparison over seeds: one table per statistic, each `estimate [95% interval]`."""
    base = comparison["baseline"]
    lines = [
        "",
        "## Over seeds: intervals and paired differences",
        "",
        "Runs grouped by every override except `seed`. " + METHODS.format(baseline=base or "baseline"),
        "",
    ]
    if base is None:
        lines += ["No baseline (no run trained with dpo, or `--baseline none`): no paired differences.", ""]
    elif not any(g.setting["loss"] == base for g in comparison["groups"]):
        lines += [f"No run trained with the baseline `{base}`: no paired differences.", ""]
    for name, (header, rows) in tables(comparison).items():
        lines += [f"### {TITLES[name].format(baseline=base)}", "", markdown_table(header, rows), ""]
    return "\n".join(lines)


def _markdown(records, paths, table, main: str, vtable: str, plots: set[str]) -> str:
    incomplete = [r.name for r in records if r.status != "complete"]
    common = " ".join(f"`{k}={v}`" for k, v in table["common"].items())
    lines = [
        f"# prefopt report: {len(records)} run{'s' * (len(records) != 1)}",
        "",
        f"From {', '.join(f'`{p}`' for p in paths)}; written {datetime.now():%Y-%m-%d %H:%M}.",
        "",
    ]
    if common:
        lines += [
            f"Common to all runs: {common}"
            if len(table["common"]) <= 16
            else f"{len(table['common'])} settings are common to all runs.",
            "",
        ]
    lines += [
        "## Runs",
        "",
        main,
        "",
        "Final values from each run's `summary.json`; rewards are β·log(π/π_ref) of the completions. "
        "`report.csv` has every column (train and eval, all DCR metrics, peak memory).",
    ]
    if incomplete:
        lines += [
            "",
            f"Incomplete (no `summary.json`: killed, failed or still running): {', '.join(incomplete)}; "
            "their values are the last ones they logged.",
        ]
    lines += [
        "",
        "## Rewards over training",
        "",
        "![rewards](rewards.png)",
        "",
        "Chosen reward, rejected reward and margin per optimizer step (solid: train batches, dotted: eval). "
        "A chosen reward below the dashed zero line is the degraded-chosen-response (DCR) effect.",
        "",
        "## Share of pairs with chosen reward below zero",
        "",
        "![chosen below zero](chosen_below_zero.png)",
        "",
        "## Verified accuracy",
        "",
    ]
    if vtable:
        lines += [vtable, "", "Accuracy (%) of answers checked by the verifier, per benchmark and mean.", ""]
        if "verified_accuracy.png" in plots:
            lines += ["![verified accuracy](verified_accuracy.png)"]
    else:
        lines += [
            "No run has verified accuracy (`eval/verified/*` in its summary): the benchmark evaluation "
            "was off or did not finish, so there is no accuracy chart."
        ]
    return "\n".join(lines) + "\n"


class ReportCallback(Callback):
    """Hydra callback: the report over the sweep directory when a multirun ends (and over the run directory
    when a single run ends, if `run`). A failing report is logged, never raised: the runs are what matter."""

    def __init__(
        self, multirun: bool = True, run: bool = True, jobs: list[str] | None = None, baseline: str | None = None
    ) -> None:
        # `jobs`: the Hydra job names (entry-point modules) whose single runs get a report; None = all
        # `baseline`: the loss the others are compared with; the run config's `report.baseline` overrides it
        self.multirun, self.run, self.jobs = multirun, run, list(jobs) if jobs else None
        self.baseline = baseline

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.multirun:
            self._report(lambda: config.hydra.sweep.dir, self._baseline(config))

    def on_run_end(self, config, **kwargs: Any) -> None:
        if self.jobs is not None and config.hydra.job.name not in self.jobs:
            return  # e.g. `python -m prefopt.sft` writes no preference metrics to report on
        if self.run and ranks.rank() == 0:  # under torchrun every rank runs this
            self._report(lambda: config.hydra.runtime.output_dir, self._baseline(config))

    def _baseline(self, config) -> str | None:
        chosen = OmegaConf.select(config, "report.baseline", default=None)
        return self.baseline if chosen is None else str(chosen)

    @staticmethod
    def _report(where, baseline: str | None = None) -> None:
        try:
            write_report([str(where())], echo=True, baseline=baseline)
        except Exception as exc:  # noqa: BLE001
            log.warning("report not written (%s: %s)", type(exc).__name__, exc)
