"""The cached reward stage of the loop (`mathloop.reward=true`): train the tiny reward model, measure its agreement.

Runs after the warm-up, on the warmed-up policy's backbone. It trains on contrastive pairs of the training problems
(`reward.source=contrasts`, the default: several plausible wrong boxes per problem, with clean and with noisy
workings; `ArithmeticData.contrast_pairs`), on the run's `data` pairs (synthetic arithmetic: chosen a correct
worked answer, rejected a wrong one), on the policy's own samples of the training
problems labelled by the answer checker (`reward.source=samples`: an outcome reward model, as the verifiers of
Cobbe et al. 2021 are trained), or on both. Agreement with the checker is measured on held-out problems: the data's
held-out pairs, and every (correct, wrong) pair of the policy's samples of them. Cached under
`<mathloop.cache_dir>/reward/<key>` like
the warm-up. Its directory (`model/`, `from_pretrained`-loadable with its tokenizer) is then the reward model of
every labeller and judge whose `name_or_path` is null (`with_reward_model`).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import Any

from prefopt.data.batching import tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.errors import ConfigError
from prefopt.io import atomic_write_text
from prefopt.mathloop.fingerprints import data_fingerprint, optimizer_fingerprint, spec_fingerprint
from prefopt.mathloop.judging.win_rates import preference_from_scores
from prefopt.mathloop.labelers import LabelContext, VerifierLabeler
from prefopt.mathloop.reward.bradley_terry import checker_agreement, reward_model_from, train_reward_model
from prefopt.mathloop.reward.scorer import RewardScorer
from prefopt.mathloop.stages.stage import Stage, stage_key
from prefopt.stats import clustered_share, proportion

log = logging.getLogger("prefopt")


def measure_sampling(loop) -> dict:
    """How the answers the agreement is measured on are drawn: as the pair labeller draws the answers it ranks
    (`pairs.k` per problem at `pairs.temperature`)."""
    return {"k": loop.pairs.k, "temperature": loop.pairs.temperature}


def reward_key(loop, spec, data) -> str:
    return stage_key(
        "reward",
        {
            "policy": spec_fingerprint(spec),
            "data": data_fingerprint(data),
            "tokenize": loop.tokenize,
            "reward": {**vars(loop.reward), "progress": None},
            "optimizer": optimizer_fingerprint(loop.optimizer_factory),
            "max_grad_norm": loop.max_grad_norm,
            "measure": measure_sampling(loop),
        },
    )


def checker_pairs(
    loop, policy, rows: list[dict], seed: int, limit, k: int | None = None, temperature: float | None = None
) -> tuple[list[dict], dict]:
    """`policy`'s (model, tokenizer, spec) `k` samples (default `reward.k`) of each problem row at `temperature`
    (default `reward.temperature`), labelled by the answer checker (the `verifier` pair labeller): (correct, wrong)
    pairs (at most `limit` per problem, or "all") and the counts."""
    model, tokenizer, spec = policy
    prompts = [loop.render(tokenizer, r["problem"]) for r in rows]
    k = loop.reward.k if k is None else k
    temperature = loop.reward.temperature if temperature is None else temperature
    done = loop.generator(model, tokenizer, spec).generate(prompts, n=k, temperature=temperature, seed=seed)
    pairs, stats, _ = VerifierLabeler().label(
        rows, done.texts, LabelContext(checker=loop.checker, seed=seed, max_pairs_per_prompt=limit)
    )
    return pairs, stats.as_dict()


def unseen(pairs: list[dict], trained) -> list[dict]:
    """The pairs neither of whose answers the reward model was trained on for that prompt (held-out answers)."""
    seen: dict[str, set] = {}
    for row in trained:
        seen.setdefault(row.prompt, set()).update((row.chosen, row.rejected))
    return [p for p in pairs if not {p["chosen"], p["rejected"]} & seen.get(p["prompt"], set())]


def generated_rows(data, split: str) -> list[dict]:
    """The {problem, answer} rows of `split` of the run's generated problems; one line for data without them."""
    if not hasattr(data, "problem_rows"):
        raise ConfigError(
            f"mathloop.reward=true needs problems with gold answers (to sample from and to measure the "
            f"reward model against the answer checker): the generated arithmetic data (data=arith), not "
            f"{type(data).__name__}"
        )
    return data.problem_rows(split)


