"""Sweep reports: a table and plots over run directories, a multirun directory, or a W&B group.

    python -m prefopt.report outputs/multirun/2026-11-22/06-20-12            # a sweep
    python -m prefopt.report outputs/runs/a outputs/runs/b --out reports/ab  # any runs
    python -m prefopt.report wandb:ENTITY/PROJECT/GROUP                      # through the W&B API

Writes `report.md`, `report.csv` and PNG plots (`prefopt.report_plots`) into the sweep directory (or `--out`)
and prints the table; W&B groups are read by `prefopt.report_wandb`. A run without `summary.json` (killed, failed, still running) is a row with
status `incomplete` and the last values it logged. `ReportCallback` runs the same at the end of a Hydra
multirun (and of a single run).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

from hydra.experimental.callback import Callback

from prefopt.errors import PrefoptError

log = logging.getLogger(__name__)

SPLIT_METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "dcr/chosen_reward_below_zero", "dcr/chosen_logp_delta_per_token",
                 "dcr/rejected_logp_delta_per_token")
CSV_METRICS = [f"{split}/{m}" for split in ("train", "eval") for m in SPLIT_METRICS]
# The printed / markdown table: what a reader compares first; the CSV has every column.
TABLE_METRICS = ["train/loss", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected", "eval/rewards/margins",
                 "eval/rewards/accuracies", "train/dcr/chosen_reward_below_zero", "eval/dcr/chosen_reward_below_zero"]
VERIFIED, VERIFIED_BEFORE = "eval/verified/", "eval/verified_before/"
SKIP_DIRS = {"checkpoints", "final", "wandb", "__pycache__"}


class ReportError(PrefoptError):
    """No runs where the report was pointed, or a W&B group that cannot be read."""


@dataclass
class RunRecord:
    """One run as the report sees it, whether read from a directory or from W&B (`prefopt.report_wandb`)."""

    name: str  # relative directory ("0", "sweep/3") or W&B run name
    source: str  # the directory or W&B path
    status: str  # complete | incomplete | a W&B state
    step: int | None
    loss: str | None
    overrides: dict[str, str]
    final: dict[str, float]
    history: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    wall_time_s: float | None = None
    peak_memory_mb: float | None = None
    label: str = ""  # set by the report: the overrides that tell this run from the others


# --- reading runs --------------------------------------------------------------------------------------

def to_number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)  # tracking writes non-finite values as strings
    return None


def _natural(path: Path) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path.name))


def _is_run(d: Path) -> bool:
    return any((d / f).is_file() for f in ("metrics.jsonl", "summary.json", ".hydra/config.yaml"))


def find_runs(path: Path, depth: int = 3) -> list[Path]:
    """`path` itself when it is a run directory, else the run directories below it (sweep order)."""
    if _is_run(path):
        return [path]
    if depth == 0 or not path.is_dir():
        return []
    found = []
    for child in sorted((c for c in path.iterdir() if c.is_dir()), key=_natural):
        if not child.name.startswith(".") and child.name not in SKIP_DIRS:
            found += find_runs(child, depth - 1)
    return found


def parse_overrides(items: Iterable[Any]) -> dict[str, str]:
    """Hydra override strings (`loss=bpo`, `+x=1`, `~y`) as {key: value}."""
    out: dict[str, str] = {}
    for item in items:
        item = str(item)
        if item.startswith("~"):
            out[item[1:].split("=")[0]] = "(deleted)"
            continue
        key, sep, value = item.lstrip("+").partition("=")
        if sep:
            out[key] = value
    return out


def _yaml(path: Path) -> Any:
    import yaml

    try:
        return yaml.safe_load(path.read_text()) if path.is_file() else None
    except (OSError, yaml.YAMLError):
        return None


def read_history(path: Path) -> dict[str, list[tuple[int, float]]]:
    """{metric: [(step, value), ...]} from `metrics.jsonl`; a cut last line (a killed run) is skipped."""
    history: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return history
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
            step = int(row["step"])
        except (ValueError, KeyError, TypeError):
            continue
        for key, value in row.items():
            v = to_number(value)
            if key != "step" and v is not None:
                history.setdefault(key, []).append((step, v))
    return history


def read_run(run_dir: Path, name: str) -> RunRecord:
    """A run directory: `summary.json` when the run completed, else the last lines of `metrics.jsonl`."""
    history = read_history(run_dir / "metrics.jsonl")
    overrides = _yaml(run_dir / ".hydra" / "overrides.yaml")
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = None
    if overrides is None and summary:
        overrides = summary.get("overrides")
    resolved = _yaml(run_dir / "resolved_config.yaml") or _yaml(run_dir / ".hydra" / "config.yaml") or {}
    loss = (resolved.get("loss") or {}).get("key") if isinstance(resolved, dict) else None
    steps = [s for points in history.values() for s, _ in points]
    record = RunRecord(name=name, source=str(run_dir), status="incomplete", step=max(steps) if steps else None,
                       loss=loss, overrides=parse_overrides(overrides or []),
                       final={k: points[-1][1] for k, points in history.items()}, history=history)
    if isinstance(summary, dict):
        metrics = {k: to_number(v) for k, v in summary.get("metrics", {}).items()}
        record.final = {k: v for k, v in metrics.items() if v is not None}
        record.status = str(summary.get("status", "complete"))
        record.step = summary.get("step", record.step)
        record.loss = summary.get("loss", record.loss)
        record.wall_time_s = to_number(summary.get("wall_time_s"))
        record.peak_memory_mb = to_number(summary.get("peak_memory_mb"))
    return record


def collect(paths: Iterable[str | Path]) -> tuple[list[RunRecord], Path | None]:
    """The runs under `paths` (directories or `wandb:` groups) and the directory they share."""
    local = [Path(p) for p in paths if not str(p).startswith("wandb:")]
    for p in local:
        if not p.exists():
            raise ReportError(f"no such directory: {p}")
    root = Path(os.path.commonpath([p.resolve() for p in local])) if local else None
    records: list[RunRecord] = []
    for p in paths:
        if str(p).startswith("wandb:"):
            from prefopt.report_wandb import read_wandb

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
    keys = {k for r in records for k in r.final if k.startswith(prefix) and "/" not in k[len(prefix):]}
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
    verified = _verified_keys(records, VERIFIED) + _verified_keys(records, VERIFIED_BEFORE)
    has = lambda k: any(k in r.final for r in records)  # noqa: E731
    metrics = [k for k in CSV_METRICS if has(k)]
    columns = (["run", "dir", *differ, "status", "step"] + (["loss"] if show_loss else []) + metrics + verified
               + ["wall_time_s", "peak_memory_mb"])
    rows = []
    for r in records:
        row = {"run": r.name, "dir": r.source, "status": r.status, "step": r.step, "loss": r.loss,
               "wall_time_s": r.wall_time_s, "peak_memory_mb": r.peak_memory_mb}
        row.update({k: r.overrides.get(k, "") for k in differ})  # "" = not overridden: the default
        row.update({k: r.final.get(k) for k in metrics + verified})
        rows.append({c: row.get(c) for c in columns})
    shown = (["run", *differ, "status", "step"] + (["loss"] if show_loss else [])
             + [k for k in TABLE_METRICS if has(k)] + ["wall_time_s"])  # accuracy has its own table
    return {"columns": columns, "rows": rows, "shown": shown, "differ": differ, "common": common,
            "verified": [k for k in verified if k.startswith(VERIFIED)]}


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
    names = [k[len(VERIFIED):] for k in keys]
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

def write_report(paths: Iterable[str | Path], out_dir: str | Path | None = None, echo: bool = False) -> dict:
    """Write `report.md`, `report.csv` and the plots for the runs under `paths`; returns what it wrote."""
    from prefopt import report_plots

    paths = [str(p) for p in paths]
    records, root = collect(paths)
    if out_dir is None:
        group = next((p.rsplit("/", 1)[-1] for p in paths if p.startswith("wandb:")), "wandb")
        out_dir = root if root is not None else Path("outputs") / "reports" / group
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = build_table(records)

    csv_path = out / "report.csv"
    with csv_path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=table["columns"])
        writer.writeheader()
        writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in table["rows"])

    plots = report_plots.plot_all(records, out, table["verified"])
    main = markdown_table(table["shown"], [[row.get(c) for c in table["shown"]] for row in table["rows"]])
    vtable = verified_table(records, table["verified"]) if table["verified"] else ""
    md = _markdown(records, paths, table, main, vtable, {p.name for p in plots})
    md_path = out / "report.md"
    md_path.write_text(md)
    if echo:
        print(main + ("\n\nVerified accuracy (%):\n" + vtable if vtable else ""))
        written = ", ".join([csv_path.name] + [p.name for p in plots])
        print(f"\nreport: {md_path} ({len(records)} run{'s' * (len(records) != 1)}; {written})")
    return {"out_dir": out, "runs": records, "columns": table["columns"], "rows": table["rows"], "table": main,
            "files": {"md": md_path, "csv": csv_path, "plots": plots}}


def _markdown(records, paths, table, main: str, vtable: str, plots: set[str]) -> str:
    incomplete = [r.name for r in records if r.status != "complete"]
    common = " ".join(f"`{k}={v}`" for k, v in table["common"].items())
    lines = [f"# prefopt report: {len(records)} run{'s' * (len(records) != 1)}", "",
             f"From {', '.join(f'`{p}`' for p in paths)}; written {datetime.now():%Y-%m-%d %H:%M}.", ""]
    if common:
        lines += [f"Common to all runs: {common}" if len(table["common"]) <= 16
                  else f"{len(table['common'])} settings are common to all runs.", ""]
    lines += ["## Runs", "", main, "",
              "Final values from each run's `summary.json`; rewards are β·log(π/π_ref) of the completions. "
              "`report.csv` has every column (train and eval, all DCR metrics, peak memory)."]
    if incomplete:
        lines += ["", f"Incomplete (no `summary.json`: killed, failed or still running): {', '.join(incomplete)}; "
                      "their values are the last ones they logged."]
    lines += ["", "## Rewards over training", "", "![rewards](rewards.png)", "",
              "Chosen reward, rejected reward and margin per optimizer step (solid: train batches, dotted: eval). "
              "A chosen reward below the dashed zero line is the degraded-chosen-response (DCR) effect.", "",
              "## Share of pairs with chosen reward below zero", "", "![chosen below zero](chosen_below_zero.png)",
              "", "## Verified accuracy", ""]
    if vtable:
        lines += [vtable, "", "Accuracy (%) of answers checked by the verifier, per benchmark and mean.", ""]
        if "verified_accuracy.png" in plots:
            lines += ["![verified accuracy](verified_accuracy.png)"]
    else:
        lines += ["No run has verified accuracy (`eval/verified/*` in its summary): the benchmark evaluation "
                  "was off or did not finish, so there is no accuracy chart."]
    return "\n".join(lines) + "\n"


class ReportCallback(Callback):
    """Hydra callback: the report over the sweep directory when a multirun ends (and over the run directory
    when a single run ends, if `run`). A failing report is logged, never raised: the runs are what matter."""

    def __init__(self, multirun: bool = True, run: bool = True, jobs: list[str] | None = None) -> None:
        # `jobs`: the Hydra job names (entry-point modules) whose single runs get a report; None = all
        self.multirun, self.run, self.jobs = multirun, run, list(jobs) if jobs else None

    def on_multirun_end(self, config, **kwargs: Any) -> None:
        if self.multirun:
            self._report(lambda: config.hydra.sweep.dir)

    def on_run_end(self, config, **kwargs: Any) -> None:
        if self.jobs is not None and config.hydra.job.name not in self.jobs:
            return  # e.g. `python -m prefopt.sft` writes no preference metrics to report on
        if self.run and os.environ.get("RANK", "0") == "0":  # under torchrun every rank runs this
            self._report(lambda: config.hydra.runtime.output_dir)

    @staticmethod
    def _report(where) -> None:
        try:
            write_report([str(where())], echo=True)
        except Exception as exc:  # noqa: BLE001
            log.warning("report not written (%s: %s)", type(exc).__name__, exc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m prefopt.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", metavar="PATH",
                        help="run directories, multirun directories, or wandb:ENTITY/PROJECT/GROUP")
    parser.add_argument("--out", type=Path, help="where to write (default: the sweep directory / common parent)")
    parser.add_argument("--wandb", action="append", default=[], metavar="ENTITY/PROJECT/GROUP",
                        help="a W&B group to read through the API (same as PATH wandb:ENTITY/PROJECT/GROUP)")
    args = parser.parse_args(argv)
    paths = list(args.paths) + [f"wandb:{w}" for w in args.wandb]
    if not paths:
        parser.error("give at least one PATH (or --wandb ENTITY/PROJECT/GROUP)")
    try:
        write_report(paths, args.out, echo=True)
    except PrefoptError as exc:
        print(f"prefopt.report: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
