"""One preference-optimization run from a `RunPlan`: the steps `python -m prefopt.run` takes, in order.

`RunPlan` is what a run needs, as plain objects; the composition root (`prefopt.compose`) builds it from the
Hydra config, so this module never sees one.

    inputs → policy → reference provider → trainer (set up) and run log → fit and export → verify → summary

Each step is one function below. The verified-math loop (`prefopt.mathloop`) runs its stages before training
(warm-up, on-policy pairs, accuracy before) and returns what training starts from; the plan itself is never
changed.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from omegaconf import OmegaConf
from transformers import get_scheduler

from prefopt.ches_scores import CHESFilter
from prefopt.data.batching import tokenize_pairs
from prefopt.displacement import pair_texts
from prefopt.engine import Trainer, TrainerParts, resolve_steps, resolve_warmup
from prefopt.errors import ConfigError
from prefopt.hardware import seed_everything
from prefopt.io import atomic_write_text
from prefopt.mathloop.loop import MathLoop, Prepared
from prefopt.merge import MERGED, merge_adapters
from prefopt.models import freeze, load_model, load_tokenizer, reference_context
from prefopt.refcache import ReferenceCache, reference_cache
from prefopt.reference_providers import FrozenReference, ReferenceProvider, choose_reference
from prefopt.tokenizer import save_tokenizer
from prefopt.tracking import RunLog

log = logging.getLogger("prefopt")

# Settings a resumed run may change: how long it goes on, how often it evaluates/saves/logs, where it runs.
RESUMABLE_CHANGES = (
    "steps",
    "epochs",
    "train.epochs",
    "eval_every",
    "save_every",
    "resume",
    "train.steps",
    "train.eval_every",
    "train.save_every",
    "train.progress",
    "train.keep_checkpoints",
    "logger.",
    "hardware.",
    "on_nonfinite",
    "train.on_nonfinite",
    "validate",
)


@dataclass
class HydraInfo:
    """What Hydra knows about this job: its directory, group choices, sweep name and overrides."""

    run_dir: Path | None = None
    choices: dict = field(default_factory=dict)
    group: str | None = None
    overrides: list = field(default_factory=list)


@dataclass
class Schedule:
    """`optimizer.scheduler`, `optimizer.warmup_steps` or `warmup_ratio`: a transformers schedule over `steps`."""

    name: str
    warmup_steps: int | None
    warmup_ratio: float | None = None

    def factory(self, steps: int) -> Callable:
        warmup = resolve_warmup(self.warmup_steps, self.warmup_ratio, steps)
        return lambda opt: get_scheduler(self.name, opt, num_warmup_steps=warmup, num_training_steps=steps)


@dataclass
class RunPlan:
    """Everything a stage needs, as plain objects; built and validated before any model or data is loaded."""

    hardware: Any
    loss: Any
    train: Any
    model: Any
    data: Any
    wandb: Any
    loop: MathLoop
    optimizer_factory: Callable
    schedule: Schedule
    max_grad_norm: float | None
    tokenize: dict  # tokenize_pairs' max_length, max_prompt_length, chat_template, system_prompt
    seed: int
    resume: str | None
    reference_cache: Path | None
    resolved: dict  # the resolved config (plain), as written to resolved_config.yaml and W&B
    info: HydraInfo
    ches_filter: CHESFilter | None = None  # data.drop_top_ches: drop the highest-CHES training pairs first

    def run_dir(self, default: str) -> Path:
        """Hydra's job directory, else `default` (outside a Hydra app)."""
        return self.info.run_dir or Path(default)

    def job_wandb(self, run_dir: Path):
        """The W&B settings of a single-stage job: named after its directory (None without logger=wandb)."""
        if self.wandb is not None:
            self.wandb.name = self.wandb.name or run_dir.name
        return self.wandb


