"""The training engine: micro-batches, accumulation, clipping, optimizer step, evaluation, logging, checkpoints.

It knows no model names, loss names or distributed strategies: it gets a policy, a reference provider
(`prefopt.reference_providers`: a frozen model, the LoRA base, a disk cache or TR-DPO's moving copy; none for a
reference-free loss), a `Loss` (see `prefopt.losses`), batches of tokenized pairs, and a `Hardware`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from tqdm.auto import tqdm

from prefopt.checkpoint import last_complete, load_latest, remove_partial, save_checkpoint
from prefopt.data.batching import PairBatcher, PreferenceBatch, TokenizedPair, collate, micro_batches
from prefopt.displacement import DisplacementLog, batch_rows, start_rows, token_logps
from prefopt.errors import ConfigError, TrainingError
from prefopt.hardware import Hardware, peak_memory_mb, process_age_s, rng_state, set_rng_state, stop_signals
from prefopt.io import atomic_dir
from prefopt.logprobs import DEFAULT_CHUNK_ELEMENTS, PairLogpsModel, autocast_dtype, packing_layout
from prefopt.losses import Loss, LossOutput, PairLogps
from prefopt.reference_providers import ReferenceProvider
from prefopt.tracking import RunLog

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """The top-level knobs of a run (`steps`, `batch_size`, ... in `conf/config.yaml`)."""

    steps: int | None = 60  # optimizer steps; null: from `epochs` once the pairs are known (`resolve_steps`)
    batch_size: int = 16  # pairs per optimizer step (global, over all ranks)
    micro_batch_size: int = 8  # pairs per forward/backward on one rank
    eval_every: int = 20  # steps; 0 = only at the end
    save_every: int = 0  # steps; 0 = only the final checkpoint
    log_every: int = 1
    keep_checkpoints: int = 2
    on_nonfinite: str = "stop"  # stop | skip
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    # true: one shared-prefix row per pair (sdpa/eager), or one flat row of all sequences (flash-attention's
    # variable-length kernels); false: padded rows; or "shared_prefix" / "flat". Same values, less work.
    packing: bool | str = True
    compile: bool = False  # torch.compile the decoder of the policy and the live reference (see PairLogpsModel)
    token_metrics: bool = True  # the policy's `entropy` and `mean_token_accuracy`, from the tiled LM head
    # TR-DPO: every `reference_sync_every` optimizer steps θ_ref ← α·θ + (1 − α)·θ_ref (None/0: never)
    reference_sync_every: int | None = None
    reference_sync_alpha: float = 0.6
    progress: bool = True
    epochs: float | None = None  # passes over the training pairs, instead of `steps`

    def validate(self, world_size: int = 1) -> None:
        if (self.steps is None) == (self.epochs is None):
            raise ConfigError(
                f"set exactly one of steps and epochs (got steps={self.steps}, epochs={self.epochs}); "
                f"e.g. steps=null epochs=2"
            )
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"epochs must be > 0 (got {self.epochs})")
        for name in ("steps", "batch_size", "micro_batch_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0 (got {getattr(self, name)})")
        per_rank, rem = divmod(self.batch_size, world_size)
        if rem:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be divisible by the number of processes ({world_size})"
            )
        if per_rank % self.micro_batch_size:
            raise ConfigError(
                f"batch_size per process ({per_rank}) must be divisible by micro_batch_size ({self.micro_batch_size})"
            )
        if self.packing not in (True, False, "auto", "shared_prefix", "flat"):
            raise ConfigError(f"train.packing must be true, false, shared_prefix or flat (got {self.packing!r})")
        if self.on_nonfinite not in ("stop", "skip"):
            raise ConfigError(f"on_nonfinite must be stop or skip (got {self.on_nonfinite!r})")
        self.validate_reference_sync()

    def validate_reference_sync(self) -> None:
        """TR-DPO's settings (`reference_sync.every` / `.alpha`)."""
        every = self.reference_sync_every
        if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 0):
            raise ConfigError(f"reference_sync.every must be a number of steps >= 1, or null (got {every!r})")
        alpha = self.reference_sync_alpha
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha <= 1:
            raise ConfigError(f"reference_sync.alpha must be in (0, 1] (got {alpha!r})")