def scorer_for(loop, model_dir: Path, hardware) -> RewardScorer:
    return RewardScorer.load(
        str(model_dir), hardware.torch_device, batch_size=64, max_length=loop.tokenize["max_length"]
    )


def measure_agreement(loop, scorer: RewardScorer, eval_rows, golds: dict) -> dict:
    """The trained model's agreement with the answer checker on the held-out pairs' answers (exact interval)."""
    prompts = [r.prompt for r in eval_rows]
    chosen = scorer.score(prompts, [r.chosen for r in eval_rows])
    rejected = scorer.score(prompts, [r.rejected for r in eval_rows])
    checker, answers = loop.checker(), [golds[r.prompt] for r in eval_rows]
    ok_c = [v.correct for v in checker.check_many([r.chosen for r in eval_rows], answers)]
    ok_r = [v.correct for v in checker.check_many([r.rejected for r in eval_rows], answers)]
    result = checker_agreement(chosen, rejected, ok_c, ok_r)
    interval = proportion(round(result["agreement"] * result["pairs"]), result["pairs"]) if result["pairs"] else None
    return {**result, **({"low": interval.low, "high": interval.high} if interval else {})}


def pair_agreement(scorer: RewardScorer, pairs: list[dict]) -> dict:
    """Agreement on (correct, wrong) sample pairs, with a bootstrap interval that resamples problems."""
    if not pairs:
        return {"agreement": float("nan"), "pairs": 0, "problems": 0}
    prompts = [p["prompt"] for p in pairs]
    chosen = scorer.score(prompts, [p["chosen"] for p in pairs])
    rejected = scorer.score(prompts, [p["rejected"] for p in pairs])
    hits: dict[int, list[float]] = {}
    for p, sc, sr in zip(pairs, chosen, rejected):
        hits.setdefault(p["prompt_index"], []).append(preference_from_scores(sc, sr))
    interval = clustered_share([sum(h) for h in hits.values()], [len(h) for h in hits.values()])
    assert interval is not None  # at least one pair was counted
    return {
        "agreement": interval.estimate,
        "low": interval.low,
        "high": interval.high,
        "pairs": len(pairs),
        "problems": len(hits),
        "method": interval.method,
    }


def training_rows(loop, policy, data) -> tuple[list, list, dict]:
    """(train pairs, eval pairs, counts) the reward model learns from, as `reward.source` says."""
    train_rows, eval_rows, _ = data.load()
    if loop.reward.source == "contrasts":
        if not hasattr(data, "contrast_pairs"):
            raise ConfigError(
                f"reward.source=contrasts needs data that makes contrastive pairs (data=arith), not "
                f"{type(data).__name__}: use reward.source=data, samples or both"
            )
        rows = data.contrast_pairs(loop.reward.contrasts_per_problem, loop.reward.seed)
        return rows, eval_rows, {"data_pairs": 0, "contrast_pairs": len(rows)}
    counts: dict[str, Any] = {"data_pairs": len(train_rows) if loop.reward.source != "samples" else 0}
    if loop.reward.source == "data":
        return train_rows, eval_rows, counts
    pairs, stats = checker_pairs(
        loop, policy, generated_rows(data, "train"), loop.reward.seed, loop.reward.pairs_per_prompt
    )
    sampled = [
        PreferencePair(
            prompt=p["prompt"], chosen=p["chosen"], rejected=p["rejected"], pair_id=f"reward-sample-{p['pair_id']}"
        )
        for p in pairs
    ]
    counts.update(sample_pairs=len(sampled), samples=stats)
    return (sampled if loop.reward.source == "samples" else list(train_rows) + sampled), eval_rows, counts