def resume_record(resolved: dict) -> dict:
    """The flattened config a checkpoint is tied to: a resume with other values is refused."""
    flat: dict[str, Any] = {}

    def walk(node, prefix=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            flat[prefix[:-1]] = node

    walk({k: v for k, v in resolved.items() if k != "hydra"})
    return {k: v for k, v in flat.items() if not any(k == c or k.startswith(c) for c in RESUMABLE_CHANGES)}


@dataclass
class Inputs:
    """What training reads: the loop's result, the tokenizer and the tokenized pairs."""

    prepared: Prepared
    tokenizer: Any
    train_pairs: list
    eval_pairs: list
    data_info: dict
    tokenize_stats: dict


def run_directory(plan: RunPlan, run_dir: Path | str | None, default: str = "outputs/run") -> Path:
    return Path(run_dir or plan.info.run_dir or plan.resolved.get("output_dir") or default)


def prepare_inputs(plan: RunPlan, hw, run_dir: Path) -> Inputs:
    """The loop's stages before training (cached), then the tokenizer and the tokenized train/eval pairs."""
    seed_everything(plan.seed)
    prepared = plan.loop.prepare(plan.model, plan.data, hw, run_dir)  # warm-up → pairs → accuracy before
    seed_everything(plan.seed)
    tokenizer = load_tokenizer(prepared.model)
    train_rows, eval_rows, data_info = prepared.data.load()
    args = dict(plan.tokenize, completion_eos=prepared.model.completion_eos)
    if plan.ches_filter is not None:  # scored under the starting policy, the run's reference
        train_rows, data_info["ches_filter"] = plan.ches_filter.apply(
            train_rows, prepared.model, tokenizer, args, hw, run_dir
        )
    train_pairs, train_tok = tokenize_pairs(train_rows, tokenizer, **args)
    eval_pairs, eval_tok = tokenize_pairs(eval_rows, tokenizer, **args)
    return Inputs(
        prepared, tokenizer, train_pairs, eval_pairs, data_info, {"train": vars(train_tok), "eval": vars(eval_tok)}
    )


def load_policy(inputs: Inputs, hw) -> torch.nn.Module:
    policy = load_model(inputs.prepared.model, vocab_size=len(inputs.tokenizer)).to(hw.torch_device)
    vocab = cast(Any, policy).get_output_embeddings().weight.shape[0]
    if len(inputs.tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(inputs.tokenizer)} tokens but the model's vocabulary only {vocab}")
    return policy


def cached_reference(plan: RunPlan, policy, inputs: Inputs, hw, directory: Path) -> ReferenceCache:
    """Reference log-probs of the initial policy from (or into) the disk cache in `directory`."""
    return reference_cache(
        directory,
        spec=inputs.prepared.model,
        policy=policy,
        tokenizer=inputs.tokenizer,
        data=inputs.prepared.data,
        tokenize=plan.tokenize,
        train_pairs=inputs.train_pairs,
        eval_pairs=inputs.eval_pairs,
        train_cfg=plan.train,
        hardware=hw,
        fields=plan.loss.needs,
    )


def make_reference(plan: RunPlan, policy, inputs: Inputs, hw) -> ReferenceProvider | None:
    """The reference the loss compares with: none, cached log-probs, the LoRA base, or a frozen copy (moving
    toward the policy with `reference_sync.every`)."""
    if not plan.loss.reference:
        return choose_reference(plan.loss, plan.train)
    if plan.reference_cache is not None:
        cache = cached_reference(plan, policy, inputs, hw, plan.reference_cache)
        return choose_reference(plan.loss, plan.train, cache=cache)
    if inputs.prepared.model.uses_lora:
        return choose_reference(plan.loss, plan.train, context=reference_context(policy))
    return choose_reference(plan.loss, plan.train, model=freeze(copy.deepcopy(policy)))


def make_trainer(
    plan: RunPlan, policy, reference: ReferenceProvider | None, inputs: Inputs, hw, run_dir: Path
) -> tuple[Trainer, RunLog]:
    """The Trainer, set up (resumed from `resume`, wrapped), and the run's log."""
    if plan.resume not in (None, "auto") and not Path(plan.resume).is_dir():
        raise ConfigError(f"resume={plan.resume}: not a directory of checkpoints")
    config = resolve_steps(plan.train, len(inputs.train_pairs))  # epochs=N: steps from the number of pairs
    assert config.steps is not None  # resolved
    parts = TrainerParts(
        policy=policy,
        loss=plan.loss,
        reference=reference,
        optimizer_factory=plan.optimizer_factory,
        scheduler_factory=plan.schedule.factory(config.steps),
        train_pairs=inputs.train_pairs,
        eval_pairs=inputs.eval_pairs,
        pad_id=inputs.tokenizer.pad_token_id,
        seed=plan.seed,
        max_grad_norm=plan.max_grad_norm,
        describe=pair_texts(inputs.tokenizer),
        track_displacement=True,
    )
    trainer = Trainer(parts, config, hw, run_dir).setup(
        resume_from=None if plan.resume in (None, "auto") else Path(plan.resume),
        config_record=resume_record(plan.resolved),
    )
    if plan.resume is None and trainer.resumed_from is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints and resume=null: use a new run directory")
    run_log = RunLog(
        run_dir, plan.resolved, name_wandb(plan, run_dir), enabled=hw.is_main, resume_step=trainer.resumed_from
    )
    if hw.is_main:
        atomic_write_text(run_dir / "resolved_config.yaml", OmegaConf.to_yaml(plan.resolved), what="resolved config")
        log.info(
            "run directory %s; %d train / %d eval pairs; loss %s %s; %s parameters",
            run_dir,
            len(inputs.train_pairs),
            len(inputs.eval_pairs),
            plan.loss.key,
            plan.loss.hparams,
            f"{sum(q.numel() for q in trainer.params):,}",
        )
    return trainer, run_log


def name_wandb(plan: RunPlan, run_dir: Path):
    """The W&B settings with the sweep as group, the run directory as name, and loss/model/data tags."""
    spec = plan.wandb
    if spec is not None:
        choices = plan.info.choices
        spec.group = spec.group or plan.info.group
        spec.name = spec.name or run_dir.name
        spec.tags = [f"{g}:{choices[g]}" for g in ("loss", "model", "data") if g in choices] + list(spec.tags)
    return spec


def fit_and_export(trainer: Trainer, run_log: RunLog, inputs: Inputs, hw, run_dir: Path, evaluates: bool) -> dict:
    """Train; write the policy (its LoRA adapters, or its weights) with its tokenizer. `model.lora.merge_on_export`
    also writes the adapters merged into a fresh full-precision copy of the base (prefopt.merge; never the 4-bit
    copy QLoRA trained on): here when no evaluation follows, else by the evaluation, which scores that copy."""
    result = trainer.fit(run_log)
    trainer.export(run_dir / "final")
    if hw.is_main:
        save_tokenizer(inputs.tokenizer, run_dir / "final")
        spec = inputs.prepared.model
        if spec.uses_lora and spec.lora["merge_on_export"] and not evaluates:
            merge_adapters(spec, run_dir / "final", run_dir / MERGED, inputs.tokenizer)
    return result


def verify(
    trainer: Trainer,
    run_log: RunLog,
    plan: RunPlan,
    policy,
    reference: ReferenceProvider | None,
    inputs: Inputs,
    hw,
    run_dir: Path,
    result: dict,
) -> dict:
    """Verified accuracy after training (the loop's last stage); its metrics join the run's. Returns details.
    A frozen reference in memory is the starting policy the KL estimate needs, so it is not loaded again
    (unless sharded under FSDP)."""
    prepared = inputs.prepared
    start = reference.model if isinstance(reference, FrozenReference) and hw.strategy != "fsdp" else None
    verified, details = plan.loop.verify_after(policy, inputs.tokenizer, prepared, hw, run_dir, start_model=start)
    if verified or prepared.metrics:
        result["metrics"].update({**prepared.metrics, **verified})
        run_log.log(trainer.step, {**prepared.metrics, **verified})
    return details


def summarize(plan: RunPlan, trainer: Trainer, inputs: Inputs, hw, result: dict, verified_after: dict) -> dict:
    prepared = inputs.prepared
    return {
        "status": "complete",
        "step": trainer.step,
        "loss": plan.loss.key,
        "hparams": plan.loss.hparams,
        "overrides": plan.info.overrides,
        "resumed_from_step": trainer.resumed_from,
        "data": {**inputs.data_info, "tokenize": inputs.tokenize_stats},
        "torch_threads": torch.get_num_threads(),
        "world_size": hw.world_size,
        "strategy": hw.strategy,
        "rank": hw.rank,
        **result,
        "mathloop": prepared.info,
        "verified": {"before": prepared.verified, "after": verified_after},
    }


def train(plan: RunPlan, run_dir: Path | str | None = None) -> dict:
    """One preference-optimization run; returns the summary that is also written to `summary.json`. The
    process group ends after the run's models are released (`Hardware.teardown`)."""
    hw = plan.hardware.setup()
    summary = _train(plan, hw, run_directory(plan, run_dir))
    hw.teardown()
    return summary


def _train(plan: RunPlan, hw, run_dir: Path) -> dict:
    inputs = prepare_inputs(plan, hw, run_dir)
    policy = load_policy(inputs, hw)
    reference = make_reference(plan, policy, inputs, hw)
    trainer, run_log = make_trainer(plan, policy, reference, inputs, hw, run_dir)
    result = fit_and_export(trainer, run_log, inputs, hw, run_dir, evaluates=plan.loop.switches.evaluate)
    details = verify(trainer, run_log, plan, policy, reference, inputs, hw, run_dir, result)
    summary = summarize(plan, trainer, inputs, hw, result, details)
    run_log.finish(summary)
    return summary


def build_reference_cache(plan: RunPlan, directory: Path, run_dir: Path | str | None = None) -> dict:
    """`python -m prefopt.reference`: the run's inputs and initial policy, reference log-probs cached; no training."""
    run_dir = run_directory(plan, run_dir, default="outputs/reference")
    hw = plan.hardware.setup()
    inputs = prepare_inputs(plan, hw, run_dir)
    policy = load_policy(inputs, hw)
    cached = cached_reference(plan, policy, inputs, hw, directory)
    hw.teardown()
    return {"status": "reference cache", "path": str(cached.path), "key": cached.key, "pairs": len(cached)}
