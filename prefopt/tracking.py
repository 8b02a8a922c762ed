"""Where metrics go: `metrics.jsonl` and `summary.json` in the run directory, and W&B when configured.

A run never fails because W&B is unreachable: a failed `wandb.init` or `log` is reported once and the
run goes on with its local files. A failed local write (disk full, permission, read-only) stops the run with one
line naming the file, the errno text and the last complete checkpoint; files are replaced atomically and an
append that fails is cut back, so what was written before stays readable.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from prefopt.checkpoint import last_complete
from prefopt.io import append_text, atomic_write_json, atomic_write_text, named_errors, remove_leftovers

log = logging.getLogger(__name__)


@dataclass
class WandbSpec:
    """`conf/logger/wandb.yaml`. `mode` None follows WANDB_MODE (online when unset)."""

    project: str = "prefopt"
    entity: str | None = None
    group: str | None = None
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)
    mode: str | None = None
    name: str | None = None
    init_timeout: float = 60.0  # seconds wandb.init may take before the run goes on without W&B


def _clean(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class RunLog:
    """Writes one JSON object per logging step; only the main process writes anything."""

    wandb: Any  # the W&B run, None without one

    def __init__(
        self,
        run_dir: Path,
        config: dict,
        wandb_spec: WandbSpec | None = None,
        enabled: bool = True,
        resume_step: int | None = None,
    ):
        self.run_dir, self.enabled, self.wandb = Path(run_dir), enabled, None
        self.metrics_path = self.run_dir / "metrics.jsonl"
        if not enabled:
            return
        with named_errors(self.run_dir, "run directory", action="create", note=self._note):
            self.run_dir.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.run_dir)
        if resume_step is not None:
            self._truncate_after(resume_step)
        elif self.metrics_path.exists():
            with named_errors(self.metrics_path, "the old metrics file", action="remove", note=self._note):
                self.metrics_path.unlink()
        if wandb_spec is not None:
            self._init_wandb(wandb_spec, config)

    def _note(self) -> str:
        return last_complete(self.run_dir / "checkpoints")

    def _truncate_after(self, step: int) -> None:
        # After a resume the steps past the checkpoint are logged again; drop their old lines.
        if not self.metrics_path.exists():
            return
        kept = [
            line
            for line in self.metrics_path.read_text().splitlines()
            if line.strip() and (s := _step_of(line)) is not None and s <= step
        ]
        atomic_write_text(self.metrics_path, "".join(line + "\n" for line in kept), "metrics", self._note)

    def history(self) -> dict[str, float]:
        """The latest logged value of every metric (what a resumed run's summary starts from)."""
        last: dict[str, float] = {}
        if self.enabled and self.metrics_path.exists():
            for line in self.metrics_path.read_text().splitlines():
                if line.strip():
                    last.update({k: v for k, v in json.loads(line).items() if k != "step"})
        return last

    def _init_wandb(self, spec: WandbSpec, config: dict) -> None:
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        atomic_write_text(id_file, run_id, "W&B run id", self._note)  # the same id after a requeue: the run continues
        try:
            import wandb

            self.wandb = wandb.init(
                project=spec.project,
                entity=spec.entity,
                group=spec.group,
                job_type=spec.job_type,
                tags=list(spec.tags),
                name=spec.name,
                config=config,
                id=run_id,
                resume="allow",
                dir=str(self.run_dir),
                mode=cast(Any, spec.mode or os.environ.get("WANDB_MODE") or "online"),
                settings=wandb.Settings(init_timeout=spec.init_timeout, silent=True),
            )
            self.wandb.define_metric("step")
            for prefix in ("train", "eval"):
                self.wandb.define_metric(f"{prefix}/*", step_metric="step")
            # The runs table keeps the best value next to the last: the lowest eval loss and chosen reward
            # (how far DCR went), the highest accuracy, margin and share of chosen rewards below zero.
            for name, summary in (
                ("eval/loss", "min,last"),
                ("eval/rewards/accuracies", "max,last"),
                ("eval/rewards/margins", "max,last"),
                ("eval/rewards/chosen", "min,last"),
                ("train/dcr/chosen_reward_below_zero", "max,last"),
                ("eval/dcr/chosen_reward_below_zero", "max,last"),
            ):
                self.wandb.define_metric(name, step_metric="step", summary=summary)
        except Exception as exc:  # noqa: BLE001 - W&B problems never stop a run
            log.warning("W&B is unavailable (%s: %s); logging to %s only", type(exc).__name__, exc, self.metrics_path)
            self.wandb = None

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": step, **{k: _clean(float(v)) for k, v in metrics.items()}}
        append_text(self.metrics_path, json.dumps(row) + "\n", "metrics", self._note)
        if self.wandb is not None:
            try:
                self.wandb.log(row)
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B log failed (%s); continuing with local files", exc)
                self.wandb = None

    def log_histograms(self, step: int, values: dict[str, Any]) -> None:
        """Distributions over pairs (name: array of per-pair values) as `wandb.Histogram`s; W&B only (the local
        files hold the per-pair values themselves, see prefopt.displacement)."""
        if not self.enabled or self.wandb is None or not values:
            return
        try:
            import wandb

            self.wandb.log({"step": step, **{k: wandb.Histogram(list(v)) for k, v in values.items() if len(v)}})
        except Exception as exc:  # noqa: BLE001
            log.warning("W&B histogram log failed (%s); continuing with local files", exc)
            self.wandb = None

    def write_json(self, name: str, payload: dict) -> Path | None:
        if not self.enabled:
            return None
        return atomic_write_json(self.run_dir / name, payload, note=self._note, indent=2, default=str)

    def suspend(self) -> None:
        """The job stops to be requeued: W&B marks the run preempting and closes it before SLURM ends the job's
        processes (W&B's own service among them); the requeued job continues the same run id."""
        if self.wandb is not None:
            try:
                self.wandb.mark_preempting()
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B could not be closed before the requeue (%s)", exc)
            self.wandb = None
        # Its service process too, now: left to W&B's exit hook, that finds the process already ended by SLURM's
        # SIGTERM and prints a traceback into the job's log.
        wandb = sys.modules.get("wandb")
        if wandb is not None and self.enabled:
            try:
                wandb.teardown()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B's service had already stopped (%s: %s)", type(exc).__name__, exc)

    def finish(self, summary: dict) -> None:
        self.write_json("summary.json", summary)
        if self.wandb is not None:
            try:
                for key, value in summary.get("metrics", {}).items():
                    if self.wandb.summary.get(key) is None:  # keep define_metric's min/max/last summaries
                        self.wandb.summary[key] = value
                self.wandb.finish()
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B finish failed (%s)", exc)


def _step_of(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None