def run_reward(loop, spec, data, hardware, out: Path) -> dict:
    """Train the reward model into out/model and measure it; returns the record written to out/reward.json."""
    generated_rows(data, "eval")  # refuse data without gold answers before anything is trained
    policy = (*loop.load(spec, hardware), spec)  # samples to learn from and to measure on
    tokenizer = policy[1]
    train_rows, eval_rows, counts = training_rows(loop, policy, data)
    # completions end as the reward model's chat template renders an assistant turn, so that training and
    # scoring (prefopt.mathloop.reward.scorer.RewardScorer) read the same last token
    ending = tokenizer.apply_chat_template(
        [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], tokenize=False
    ).rsplit("y", 1)[1]
    args = dict(loop.tokenize, completion_eos=ending)
    train_pairs, _ = tokenize_pairs(train_rows, tokenizer, **args)
    eval_pairs, _ = tokenize_pairs(eval_rows, tokenizer, **args)
    model = reward_model_from(Path(spec.name_or_path), tokenizer.pad_token_id, seed=loop.reward.seed).to(
        hardware.torch_device
    )
    t0 = time.perf_counter()
    result = train_reward_model(
        model,
        train_pairs,
        eval_pairs,
        tokenizer.pad_token_id,
        loop.reward,
        loop.optimizer_factory,
        hardware,
        out,
        max_grad_norm=loop.max_grad_norm,
    )
    result.pop("trainer").export(out / "model")
    tokenizer.save_pretrained(out / "model")
    measured = measure(loop, policy, data, out / "model", train_rows, eval_rows, hardware)
    log.info(
        "reward model (%d steps on %d pairs, %.0f s): agreement with the answer checker %s",
        loop.reward.steps,
        len(train_rows),
        time.perf_counter() - t0,
        "; ".join(
            f"{name} {m['agreement']:.3f} [{m.get('low', float('nan')):.3f}, {m.get('high', float('nan')):.3f}]"
            f" over {m['pairs']} pairs"
            for name, m in measured.items()
        ),
    )
    # `metrics` are the trainer's own, of the last step's weights; the agreements are of the exported model
    exported = "last step" if loop.reward.ema is None else f"moving average, decay {loop.reward.ema}"
    return {
        "seconds": time.perf_counter() - t0,
        "metrics": result["metrics"],
        "exported_weights": exported,
        **measured,
        "training": counts,
        "reward": vars(loop.reward),
        "measured_on": measure_sampling(loop),
    }


def measure(loop, policy, data, model_dir: Path, train_rows, eval_rows, hardware) -> dict:
    """Agreement with the checker on held-out answers: `agreement` on the data's held-out pairs,
    `on_policy_agreement` on the policy's samples of the held-out problems, and `fresh_answer_agreement` on new
    samples of the training problems whose answers the model never saw (the answers the labeller ranks). The
    samples are drawn as the pair labeller draws its own (`measure_sampling`)."""
    held_rows = generated_rows(data, "eval")
    golds = {row["problem"]: str(row["answer"]) for row in held_rows}
    drawn = measure_sampling(loop)
    held, _ = checker_pairs(loop, policy, held_rows, loop.reward.seed + 1, "all", **drawn)
    fresh, _ = checker_pairs(loop, policy, generated_rows(data, "train"), loop.reward.seed + 2, "all", **drawn)
    scorer = scorer_for(loop, model_dir, hardware)
    return {
        "agreement": measure_agreement(loop, scorer, eval_rows, golds),
        "on_policy_agreement": pair_agreement(scorer, held),
        "fresh_answer_agreement": pair_agreement(scorer, unseen(fresh, train_rows)),
    }


class RewardStage(Stage):
    """The reward model: `<key>/model` and `reward.json`."""

    name, label, record, every_rank = "reward", "reward model", "reward.json", True

    def key(self, spec, data) -> str:
        return reward_key(self.loop, spec, data)

    def run(self, key: str, spec, data, hardware, out: Path) -> dict:
        record = run_reward(self.loop, spec, data, hardware, out)
        if hardware.is_main:
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
            atomic_write_text(out / self.record, json.dumps({"key": key, **record}, indent=2, default=str))
        return record


def cached_reward(loop, spec, data, hardware, run_dir: Path) -> tuple[Path, dict]:
    """(the reward model's directory, info): from the cache, or trained now (run_dir/reward without a cache)."""
    stage = RewardStage(loop)
    key = stage.key(spec, data)
    got = stage.cached(key, lambda out: stage.run(key, spec, data, hardware, out), hardware, run_dir / "reward")
    record = json.loads(stage.done(got.path).read_text())
    return got.path / "model", {
        "key": key,
        "path": str(got.path),
        **{name: value for name, value in record.items() if name.endswith("agreement")},
    }