def resolve_steps(config: TrainConfig, num_pairs: int) -> TrainConfig:
    """`config` with its optimizer steps fixed: `steps`, or `epochs` passes over `num_pairs` pairs in batches of
    `batch_size` (rounded up)."""
    if config.steps is not None:
        return config
    if num_pairs < 1:
        raise ConfigError(f"epochs={config.epochs}: there are no training pairs to count epochs over")
    assert config.epochs is not None  # TrainConfig.validate: exactly one of steps and epochs
    return dataclasses.replace(
        config, steps=max(1, math.ceil(config.epochs * num_pairs / config.batch_size)), epochs=None
    )


def resolve_warmup(warmup_steps: int | None, warmup_ratio: float | None, steps: int) -> int:
    """Learning-rate warm-up steps: `optimizer.warmup_steps`, or `optimizer.warmup_ratio` of the run's steps."""
    if (warmup_steps is None) == (warmup_ratio is None):
        raise ConfigError(
            f"set exactly one of optimizer.warmup_steps and optimizer.warmup_ratio "
            f"(got {warmup_steps} and {warmup_ratio})"
        )
    if warmup_ratio is not None:
        if not 0 <= warmup_ratio < 1:
            raise ConfigError(f"optimizer.warmup_ratio must be in [0, 1) (got {warmup_ratio})")
        return math.ceil(warmup_ratio * steps)
    assert warmup_steps is not None  # exactly one of the two is set
    return warmup_steps


def pair_metrics(out: LossOutput, policy: PairLogps, reference: PairLogps | None) -> dict[str, torch.Tensor]:
    """Per-pair values of the metrics every loss gets (spec: 'Metrics every loss gets for free')."""
    c, r = out.chosen_reward.detach().float(), out.rejected_reward.detach().float()
    m = {
        "loss": out.loss.detach().float(),
        "rewards/chosen": c,
        "rewards/rejected": r,
        "rewards/margins": c - r,
        "rewards/accuracies": (c > r).float(),
        "logps/chosen": policy.chosen.detach().float(),
        "logps/rejected": policy.rejected.detach().float(),
        "dcr/chosen_reward_below_zero": (c < 0).float(),
    }
    if reference is not None:
        m["dcr/chosen_logp_delta_per_token"] = (
            (policy.chosen - reference.chosen).detach() / policy.chosen_tokens
        ).float()
        m["dcr/rejected_logp_delta_per_token"] = (
            (policy.rejected - reference.rejected).detach() / policy.rejected_tokens
        ).float()
    if policy.chosen_entropy is not None:  # TRL's names: the policy's per-token entropy on both completions, and
        tokens = (policy.chosen_tokens + policy.rejected_tokens).float()  # the share of chosen tokens it ranks first
        assert policy.rejected_entropy is not None and policy.chosen_top1 is not None  # the diagnostics come together
        m["entropy"] = ((policy.chosen_entropy + policy.rejected_entropy).detach() / tokens).float()
        m["mean_token_accuracy"] = (policy.chosen_top1.detach() / policy.chosen_tokens).float()
    return m


