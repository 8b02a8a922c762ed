"""KL(π‖π_ref) of the trained policy, estimated on its own answers at the verified evaluation.

Per prompt, the answer's sequence log-probability under the policy minus under the reference (the starting
policy: the policy the preference run began from; for LoRA, the policy with its adapters switched off), on the
token ids the policy generated (its stop token included). `eval/kl/greedy` is the mean over prompts on the greedy
answers, with a 95% Student-t interval over prompts (`eval/kl/greedy_low`, `_high`); with `evaluation.samples=k`,
`eval/kl/sampled` is the same on the k sampled answers (the mean of k per prompt first).

What they estimate: on the sampled answers at temperature 1 (top_p 1), log π(y|x) − log π_ref(y|x) with y ~ π is
the standard Monte-Carlo estimate of KL(π‖π_ref) per prompt, unbiased. At another temperature T the answers come
from the tempered policy π_T, and the mean is E_{y~π_T}[log π(y|x) − log π_ref(y|x)]: a divergence on the answers
the policy actually gives, not KL(π‖π_ref). On the greedy answer it is a plug-in value at the policy's mode, not
an unbiased estimate of the KL (it can even be negative); it is what the verified accuracy was measured on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
import torch

from prefopt.data.batching import PreferenceBatch, padded_rows
from prefopt.logprobs import DEFAULT_CHUNK_ELEMENTS, sequence_logps
from prefopt.stats import scalar_mean

BATCH_SEQUENCES = 32  # answers per forward


def answer_logps(
    model: torch.nn.Module,
    rows: Sequence[tuple[Sequence[int], Sequence[int]]],
    pad_id: int,
    chunk_elements: int | None = None,
    batch_size: int = BATCH_SEQUENCES,
) -> np.ndarray:
    """log π(answer | prompt) for each (prompt ids, answer ids) row: the sum over the answer's tokens."""
    device = next(model.parameters()).device
    out: list[float] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start : start + batch_size]
                tensors = padded_rows(chunk, pad_id)
                batch = PreferenceBatch(*tensors, [str(i) for i in range(len(chunk))]).to(device)
                sums, _ = sequence_logps(model, batch, chunk_elements or DEFAULT_CHUNK_ELEMENTS)
                out += sums.float().cpu().tolist()
    finally:
        model.train(was_training)
    return np.array(out, dtype=np.float64)


@dataclass
class KLEstimator:
    """Scores a benchmark's answers under the policy and the reference; `metrics()` pools every benchmark.

    `reference()` is a context manager in which `reference_model` computes the reference (for LoRA: the policy
    itself, adapters off)."""

    policy: torch.nn.Module
    reference_model: torch.nn.Module
    tokenizer: Any
    reference: Callable[[], Any] = contextlib.nullcontext
    chunk_elements: int | None = None
    prefix: str = "eval/kl"
    per_prompt: dict[str, list[float]] = field(default_factory=lambda: {"greedy": [], "sampled": []})

    def per_answer(self, prompts: Sequence[str], completions) -> np.ndarray:
        """(prompts, samples) log π − log π_ref of each generated answer: its generated token ids, or for a
        generator that gives texts only, the texts tokenized again."""
        answers = completions.token_ids
        if answers is None:
            answers = [
                [self.tokenizer(t, add_special_tokens=False).input_ids for t in texts] for texts in completions.texts
            ]
        prompt_ids = [self.tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
        rows = [(prompt_ids[i], list(answer)) for i, group in enumerate(answers) for answer in group]
        k = len(answers[0]) if answers else 0
        pad = self.tokenizer.pad_token_id
        policy = answer_logps(self.policy, rows, pad, self.chunk_elements)
        with self.reference():
            reference = answer_logps(self.reference_model, rows, pad, self.chunk_elements)
        return (policy - reference).reshape(len(prompts), k)

    def score(self, kind: str, prompts: Sequence[str], completions) -> list[float]:
        """Per prompt KL estimate of `kind` (greedy | sampled: the mean over the prompt's samples), kept for
        `metrics()`; returned for the per-sample rows."""
        values = self.per_answer(prompts, completions).mean(axis=1).tolist()
        self.per_prompt[kind] += values
        return values

    def metrics(self) -> dict[str, float]:
        """`<prefix>/<kind>` (mean over prompts) with `<prefix>/<kind>_low`, `_high` (95% Student t over prompts)."""
        out: dict[str, float] = {}
        for kind, values in self.per_prompt.items():
            interval = scalar_mean(values)
            if interval is None:
                continue
            out[f"{self.prefix}/{kind}"] = interval.estimate
            if interval.low is not None and interval.high is not None:
                out[f"{self.prefix}/{kind}_low"] = interval.low
                out[f"{self.prefix}/{kind}_high"] = interval.high
        return out


def kl_estimator(
    policy: torch.nn.Module, tokenizer, start, load: Callable[[Any], torch.nn.Module], chunk_elements=None
) -> KLEstimator:
    """The estimator against the starting policy `start` (a ModelSpec): a LoRA policy in memory is its own
    reference with the adapters off; otherwise `load(start)` gives a second, frozen copy of the start."""
    if getattr(start, "uses_lora", False) and hasattr(policy, "disable_adapter"):
        return KLEstimator(policy, policy, tokenizer, cast(Any, policy).disable_adapter, chunk_elements)
    reference = load(start)
    reference.requires_grad_(False)
    return KLEstimator(policy, reference, tokenizer, chunk_elements=chunk_elements)
