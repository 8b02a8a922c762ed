"""The warm-up stage (SFT): train a policy by NLL on the chosen (target) responses (`python -m prefopt.sft`).

The objective is one more `prefopt.losses.Loss` (reference-free, per-pair −ℓ_w / n_w), so the warm-up
runs through the same `Trainer` step as preference training: micro-batches, accumulation, clipping,
checkpoints, DDP/FSDP. Each example goes in as a pair whose rejected side is its chosen side again: with
the engine's shared-prefix packing (`train.packing`) the two are one row, so nothing is computed twice.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import get_scheduler

from prefopt.engine import TrainConfig, Trainer, TrainerParts
from prefopt.errors import ConfigError
from prefopt.losses import Loss, LossOutput, PairLogps
from prefopt.tracking import RunLog

log = logging.getLogger("prefopt")


def nll(policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
    """Per-pair mean token negative log-likelihood of the chosen response, −ℓ_w / n_w.

    The rejected side is not used; rewards report the per-token log-probs ℓ̄_w and ℓ̄_l, as reference-free
    losses do.
    """
    return LossOutput(
        loss=-policy.chosen_mean,
        chosen_reward=policy.chosen_mean.detach(),
        rejected_reward=policy.rejected_mean.detach(),
    )


class SFTObjective(Loss):
    """The warm-up objective: `nll` as a reference-free Loss."""

    def __init__(self):
        super().__init__("sft", nll, reference=False)


def targets_only(pairs: Sequence) -> list:
    """Pairs whose rejected side is their chosen side (one packed row each: the NLL needs no second answer)."""
    return [dataclasses.replace(p, rejected_ids=p.chosen_ids) for p in pairs]


@dataclass
class StageSchedule:
    """The schedule of a stage that trains through the engine on its own (the optimizer is the run's): the SFT
    warm-up (`warmup:`) and the reward model (`reward:`), each with its own defaults."""

    steps: int = 350
    batch_size: int = 32
    micro_batch_size: int = 32
    lr: float = 3.0e-3
    warmup_steps: int = 10
    scheduler: str = "cosine"
    seed: int = 0
    progress: bool = True
    key = "warmup"  # the config key errors name

    def __post_init__(self):
        for name in ("steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{self.key}.{name} must be >= 1 (got {getattr(self, name)})")
        if not self.lr > 0:
            raise ConfigError(f"{self.key}.lr must be > 0 (got {self.lr})")
        if self.batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{self.key}.batch_size ({self.batch_size}) must be divisible by "
                f"{self.key}.micro_batch_size ({self.micro_batch_size})"
            )

    def train_config(self, **settings) -> TrainConfig:
        """The engine's TrainConfig for this stage: its own steps and batches, no periodic eval."""
        return TrainConfig(
            steps=self.steps,
            batch_size=self.batch_size,
            micro_batch_size=self.micro_batch_size,
            eval_every=0,
            progress=self.progress,
            **settings,
        )

    def optimizer(self, factory: Callable) -> Callable:
        """The run's optimizer factory at this stage's learning rate."""
        return lambda params: factory(params, lr=self.lr)

    def scheduler_factory(self) -> Callable:
        """A transformers schedule of `scheduler` over this stage's steps."""
        return lambda opt: get_scheduler(
            self.scheduler, opt, num_warmup_steps=self.warmup_steps, num_training_steps=self.steps
        )


@dataclass
class WarmupConfig(StageSchedule):
    """`warmup:` in conf/mathloop.yaml: the SFT stage's schedule."""


def warm_up(
    policy: torch.nn.Module,
    train_pairs: Sequence,
    eval_pairs: Sequence,
    pad_id: int,
    config: WarmupConfig,
    optimizer_factory: Callable,
    hardware,
    run_dir: Path,
    max_grad_norm: float | None = 1.0,
    chunk_elements: int | None = None,
    run_log=None,
) -> dict:
    """Train `policy` in place on the chosen responses of `train_pairs`; returns the Trainer's result.

    Checkpoints go to `run_dir/checkpoints`, so an interrupted warm-up resumes where it stopped.
    """
    train_pairs, eval_pairs = targets_only(train_pairs), targets_only(eval_pairs)
    train = config.train_config(**({"chunk_elements": chunk_elements} if chunk_elements else {}))
    parts = TrainerParts(
        policy=policy,
        loss=SFTObjective(),
        optimizer_factory=config.optimizer(optimizer_factory),
        scheduler_factory=config.scheduler_factory(),
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        pad_id=pad_id,
        seed=config.seed,
        max_grad_norm=max_grad_norm,
    )
    trainer = Trainer(parts, train, hardware, run_dir).setup()
    run_log = run_log or RunLog(
        run_dir, {"warmup": vars(config)}, None, enabled=hardware.is_main, resume_step=trainer.resumed_from
    )
    if trainer.resumed_from is not None:
        log.info("warm-up resumed at step %d", trainer.resumed_from)
    log.info("warm-up (SFT): %d steps of %d responses, lr %g", config.steps, config.batch_size, config.lr)
    result = trainer.fit(run_log)
    result["trainer"] = trainer
    return result
