"""Runs as the report reads them: one `RunRecord` per run directory (summary, metrics history, overrides).

`prefopt.reporting.wandb_runs` builds the same records from a W&B group, so tables and plots never know
where a run came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from prefopt.errors import PrefoptError
from prefopt.stats import StatsError, read_benchmarks

SPLIT_METRICS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "dcr/chosen_reward_below_zero",
    "dcr/chosen_logp_delta_per_token",
    "dcr/rejected_logp_delta_per_token",
)
CSV_METRICS = [f"{split}/{m}" for split in ("train", "eval") for m in SPLIT_METRICS]
# The printed / markdown table: what a reader compares first; the CSV has every column.
TABLE_METRICS = [
    "train/loss",
    "eval/loss",
    "eval/rewards/chosen",
    "eval/rewards/rejected",
    "eval/rewards/margins",
    "eval/rewards/accuracies",
    "train/dcr/chosen_reward_below_zero",
    "eval/dcr/chosen_reward_below_zero",
]
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
    seed: str | None = None  # the run's `seed` (override, else resolved config)
    beta: float | None = None  # the loss's resolved β (a run without a `beta` override still has one)
    # per benchmark {problem index: correct} from `verified/` and `verified_before/` (empty when not written)
    outcomes: dict[str, dict[int, bool]] = field(default_factory=dict)
    outcomes_before: dict[str, dict[int, bool]] = field(default_factory=dict)


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
    record = RunRecord(
        name=name,
        source=str(run_dir),
        status="incomplete",
        step=max(steps) if steps else None,
        loss=loss,
        overrides=parse_overrides(overrides or []),
        final={k: points[-1][1] for k, points in history.items()},
        history=history,
    )
    seed = record.overrides.get("seed", resolved.get("seed") if isinstance(resolved, dict) else None)
    record.seed = None if seed is None else str(seed)
    record.beta = to_number((resolved.get("loss") or {}).get("beta")) if isinstance(resolved, dict) else None
    try:
        record.outcomes = read_benchmarks(run_dir / "verified")
        record.outcomes_before = read_benchmarks(run_dir / "verified_before")
    except StatsError as exc:
        raise ReportError(str(exc)) from None
    if isinstance(summary, dict):
        metrics = {k: to_number(v) for k, v in summary.get("metrics", {}).items()}
        record.final = {k: v for k, v in metrics.items() if v is not None}
        record.status = str(summary.get("status", "complete"))
        record.step = summary.get("step", record.step)
        record.loss = summary.get("loss", record.loss)
        record.wall_time_s = to_number(summary.get("wall_time_s"))
        record.peak_memory_mb = to_number(summary.get("peak_memory_mb"))
    return record