class MetricSums:
    """Sums of per-pair metrics (and pair-weighted loss-specific scalars) over the micro-batches of a step."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.pairs = 0

    def add(self, per_pair: dict[str, torch.Tensor], scalars: dict[str, torch.Tensor], n: int) -> None:
        for k, v in per_pair.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v.sum())
        for k, v in scalars.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(v) * n
        self.pairs += n

    def means(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": v / max(self.pairs, 1) for k, v in self.sums.items()}


@dataclass
class TrainerParts:
    """The objects a `Trainer` is built from (`TrainConfig` holds its numbers)."""

    policy: torch.nn.Module
    loss: Loss
    optimizer_factory: Callable  # params -> optimizer
    scheduler_factory: Callable  # optimizer -> learning-rate schedule
    train_pairs: Sequence[TokenizedPair]
    eval_pairs: Sequence[TokenizedPair]
    pad_id: int
    reference: ReferenceProvider | None = None  # None: a reference-free loss
    seed: int = 0  # the batch order's
    max_grad_norm: float | None = 1.0
    # the module that turns a batch into PairLogps (a reward model's pair scores: prefopt.mathloop.reward.bradley_terry)
    pair_model: Callable = PairLogpsModel
    # a held-out pair's prompt and responses as text, for the displacement file (prefopt.displacement.pair_texts)
    describe: Callable | None = None
    # token-level displacement of the held-out pairs at every evaluation (a preference run; not the warm-up's SFT
    # nor a reward model's pair scores)
    track_displacement: bool = False


class Trainer:
    """Owns the order that distributed training needs: resume weights → wrap (DDP/FSDP) → optimizer → its state.

    `Trainer(parts, config, hardware, run_dir)` only checks and keeps its parts; `setup()` does that work (it
    reads checkpoints and wraps the models), then `fit(run_log)` trains.
    """

    def __init__(self, parts: TrainerParts, config: TrainConfig, hardware: Hardware, run_dir: Path | str):
        config.validate(hardware.world_size)
        loss = parts.loss
        if loss.reference and parts.reference is None:
            raise ConfigError(f"loss {loss.key!r} needs a reference model, but none was set up")
        self.parts, self.policy, self.loss, self.reference = parts, parts.policy, loss, parts.reference
        self.cfg, self.hw = config, hardware
        self.batcher = PairBatcher(parts.train_pairs, config.batch_size, parts.seed, hardware.rank, hardware.world_size)
        self.eval_pairs = list(parts.eval_pairs)
        self.pad_id, self.max_grad_norm = parts.pad_id, parts.max_grad_norm
        self.run_dir, self.ckpt_dir = Path(run_dir), Path(run_dir) / "checkpoints"
        self.device = hardware.torch_device
        self.step = 0
        self.skipped_steps = 0
        self.finished = False  # the final evaluation and checkpoint are done
        self.config_record: dict = {}  # what a checkpoint must have been made with to be resumed
        self.packing = packing_layout(config.packing, self.policy)  # the batch layout: shared_prefix, flat or None
        self.resumed_from: int | None = None
        # token-level displacement of the held-out pairs at every evaluation: against the reference, or for a
        # reference-free loss against the starting policy's per-token log-probs, recorded in `setup`
        tracked = parts.track_displacement and (parts.reference is not None or not loss.reference)
        self.displacement = DisplacementLog(run_dir, self.eval_pairs, parts.describe) if tracked else None
        self.start_logps: dict | None = None  # pair id -> (chosen, rejected) per-token log-probs at step 0

    def setup(self, resume_from: Path | str | None = None, config_record: dict | None = None) -> Trainer:
        """Resume the weights (from `resume_from`, else this run's checkpoints), wrap the policy and the
        reference, build the optimizer and schedule, and restore their state; returns the trainer.

        `config_record`: the settings a checkpoint is tied to; one written with others is refused."""
        self.config_record = config_record or {}
        hardware, config, parts = self.hw, self.cfg, self.parts
        if hardware.is_main:
            remove_partial(self.ckpt_dir)  # a killed save's `.tmp-step_*` holds the space the next save needs
        # Weights first (into the unwrapped model), so every rank starts from the same full state.
        found = load_latest(Path(resume_from) if resume_from else self.ckpt_dir, self.policy)
        autocast = autocast_dtype(hardware)  # hardware.mixed_precision=bf16 without FSDP
        needs = getattr(self.loss, "needs", ())  # the optional PairLogps fields the loss reads (its yaml's `needs`)
        self.policy_logps = hardware.wrap(
            parts.pair_model(
                self.policy,
                config.chunk_elements,
                autocast,
                config.compile,
                fields=needs,
                diagnostics=config.token_metrics,
            ),
            trainable=True,
        )
        if self.reference is not None:
            self.reference.attach(
                policy=self.policy,
                policy_logps=self.policy_logps,
                hardware=hardware,
                wrap=lambda model: hardware.wrap(
                    parts.pair_model(model, config.chunk_elements, autocast, config.compile, fields=needs),
                    trainable=False,
                ),
            )
        self.params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = parts.optimizer_factory(self.params)
        self.scheduler = parts.scheduler_factory(self.optimizer)
        if found is not None:
            self._restore(*found)
        elif resume_from:
            raise ConfigError(f"resume={resume_from}: no complete checkpoint there")
        if self.displacement is not None and self.reference is None and self.eval_pairs:
            if found is None:
                self.start_logps = self._held_out_token_logps()
            elif self.start_logps is None:  # a checkpoint written before the starting values were kept
                log.warning("%s keeps no starting log-probs: no displacement in this run", found[0])
                self.displacement = None
        return self

    @torch.no_grad()
    def _held_out_token_logps(self) -> dict:
        """The policy's per-token log-probs of every held-out pair, by pair id (the same on every rank)."""
        self.policy.eval()
        values: dict = {}
        for micro in micro_batches(self.eval_pairs[self.hw.rank :: self.hw.world_size], self.cfg.micro_batch_size):
            values.update(token_logps(micro, self.policy_logps(self.collate(micro), per_token=True)))
        self.policy.train()
        return dict(self.hw.all_gather_list(list(values.items())))

    # -- one optimizer step -------------------------------------------------------------------------
    def reference_logps(
        self, batch: PreferenceBatch, pairs: Sequence[TokenizedPair], per_token: bool = False
    ) -> PairLogps | None:
        if not self.loss.reference or self.reference is None:  # (None only for a reference-free loss)
            return None
        with torch.no_grad():
            return (
                self.reference.logps(batch, pairs, per_token=True) if per_token else self.reference.logps(batch, pairs)
            )

    def collate(self, pairs: Sequence[TokenizedPair]) -> PreferenceBatch:
        """A micro-batch on the device."""
        return collate(pairs, self.pad_id, packing=self.packing).to(self.device)

    def forward_loss(
        self, batch: PreferenceBatch, pairs: Sequence[TokenizedPair], per_token: bool = False
    ) -> tuple[LossOutput, PairLogps, PairLogps | None]:
        """`per_token` (the evaluation's displacement): with each completion token's log-prob too."""
        policy = self.policy_logps(batch, per_token=True) if per_token else self.policy_logps(batch)
        reference = self.reference_logps(batch, pairs, per_token)
        return self.loss(policy, reference), policy, reference

    def accumulate(self, pairs: Sequence[TokenizedPair], step: int) -> tuple[MetricSums, int]:
        """Forward and backward over the micro-batches of one step; gradients equal the full batch's mean."""
        sums, tokens = MetricSums(), 0
        for micro in micro_batches(pairs, self.cfg.micro_batch_size):
            batch = self.collate(micro)
            out, policy, reference = self.forward_loss(batch, micro)
            if not torch.isfinite(out.loss).all():
                bad = [batch.pair_ids[i] for i in (~torch.isfinite(out.loss)).nonzero().flatten().tolist()]
                raise _NonFinite(f"non-finite loss at step {step + 1} for pairs {bad}")
            # mean over the global batch = Σ micro sums / global batch size (DDP averages over ranks too)
            (out.loss.sum() * (self.hw.world_size / self.cfg.batch_size)).backward()
            sums.add(pair_metrics(out, policy, reference), out.metrics, batch.num_pairs)
            tokens += batch.num_tokens
        return sums, tokens

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        self.policy.train()
        self.loss.train()
        self.optimizer.zero_grad(set_to_none=True)
        step = self.step
        try:
            sums, tokens = self.accumulate(self.batcher.batch(step), step)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.max_grad_norm or float("inf"))
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP2 returns a DTensor
            if not torch.isfinite(norm):
                raise _NonFinite(
                    f"non-finite gradient norm at step {step + 1} for pairs {self.batcher.batch_ids(step)}"
                )
        except _NonFinite as exc:
            if self.cfg.on_nonfinite == "skip":
                self.optimizer.zero_grad(set_to_none=True)
                self.skipped_steps += 1
                self.step += 1
                log.warning("%s; step skipped (on_nonfinite=skip)", exc)
                return {"train/skipped_steps": self.skipped_steps}
            raise TrainingError(
                f"{exc}; the run stopped, the last checkpoint in {self.ckpt_dir} is intact "
                f"(set on_nonfinite=skip to skip such steps)"
            ) from None
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.step += 1
        metrics = sums.means("train")
        elapsed = time.perf_counter() - t0
        metrics.update(
            {
                "train/grad_norm": float(norm),
                "train/lr": lr,
                "train/epoch": self.batcher.epoch(self.step),
                "train/tokens_per_s": tokens * self.hw.world_size / elapsed,
                "train/step_time_s": elapsed,
            }
        )
        return self.hw.all_reduce_mean(metrics)

    # -- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, run_log: RunLog | None = None) -> dict[str, float]:
        """Metrics over the held-out pairs; with a reference also their token-level displacement (its file, its
        scalars, and its histograms through `run_log`)."""
        if not self.eval_pairs:
            return {}
        self.policy.eval()
        self.loss.eval()
        sums, rows = MetricSums(), []
        share = self.eval_pairs[self.hw.rank :: self.hw.world_size]
        for micro in micro_batches(share, self.cfg.micro_batch_size):
            batch = self.collate(micro)
            out, policy, reference = self.forward_loss(batch, micro, per_token=self.displacement is not None)
            sums.add(pair_metrics(out, policy, reference), out.metrics, batch.num_pairs)
            if self.displacement is not None:
                rows += (
                    batch_rows(micro, policy, reference)
                    if reference is not None
                    else start_rows(micro, policy, cast(dict, self.start_logps))
                )
        self.policy.train()
        self.loss.train()
        metrics = self.hw.all_reduce_mean(sums.means("eval"))
        if self.displacement is not None:
            scalars, values = self.displacement.finish(self.step, self.hw.all_gather_list(rows), self.hw.is_main)
            metrics.update(scalars)
            if run_log is not None:
                run_log.log_histograms(self.step, values)
        return metrics

    # -- checkpoints ----------------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "step": self.step,
            "optimizer": self.hw.optimizer_state_dict(self.policy, self.optimizer),
            "scheduler": self.scheduler.state_dict(),
            "loss": self.loss.state_dict(),
            "rng": rng_state(),
            "skipped_steps": self.skipped_steps,
            "finished": self.finished,
            "config": self.config_record,
            **(self.reference.state_dict() if self.reference is not None else {}),
            **({"start_logps": self.start_logps} if self.start_logps is not None else {}),
        }

    def save(self) -> Path | None:
        """A checkpoint of the current step (collective under FSDP: every rank calls it, rank 0 writes)."""
        weights, state = self.hw.full_state_dict(self.policy), self.state()
        path = None
        if self.hw.is_main:
            path = save_checkpoint(
                self.ckpt_dir, self.step, self.policy, state, keep=self.cfg.keep_checkpoints, state_dict=weights
            )
        self.hw.barrier()
        return path

    def export(self, path: Path) -> None:
        """The trained policy as a `from_pretrained`-loadable directory (collective under FSDP)."""
        weights = self.hw.full_state_dict(self.policy)
        if self.hw.is_main:
            with atomic_dir(path, "the trained policy", note=lambda: last_complete(self.ckpt_dir)) as tmp:
                cast(Any, self.policy).save_pretrained(tmp, safe_serialization=True, state_dict=weights)
        self.hw.barrier()

    def _restore(self, path: Path, state: dict) -> None:
        saved = state.get("config", {})
        changed = sorted(k for k in set(saved) | set(self.config_record) if saved.get(k) != self.config_record.get(k))
        if changed:
            shown = ", ".join(f"{k}: {saved.get(k)!r} -> {self.config_record.get(k)!r}" for k in changed[:6])
            raise ConfigError(
                f"{path} was written by a different config ({shown}); resume it with the same "
                f"settings, or start in a new run directory (hydra.run.dir=...)"
            )
        self.hw.load_optimizer_state_dict(self.policy, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.loss.load_state_dict(state["loss"])
        if self.reference is not None:  # TR-DPO: the reference as it was at that step, not the initial policy
            self.reference.load_state_dict(state, path)
        set_rng_state(state["rng"])
        self.step, self.skipped_steps = state["step"], state.get("skipped_steps", 0)
        self.start_logps = state.get("start_logps")  # a reference-free loss's held-out values at step 0
        # finished = its final evaluation and checkpoint were written; a resume with more steps goes on
        assert self.cfg.steps is not None  # resolved (resolve_steps) before the Trainer is built
        self.finished = state.get("finished", False) and self.step >= self.cfg.steps
        self.resumed_from = self.step
        log.info("resumed from %s (step %d)", path, self.step)

    # -- the loop -------------------------------------------------------------------------------------
    def fit(self, run_log: RunLog) -> dict:
        """Train to `config.steps` (from where `setup` resumed), logging to `run_log`; returns the result."""
        assert self.cfg.steps is not None  # resolved (resolve_steps) before the Trainer is built
        start = time.perf_counter()
        last: dict[str, float] = run_log.history() if self.resumed_from is not None else {}
        bar = tqdm(
            total=self.cfg.steps,
            initial=self.step,
            desc="train",
            disable=not (self.cfg.progress and self.hw.is_main),
            dynamic_ncols=True,
        )
        with StopSignals() as stop:
            first = self.step
            while self.step < self.cfg.steps and not self.finished:
                metrics = self.train_step()
                if self.step == first + 1:
                    log.info("step %d done %.1f s after the process started", self.step, process_age_s())
                if self.reference is not None:
                    self.reference.after_step(self.step)  # TR-DPO's sync: before this step's evaluation and checkpoint
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps:
                    metrics.update(self.evaluate(run_log))
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    run_log.log(self.step, metrics)
                last.update(metrics)
                if self.cfg.save_every and self.step % self.cfg.save_every == 0 and self.step < self.cfg.steps:
                    self.save()
                bar.update(1)
                bar.set_postfix(
                    loss=f"{last.get('train/loss', math.nan):.4f}",
                    acc=f"{last.get('train/rewards/accuracies', math.nan):.2f}",
                )
                if self._agreed(stop.received is not None) and self.step < self.cfg.steps:
                    t0 = time.perf_counter()
                    self.save()  # SLURM's warning before the time limit, or a preemption: keep this step
                    bar.close()
                    log.warning(
                        "%s received: checkpoint of step %d written to %s in %.2f s; exiting for a requeue",
                        stop.name,
                        self.step,
                        self.ckpt_dir,
                        time.perf_counter() - t0,
                    )
                    run_log.suspend()
                    stop.hand_over()  # to submitit's own handler (it requeues the job), else a clean exit
        bar.close()
        if not self.finished:
            final_eval = self.evaluate(run_log)
            if final_eval:
                run_log.log(self.step, final_eval)
                last.update(final_eval)
            self.finished = True
            self.save()
        return {
            "metrics": last,
            "wall_time_s": time.perf_counter() - start,
            "peak_memory_mb": peak_memory_mb(),
            "skipped_steps": self.skipped_steps,
        }

    def _agreed(self, flag: bool) -> bool:
        """Every rank stops at the same step (the signal may reach them a step apart)."""
        if not self.hw.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())


class StopSignals:
    """SIGTERM and the launcher's time-limit signal (`prefopt.hardware.stop_signals`) ask the loop to stop.

    The handler only records the signal; the loop checks it between steps, writes a checkpoint, then hands the
    signal on to the handler that was there before (submitit's requeues the job) or exits cleanly.
    """

    def __init__(self, signals: tuple[int, ...] | None = None):
        self.signals = tuple(signals) if signals is not None else stop_signals()
        self.received: int | None = None
        self.previous: dict[int, Any] = {}  # signal.signal's previous handlers

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else ""

    def _record(self, signum, frame):
        self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for num in self.signals:
                self.previous[num] = signal.signal(num, self._record)
        return self

    def __exit__(self, *exc) -> None:
        for num, handler in self.previous.items():
            signal.signal(num, handler)

    def hand_over(self) -> None:
        # A rank can agree to stop (another rank got the signal) before its own signal arrives: it hands over the
        # signal the scheduler sends to every rank.
        received = self.received if self.received is not None else self.signals[0]
        previous = self.previous.get(received)
        self.__exit__()
        if callable(previous):
            previous(received, None)
        raise SystemExit(128 + int(received))


class _NonFinite(Exception):
    pass
