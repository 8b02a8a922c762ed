"""The Hydra entry point: `python -m prefopt.run [group=option ...] [key=value ...]`.

This is the composition root: it turns the config into plain objects (models, tokenizer, pairs, loss,
optimizer, hardware, loggers) and hands them to the engine. No `DictConfig` travels past this file.
"""

from __future__ import annotations

import copy
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

import prefopt  # noqa: F401 - registers the config resolvers
from prefopt.config import conf_dir
from prefopt.errors import ConfigError, PrefoptError
from prefopt.validate import problems, report

log = logging.getLogger("prefopt")


@dataclass
class RunPlan:
    """Everything built and validated from the config before any model or data is loaded."""

    cfg: DictConfig
    hardware: Any
    loss: Any
    train: Any
    model: Any
    data: Any
    wandb: Any


def instantiate(node, *args, **kwargs):
    """`hydra.utils.instantiate`, but our own errors come out as themselves, not wrapped by Hydra."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate as hydra_instantiate

    try:
        return hydra_instantiate(node, *args, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        while cause is not None and not isinstance(cause, PrefoptError):
            cause = cause.__cause__
        if cause is not None:
            raise cause from None
        raise


def plan(cfg: DictConfig) -> RunPlan:
    """Instantiate the cheap parts; every bad value raises a ConfigError naming its key."""
    if cfg.beta is not None and not cfg.beta > 0:
        raise ConfigError(f"beta must be > 0 (got {cfg.beta})")
    hardware = instantiate(cfg.hardware)
    loss = instantiate(cfg.loss)
    train = instantiate(cfg.train)
    train.validate(hardware.world_size)
    model = instantiate(cfg.model)
    data = instantiate(cfg.data.source)
    wandb = instantiate(cfg.logger.wandb) if cfg.logger.get("wandb") else None
    return RunPlan(cfg, hardware, loss, train, model, data, wandb)


def build_loop(cfg: DictConfig):
    """The verified-math loop's stages as plain objects (conf/verified_math.yaml; see prefopt.pipeline)."""
    from prefopt.pipeline import Loop

    tokenize = {k: cfg.data[k] for k in ("max_length", "max_prompt_length", "chat_template", "system_prompt")}
    if cfg.data.get("user_suffix"):  # only when set: the tiny loop's cache keys stay what they were
        tokenize["user_suffix"] = cfg.data.user_suffix
    return Loop(pipeline=instantiate(cfg.pipeline), warmup=instantiate(cfg.warmup), pairs=instantiate(cfg.pairs),
                evaluation=instantiate(cfg.evaluation), generation=instantiate(cfg.generation),
                verify=instantiate(cfg.verify), tokenize=tokenize, optimizer_factory=instantiate(cfg.optimizer.factory),
                max_grad_norm=cfg.optimizer.max_grad_norm, chunk_elements=cfg.train.chunk_elements, policy=cfg.policy)


# Settings a resumed run may change: how long it goes on, how often it evaluates/saves/logs, where it runs.
RESUMABLE_CHANGES = ("steps", "epochs", "train.epochs", "eval_every", "save_every", "resume", "train.steps", "train.eval_every",
                     "train.save_every", "train.progress", "train.keep_checkpoints", "logger.", "hardware.", "on_nonfinite",
                     "train.on_nonfinite", "validate")


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


