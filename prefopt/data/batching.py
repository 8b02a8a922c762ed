"""Tokenized pairs, the deterministic batch order, and `PreferenceBatch` (chosen and rejected in one tensor)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from prefopt.data.sources import PreferencePair
from prefopt.errors import ConfigError, DataError


@dataclass(frozen=True)
class TokenizedPair:
    pair_id: str
    prompt_ids: tuple[int, ...]
    chosen_ids: tuple[int, ...]
    rejected_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0


def render_prompt(tokenizer, prompt: str, chat_template: bool, system_prompt: str | None) -> str:
    if not chat_template:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError("data.chat_template=true but this tokenizer has no chat template "
                          "(a base model?): set data.chat_template=false to train on raw prompts")
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def tokenize_pairs(pairs: Sequence[PreferencePair], tokenizer, max_length: int, max_prompt_length: int,
                   completion_eos: str | None = None, chat_template: bool = True,
                   system_prompt: str | None = None) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Prompt and completions tokenized separately (so the boundary is exact), completion + EOS.

    Long prompts keep their end (the question is at the end of a chat); completions are then cut so that
    prompt + completion fits `max_length`. Both are counted in the stats.
    """
    if max_prompt_length >= max_length:
        raise ConfigError(f"data.max_prompt_length ({max_prompt_length}) must be < data.max_length ({max_length})")
    eos = completion_eos or tokenizer.eos_token
    bos_id = tokenizer.bos_token_id
    out, stats = [], TokenizeStats()
    for pair in pairs:
        text = render_prompt(tokenizer, pair.prompt, chat_template, system_prompt)
        prompt = tokenizer(text, add_special_tokens=not chat_template).input_ids
        if bos_id is not None and chat_template and prompt.count(bos_id) != 1:
            raise DataError(f"pair {pair.pair_id}: the prompt has {prompt.count(bos_id)} BOS tokens, expected exactly one")
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.truncated_prompts += 1
        budget = max_length - len(prompt)
        completions = []
        for text in (pair.chosen, pair.rejected):
            ids = tokenizer(text + eos, add_special_tokens=False).input_ids
            if len(ids) > budget:
                ids = ids[:budget]
                stats.truncated_completions += 1
            completions.append(tuple(ids))
        out.append(TokenizedPair(pair.pair_id, tuple(prompt), *completions))
        stats.pairs += 1
    return out, stats


@dataclass
class PreferenceBatch:
    """B pairs as 2B right-padded rows: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    `completion_mask[r, t]` is 1 where token t of row r is a completion token (what the log-probs sum over):
    prompt and padding are 0.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    pair_ids: list[str]
    reference: "object | None" = None  # PairLogps from the reference cache, when one is used
    extras: dict = field(default_factory=dict)

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def to(self, device) -> "PreferenceBatch":
        ref = self.reference.to(device) if self.reference is not None and hasattr(self.reference, "to") else self.reference
        return PreferenceBatch(self.input_ids.to(device), self.attention_mask.to(device),
                               self.completion_mask.to(device), self.pair_ids, ref, self.extras)


def collate(pairs: Sequence[TokenizedPair], pad_id: int) -> PreferenceBatch:
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        ids[r, : n + m] = torch.tensor(prompt + completion, dtype=torch.long)
        attn[r, : n + m] = 1
        comp[r, n: n + m] = True
    return PreferenceBatch(ids, attn, comp, [p.pair_id for p in pairs])


class PairBatcher:
    """The pairs of optimizer step `s`, as a pure function of (seed, s): resuming at step s needs no state.

    Each epoch is a fresh permutation seeded by (seed, epoch); consecutive steps take consecutive slices of
    the concatenated epochs, so no pair is seen twice within an epoch. Under data parallelism each rank
    takes its contiguous share of every global batch.
    """

    def __init__(self, pairs: Sequence[TokenizedPair], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if not pairs:
            raise DataError("the training set is empty")
        if batch_size % world_size:
            raise ConfigError(f"batch_size ({batch_size}) must be divisible by the world size ({world_size})")
        self.pairs, self.batch_size, self.seed = pairs, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(len(self.pairs), generator=g).tolist()}
        return self._perms[epoch]

    def indices(self, step: int) -> list[int]:
        n, share = len(self.pairs), self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * share
        return [self._perm(p // n)[p % n] for p in range(start, start + share)]

    def epoch(self, step: int) -> float:
        return step * self.batch_size / len(self.pairs)

    def batch_ids(self, step: int) -> list[str]:
        return [self.pairs[i].pair_id for i in self.indices(step)]

    def batch(self, step: int) -> list[TokenizedPair]:
        return [self.pairs[i] for i in self.indices(step)]


def micro_batches(pairs: Sequence[TokenizedPair], micro_batch_size: int) -> list[Sequence[TokenizedPair]]:
    return [pairs[i: i + micro_batch_size] for i in range(0, len(pairs), micro_batch_size)]
