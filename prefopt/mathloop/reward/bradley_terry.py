"""The reward stage: a tiny reward model trained on the synthetic arithmetic pairs by a Bradley–Terry loss.

The model is the warmed-up policy's backbone with a scalar head (`AutoModelForSequenceClassification`,
num_labels 1); it trains through the same engine `Trainer` as every other stage, with `PairRewardsModel` in
place of the log-prob model: a batch's 2B rows (prompt + chosen, prompt + rejected) give the rewards r_w, r_l,
and the loss is −log σ(r_w − r_l) (Bradley & Terry 1952; the reward-model objective of Ouyang et al. 2022, eq. 1).
Agreement with the answer checker is measured on held-out answers: for each held-out pair whose chosen answer
the checker verifies and whose rejected answer it does not, does the model score the chosen one higher?
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch.optim.swa_utils import get_ema_multi_avg_fn
from transformers import AutoModelForSequenceClassification

from prefopt.engine import Trainer, TrainerParts
from prefopt.errors import ConfigError
from prefopt.logprobs import packed_hidden, supports_packing
from prefopt.losses import Loss, LossOutput, PairLogps
from prefopt.mathloop.judging.win_rates import preference_from_scores
from prefopt.mathloop.stages.sampling import validate_pair_limit, validate_sampling
from prefopt.mathloop.stages.warmup import StageSchedule
from prefopt.tracking import RunLog

log = logging.getLogger("prefopt")


def bradley_terry(policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
    """−log σ(r_w − r_l) per pair, the rewards carried in PairLogps' chosen/rejected (token counts 1)."""
    margin = policy.chosen - policy.rejected
    return LossOutput(
        loss=-torch.nn.functional.logsigmoid(margin),
        chosen_reward=policy.chosen.detach(),
        rejected_reward=policy.rejected.detach(),
    )


class BradleyTerry(Loss):
    """The reward stage's objective as a reference-free Loss."""

    def __init__(self):
        super().__init__("bradley_terry", bradley_terry, reference=False)