def _hydra_info() -> dict[str, Any]:
    """Run directory, choices and sweep name from Hydra (empty when called outside a Hydra app)."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return {}
    hc = HydraConfig.get()
    multirun = hc.mode.name == "MULTIRUN"
    return {"run_dir": Path(hc.runtime.output_dir), "choices": dict(hc.runtime.choices),
            "group": Path(hc.sweep.dir).name if multirun else Path(hc.runtime.output_dir).name,
            "overrides": list(hc.overrides.task)}


def train(cfg: DictConfig, run_dir: Path | None = None, cache_only: bool = False) -> dict:
    """One preference-optimization run; returns the summary that is also written to `summary.json`.

    `cache_only`: stop once the reference log-prob cache is built (`python -m prefopt.reference`).
    """
    import torch
    from transformers import get_scheduler

    from prefopt.data.batching import tokenize_pairs
    from prefopt.engine import Trainer, resolve_steps, resolve_warmup
    from prefopt.hardware import seed_everything
    from prefopt.models import freeze, load_model, load_tokenizer, reference_context
    from prefopt.tracking import RunLog

    info = _hydra_info()
    run_dir = Path(run_dir or info.get("run_dir") or cfg.get("output_dir") or "outputs/run")
    found = problems(cfg)  # every problem at once, in seconds, before any data or model is loaded
    if found:
        raise ConfigError(found[0] if len(found) == 1 else report(found))
    p = plan(cfg)
    from prefopt import reference as refcache

    cache_dir = refcache.cache_dir(cfg.get("reference_cache") or ("auto" if cache_only else None), p.loss)
    hw = p.hardware.setup()
    seed_everything(cfg.seed)
    loop = build_loop(cfg)
    prepared = loop.prepare(p.model, p.data, hw, run_dir)  # warm-up → on-policy pairs → accuracy before (cached)
    p.model, p.data = prepared.model, prepared.data
    seed_everything(cfg.seed)

    tokenizer = load_tokenizer(p.model)
    train_rows, eval_rows, data_info = p.data.load()
    tok_args = dict(max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                    completion_eos=p.model.completion_eos, chat_template=cfg.data.chat_template,
                    system_prompt=cfg.data.system_prompt, user_suffix=cfg.data.get("user_suffix"))
    train_pairs, train_tok = tokenize_pairs(train_rows, tokenizer, **tok_args)
    eval_pairs, eval_tok = tokenize_pairs(eval_rows, tokenizer, **tok_args)
    p.train = resolve_steps(p.train, len(train_pairs))  # epochs=N: steps from the number of pairs

    policy = load_model(p.model, vocab_size=len(tokenizer)).to(hw.torch_device)
    vocab = policy.get_output_embeddings().weight.shape[0]
    if len(tokenizer) > vocab:
        raise ConfigError(f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab}")
    # The reference is a frozen copy of the initial policy; with LoRA it is the policy's own base (adapters off).
    cached = None if cache_dir is None else refcache.reference_cache(
        cache_dir, spec=p.model, policy=policy, tokenizer=tokenizer, data=p.data, tokenize=tok_args,
        train_pairs=train_pairs, eval_pairs=eval_pairs, train_cfg=p.train, hardware=hw)
    if cache_only:
        return {"status": "reference cache", "path": str(cached.path), "key": cached.key, "pairs": len(cached)}
    lora_reference = p.loss.reference and p.model.uses_lora and cached is None
    reference = freeze(copy.deepcopy(policy)) if p.loss.reference and not lora_reference and cached is None else None

    resolved = OmegaConf.to_container(cfg, resolve=True)
    if cfg.resume not in (None, "auto") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume}: not a directory of checkpoints")
    trainer = Trainer(
        policy=policy, reference=reference, loss=p.loss,
        optimizer_factory=instantiate(cfg.optimizer.factory),
        scheduler_factory=lambda opt: get_scheduler(cfg.optimizer.scheduler, opt,
                                                    num_warmup_steps=resolve_warmup(
                                                        cfg.optimizer.warmup_steps,
                                                        cfg.optimizer.get("warmup_ratio"), p.train.steps),
                                                    num_training_steps=p.train.steps),
        train_pairs=train_pairs, eval_pairs=eval_pairs, pad_id=tokenizer.pad_token_id, config=p.train, hardware=hw,
        run_log=None, run_dir=run_dir, seed=cfg.seed, max_grad_norm=cfg.optimizer.max_grad_norm,
        resume_from=None if cfg.resume in (None, "auto") else Path(cfg.resume),
        reference_context=reference_context(policy) if lora_reference else None, reference_logps=cached,
        config_record=resume_record(resolved),
    )
    if cfg.resume is None and trainer.resumed_from is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints and resume=null: use a new run directory")
    resumed = trainer.resumed_from
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if p.wandb is not None:
        choices = info.get("choices", {})
        p.wandb.group = p.wandb.group or info.get("group")
        p.wandb.name = p.wandb.name or run_dir.name
        p.wandb.tags = [f"{g}:{choices[g]}" for g in ("loss", "model", "data") if g in choices] + list(p.wandb.tags)
    trainer.run_log = RunLog(run_dir, resolved, p.wandb, enabled=hw.is_main, resume_step=resumed)
    if hw.is_main:
        (run_dir / "resolved_config.yaml").write_text(OmegaConf.to_yaml(resolved))
        log.info("run directory %s; %d train / %d eval pairs; loss %s %s; %s parameters", run_dir, len(train_pairs),
                 len(eval_pairs), p.loss.key, p.loss.hparams, f"{sum(q.numel() for q in trainer.params):,}")

    result = trainer.fit()
    trainer.export(run_dir / "final")
    if hw.is_main:
        tokenizer.save_pretrained(run_dir / "final")
        if p.model.uses_lora and p.model.lora["merge_on_export"] and hw.strategy != "fsdp":
            merged = policy.merge_and_unload()  # training is over: merging in place is safe now
            merged.save_pretrained(run_dir / "final_merged", safe_serialization=True)
            tokenizer.save_pretrained(run_dir / "final_merged")
    verified, verified_after = loop.verify_after(policy, tokenizer, prepared, hw, run_dir)
    if verified or prepared.metrics:
        result["metrics"].update({**prepared.metrics, **verified})
        trainer.run_log.log(trainer.step, {**prepared.metrics, **verified})
    summary = {"status": "complete", "step": trainer.step, "loss": p.loss.key, "hparams": p.loss.hparams,
               "overrides": info.get("overrides", []), "resumed_from_step": resumed,
               "data": {**data_info, "tokenize": {"train": vars(train_tok), "eval": vars(eval_tok)}},
               "torch_threads": torch.get_num_threads(), "world_size": hw.world_size, "strategy": hw.strategy,
               "rank": hw.rank, **result,
               "pipeline": prepared.info, "verified": {"before": prepared.verified, "after": verified_after}}
    trainer.run_log.finish(summary)
    hw.teardown()
    return summary


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        if cfg.get("validate"):  # report every problem (data rows included) and stop: no model is loaded
            found = problems(cfg, read_data=True)
            print(report(found))
            if found:
                sys.exit(2)
            return None
        summary = train(cfg)
    except PrefoptError as exc:
        log.error("%s", exc)
        print(f"prefopt: error: {exc}", file=sys.stderr)
        sys.exit(2)
    if summary.get("rank", 0) != 0:
        return None
    return summary["metrics"].get("eval/loss")  # the objective a Hydra sweeper minimises


def _quiet_other_ranks() -> None:
    """Under torchrun/SLURM only rank 0 writes: the other ranks keep Hydra's files and logs to themselves."""
    import os

    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))
    if rank > 0 and "-m" not in sys.argv and "--multirun" not in sys.argv:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]


if __name__ == "__main__":
    _quiet_other_ranks()
    main()
