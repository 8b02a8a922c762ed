"""Pair labellers: how k samples of a prompt become (chosen, rejected) pairs (`pairs.labeler`, conf/pairs/labeler/).

A labeller is an object chosen by config (`pairs/labeler=verifier`, the math default, or `pairs/labeler=reward_model`),
like a loss; the pairs stage calls `labeler.label(rows, samples, context)` and never asks which one it has.

- `VerifierLabeler`: chosen = a sample whose final answer the answer checker verifies, rejected = one it
  does not (`prefopt.mathloop.stages.sampling.build_pairs`).
- `RewardModelLabeler`: a Hugging Face sequence-classification reward model scores each (prompt, sample);
  chosen = the highest-scoring sample, rejected = the lowest (`build_scored_pairs`), as SimPO's and α-DPO's
  on-policy UltraFeedback data are built (Meng et al. 2024, §3; Wu et al. 2024).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from itertools import product
from typing import Any

import torch

from prefopt.errors import ConfigError, DataError
from prefopt.mathloop.judging.win_rates import preference_from_scores
from prefopt.mathloop.reward.scorer import RewardScorer, named_scorer
from prefopt.mathloop.stages.sampling import build_pairs

log = logging.getLogger("prefopt")


@dataclass
class LabelContext:
    """What the pairs stage hands a labeller besides the samples."""

    checker: Callable[[], Any]  # the answer checker, built on first use (the reward-model labeller needs none)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the policy's device
    seed: int = 0
    max_pairs_per_prompt: Any = 1


@dataclass
class ScoredStats:
    """What reward-model labelling saw and kept: pairs + dropped_tie + dropped_gap == prompts."""

    prompts: int = 0
    samples: int = 0
    dropped_tie: int = 0  # best and worst score equal (or the k samples are one text)
    dropped_gap: int = 0  # best − worst < pairs.min_gap
    pairs: int = 0

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"{self.pairs} pairs from {self.prompts} prompts ({self.samples} samples; dropped {self.dropped_tie} "
            f"ties, {self.dropped_gap} under min_gap)"
        )


def build_scored_pairs(
    prompts: Sequence[Any], samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], min_gap: float = 0.0
) -> tuple[list[dict], ScoredStats]:
    """One pair per prompt: chosen = its highest-scoring sample, rejected = its lowest (first index on equal scores).

    A prompt whose best and worst samples score the same, or are the same text, is a tie and dropped; one whose
    score gap best − worst is below `min_gap` is dropped too. Both are counted. The pair keeps both scores.
    """
    if len(samples) != len(prompts) or len(scores) != len(prompts):
        raise DataError(
            f"build_scored_pairs got {len(prompts)} prompts, {len(samples)} sample lists and {len(scores)} score lists"
        )
    stats, pairs = ScoredStats(prompts=len(prompts)), []
    for i, (prompt, texts, values) in enumerate(zip(prompts, samples, scores)):
        if len(texts) != len(values) or len(texts) < 2:
            raise DataError(f"prompt {i}: {len(texts)} samples and {len(values)} scores (need >= 2 of each, as many)")
        if any(not math.isfinite(float(v)) for v in values):
            raise DataError(f"prompt {i}: a non-finite reward score {list(values)}")
        stats.samples += len(texts)
        best = max(range(len(values)), key=lambda j: (values[j], -j))
        worst = min(range(len(values)), key=lambda j: (values[j], j))
        gap = float(values[best]) - float(values[worst])
        if gap == 0 or texts[best] == texts[worst]:
            stats.dropped_tie += 1
            continue
        if gap < min_gap:
            stats.dropped_gap += 1
            continue
        pairs.append(
            {
                "prompt": prompt,
                "chosen": texts[best],
                "rejected": texts[worst],
                "pair_id": f"{i}-{best}-{worst}",
                "prompt_index": i,
                "chosen_index": best,
                "rejected_index": worst,
                "chosen_score": float(values[best]),
                "rejected_score": float(values[worst]),
            }
        )
    stats.pairs = len(pairs)
    return pairs, stats


def sample_agreement(
    rows: Sequence[dict], samples: Sequence[Sequence[str]], scores: Sequence[Sequence[float]], checker
) -> dict:
    """Over every (verified correct, not correct) pair of samples of a prompt: the fraction the scores order the
    same way (equal scores count ½), and how many such pairs there were."""
    flat = [t for texts in samples for t in texts]
    verdicts = iter(checker.check_many(flat, [str(r["answer"]) for r, texts in zip(rows, samples) for _ in texts]))
    agree, counted = 0.0, 0
    for texts, values in zip(samples, scores):
        ok = [next(verdicts).correct for _ in texts]
        for i, j in product(range(len(texts)), repeat=2):
            if ok[i] and not ok[j]:
                counted += 1
                agree += preference_from_scores(values[i], values[j])
    return {"agreement": agree / counted if counted else float("nan"), "pairs": counted}


@dataclass
class VerifierLabeler:
    """`pairs/labeler=verifier`: chosen verified correct, rejected not (the verified-math default)."""

    def fingerprint(self) -> dict:
        return {"labeler": "verifier"}

    def with_reward_model(self, path: str) -> VerifierLabeler:
        return self  # reads no reward model

    def label(self, rows: Sequence[dict], samples: Sequence[Sequence[str]], context: LabelContext):
        """(pairs, stats, extra) of prompts `rows` (problem, answer) and their samples, checked against the answers."""
        k = len(samples[0]) if samples else 0
        flat = [t for texts in samples for t in texts]
        golds = [str(r["answer"]) for r in rows for _ in range(k)]
        verdicts = context.checker().check_many(flat, golds)
        per_prompt = [verdicts[i * k : (i + 1) * k] for i in range(len(rows))]
        pairs, stats = build_pairs(
            [r["problem"] for r in rows],
            samples,
            per_prompt,
            seed=context.seed,
            max_pairs_per_prompt=context.max_pairs_per_prompt,
        )
        summary = (
            f"{stats.pairs} pairs from {stats.prompts} prompts (sample accuracy "
            f"{stats.correct / max(stats.samples, 1):.2f}; dropped {stats.dropped_all_correct} all-correct, "
            f"{stats.dropped_all_wrong} all-wrong; no_answer {stats.no_answer}, timeout {stats.timeout})"
        )
        return pairs, stats, {"sample_accuracy": stats.correct / max(stats.samples, 1), "summary": summary}


@dataclass
class RewardModelLabeler:
    """`pairs/labeler=reward_model`: a sequence-classification reward model picks the best and worst of k samples."""

    name_or_path: str | None = None
    min_gap: float = 0.0  # pairs whose score gap (best − worst) is below this are dropped and counted
    batch_size: int = 16  # (prompt, answer) sequences per forward pass
    max_length: int = 4096  # tokens per scored conversation (longer ones are cut from the right)
    trust_remote_code: bool = False  # ArmoRM and other custom heads need true

    def __post_init__(self):
        if not isinstance(self.min_gap, (int, float)) or self.min_gap < 0:
            raise ConfigError(f"pairs.labeler.min_gap must be a number >= 0, got {self.min_gap!r}")
        if self.batch_size < 1:
            raise ConfigError(f"pairs.labeler.batch_size must be >= 1, got {self.batch_size}")

    def fingerprint(self) -> dict:
        return {"labeler": "reward_model", **asdict(self)}

    def with_reward_model(self, path: str) -> RewardModelLabeler:
        """This labeller scoring with the reward stage's model at `path` when it names none itself."""
        return self if self.name_or_path else replace(self, name_or_path=path)

    def scorer(self, device) -> RewardScorer:
        return named_scorer(
            self.name_or_path, "pairs.labeler", device, self.batch_size, self.max_length, self.trust_remote_code
        )

    def label(self, rows: Sequence[dict], samples: Sequence[Sequence[str]], context: LabelContext):
        """(pairs, stats, extra): each sample scored by the reward model, best vs worst per prompt."""
        problems = [r["problem"] for r in rows]
        scorer = self.scorer(context.device)
        flat = scorer.score(
            [p for p, texts in zip(problems, samples) for _ in texts], [t for texts in samples for t in texts]
        )
        it = iter(flat)
        scores = [[next(it) for _ in texts] for texts in samples]
        pairs, stats = build_scored_pairs(problems, samples, scores, self.min_gap)
        del scorer
        extra: dict[str, Any] = {
            "reward_model": self.name_or_path,
            "min_gap": self.min_gap,
            "mean_score": sum(flat) / max(len(flat), 1),
            "summary": stats.summary(),
        }
        if rows and all("answer" in r for r in rows):  # gold answers: how often the scores order samples as the checker
            extra["checker_agreement"] = sample_agreement(rows, samples, scores, context.checker())
            extra["summary"] += (
                f"; agreement with the answer checker {extra['checker_agreement']['agreement']:.3f} "
                f"over {extra['checker_agreement']['pairs']} (correct, wrong) sample pairs"
            )
        return pairs, stats, extra