class PairRewardsModel(torch.nn.Module):
    """A sequence classifier whose forward returns a batch's rewards as PairLogps (counts 1).

    The reward of a sequence is the classifier's output at its last token (what the model's own forward picks
    with right padding). Padded rows: rows [0, B) are the chosen answers, [B, 2B) the rejected ones. Packed rows
    (`SharedPrefixRows`, for a classifier with a `score` head such as transformers' decoder classifiers): one
    backbone pass over the shared-prefix rows, then the head at each sequence's last token; the same rewards, with
    the prompt and the answers' common start computed once.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_elements=None,
        autocast=None,
        compile: bool = False,
        fields=(),
        diagnostics: bool = False,
    ):
        super().__init__()
        self.model = model
        self.autocast = autocast  # hardware.mixed_precision=bf16: the forward under torch.autocast

    def forward(self, batch) -> PairLogps:
        if self.autocast is None:
            return self._rewards(batch)
        with torch.autocast(batch.input_ids.device.type, dtype=self.autocast):
            return self._rewards(batch)

    def _rewards(self, batch) -> PairLogps:
        if batch.packed is not None:
            if not packs(self.model):
                raise ConfigError(
                    f"the reward stage packs rows only for a classifier with a `score` head, not "
                    f"{type(self.model).__name__}: train it with packing=false"
                )
            model: Any = self.model  # a transformers sequence classifier
            hidden = packed_hidden(model, model.base_model, batch, lambda: model.score.weight.dtype)
            last = hidden.reshape(-1, hidden.shape[-1])[batch.packed.last_index]
            rewards = model.score(last)[:, 0].float()
        else:
            rewards = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, 0].float()
        b, ones = batch.num_pairs, torch.ones(batch.num_pairs, device=rewards.device)
        return PairLogps(chosen=rewards[:b], rejected=rewards[b:], chosen_tokens=ones, rejected_tokens=ones)


def packs(model: torch.nn.Module) -> bool:
    """Whether `PairRewardsModel` can run `model` on shared-prefix rows: a linear `score` head on its base model's
    last hidden state (transformers' decoder sequence classifiers), attention that takes a 4D mask."""
    return isinstance(getattr(model, "score", None), torch.nn.Linear) and supports_packing(model)


SOURCES = ("contrasts", "data", "samples", "both")


@dataclass
class RewardConfig(StageSchedule):
    """`reward:` in conf/mathloop.yaml: the reward stage's schedule and what it trains on.

    `source`: `contrasts` (the data's contrastive pairs on its training problems: `contrasts_per_problem` plausible
    mistakes each, with clean and with noisy workings; `ArithmeticData.contrast_pairs`), `data` (the data's
    chosen/rejected pairs), `samples` (the warmed-up policy's `k` samples per training
    problem at `temperature`, labelled by the answer checker: every distinct (correct, wrong) pair, at most
    `pairs_per_prompt` per problem), or `both`. The agreement with the checker is measured on samples drawn as the
    pair labeller draws its own (`pairs.k` at `pairs.temperature`; `reward_stage.measure_sampling`).

    `ema`: the exported model is the exponential moving average of the weights over the steps, at this decay per
    step (`keep_average`); null exports the last step's weights."""

    steps: int = 1600
    lr: float = 1.0e-3
    source: str = "contrasts"
    contrasts_per_problem: int = 6
    scheduler: str = "constant_with_warmup"
    k: int = 8
    temperature: float = 1.0
    pairs_per_prompt: Any = "all"
    ema: float | None = 0.995
    key = "reward"

    def __post_init__(self):
        super().__post_init__()
        if self.source not in SOURCES:
            raise ConfigError(f"reward.source must be one of {', '.join(SOURCES)} (got {self.source!r})")
        if (
            isinstance(self.contrasts_per_problem, bool)
            or not isinstance(self.contrasts_per_problem, int)
            or self.contrasts_per_problem < 1
        ):
            raise ConfigError(
                f"reward.contrasts_per_problem must be an integer >= 1 (got {self.contrasts_per_problem!r})"
            )
        validate_sampling(self.k, self.temperature, key="reward")
        validate_pair_limit(self.pairs_per_prompt, "reward.pairs_per_prompt")
        if self.ema is not None and (
            isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not 0 < self.ema < 1
        ):
            raise ConfigError(
                f"reward.ema must be a decay between 0 and 1, or null for the last step's weights (got {self.ema!r})"
            )

    def optimizer(self, factory: Callable) -> Callable:
        """The run's optimizer at this stage's learning rate; with `ema`, it also keeps the weights' average."""
        make = super().optimizer(factory)
        if self.ema is None:
            return make
        return lambda params: keep_average(make(params), cast(float, self.ema))


def keep_average(optimizer: torch.optim.Optimizer, decay: float) -> torch.optim.Optimizer:
    """Keep an exponential moving average of `optimizer`'s parameters, updated after each of its steps by
    torch's EMA rule (`torch.optim.swa_utils.get_ema_multi_avg_fn`: avg ← decay·avg + (1 − decay)·w, starting from
    the weights before the first step that updates them).

    The average lives in the optimizer's per-parameter state (key `ema`), so the engine's checkpoints save and
    restore it with the moments: a resumed stage goes on averaging where it stopped. A parameter's entry is made only
    after a step in which it had a gradient, so the optimizer has set up its own state for it first (AdamW takes a
    non-empty state for an initialised one). A step the engine skips (a non-finite loss) does not reach the optimizer
    and so is not averaged in. The weights must be float32: a bfloat16 average would not move (a step's
    (1 − decay)·(w − avg) rounds away)."""
    update = get_ema_multi_avg_fn(decay)
    start: dict = {}  # the weights before the first step that updates them
    low = sorted({str(p.dtype) for p in _params(optimizer) if p.is_floating_point() and p.dtype != torch.float32})
    if low:
        raise ConfigError(
            f"reward.ema averages float32 weights; these are {', '.join(low)} (load the reward model in "
            f"float32 and compute in bf16 with hardware.mixed_precision=bf16, or set reward.ema=null)"
        )

    def before(opt, args, kwargs):
        for p in _params(opt):
            if "ema" not in opt.state.get(p, {}):
                start[p] = p.detach().clone()

    def after(opt, args, kwargs):
        for p in _params(opt):
            if "ema" not in opt.state.get(p, {}) and p.grad is not None:
                opt.state[p]["ema"] = start.pop(p)
        kept = _averaged(opt)
        if kept:
            update([opt.state[p]["ema"] for p in kept], [p.detach() for p in kept], None)

    optimizer.register_step_pre_hook(before)
    optimizer.register_step_post_hook(after)
    return optimizer


@torch.no_grad()
def use_average(optimizer: torch.optim.Optimizer) -> bool:
    """Copy the average `keep_average` kept into the parameters; False (nothing changed) when it kept none."""
    kept = _averaged(optimizer)
    for p in kept:
        p.copy_(optimizer.state[p]["ema"])
    return bool(kept)


def _params(optimizer: torch.optim.Optimizer) -> list:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _averaged(optimizer: torch.optim.Optimizer) -> list:
    """The parameters `keep_average` keeps an average of (those updated at least once)."""
    return [p for p in _params(optimizer) if "ema" in optimizer.state.get(p, {})]


def reward_model_from(policy_dir: Path, pad_id: int, seed: int) -> torch.nn.Module:
    """A scalar-head sequence classifier on the saved policy's backbone, in float32 (the weights the optimizer and
    `reward.ema` update; bf16 compute comes from hardware.mixed_precision). The head starts at random, drawn from
    `seed` by the CPU generator it is made with, not from the process's random state (which depends on what ran
    before: a warm-up trained now or read from the cache); that state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        model = AutoModelForSequenceClassification.from_pretrained(policy_dir, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = pad_id
    return model


def train_reward_model(
    model: torch.nn.Module,
    train_pairs: Sequence,
    eval_pairs: Sequence,
    pad_id: int,
    config: RewardConfig,
    optimizer_factory: Callable,
    hardware,
    run_dir: Path,
    max_grad_norm: float | None = 1.0,
) -> dict:
    """Train `model` in place by the Bradley–Terry loss through the engine's Trainer; returns its result."""
    # shared-prefix rows: a clean contrast pair shares all but its box, so a step computes about a quarter fewer
    # tokens (the reward stage takes most of experiment=rm_arith's time)
    train = config.train_config(packing="shared_prefix" if packs(model) else False)
    parts = TrainerParts(
        policy=model,
        loss=BradleyTerry(),
        optimizer_factory=config.optimizer(optimizer_factory),
        scheduler_factory=config.scheduler_factory(),
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        pad_id=pad_id,
        seed=config.seed,
        max_grad_norm=max_grad_norm,
        pair_model=PairRewardsModel,
    )
    trainer = Trainer(parts, train, hardware, run_dir).setup()
    run_log = RunLog(
        run_dir, {"reward": vars(config)}, None, enabled=hardware.is_main, resume_step=trainer.resumed_from
    )
    log.info("reward model (Bradley-Terry): %d steps of %d pairs, lr %g", config.steps, config.batch_size, config.lr)
    result = trainer.fit(run_log)
    if config.ema is not None and use_average(trainer.optimizer):  # the exported model is the average
        log.info("reward model: the exported weights are the moving average of the weights (decay %g)", config.ema)
    result["trainer"] = trainer
    return result


def checker_agreement(
    scores_chosen: Sequence[float],
    scores_rejected: Sequence[float],
    chosen_ok: Sequence[bool],
    rejected_ok: Sequence[bool],
) -> dict:
    """How often the reward model orders a pair as the checker does, over pairs the checker tells apart.

    A pair counts when exactly one answer is verified correct; it agrees when the correct one scores higher
    (equal scores count ½)."""
    agree, counted = 0.0, 0
    for sc, sr, ok_c, ok_r in zip(scores_chosen, scores_rejected, chosen_ok, rejected_ok):
        if ok_c == ok_r:
            continue
        counted += 1
        better, worse = (sc, sr) if ok_c else (sr, sc)
        agree += preference_from_scores(better, worse)
    return {"agreement": agree / counted if counted else float("nan"), "pairs": counted}
