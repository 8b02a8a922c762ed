"""Tokenized pairs, the deterministic batch order, and `PreferenceBatch` (chosen and rejected in one tensor)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

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


TRUNCATION = ("keep_end", "keep_start", "drop")


@dataclass
class TokenizeStats:
    """What tokenization cut or dropped (into `summary.json` under data.tokenize.<split>).

    Prompts are cut inside message text only (`data.truncation`: keep_end cuts the start of the earliest
    non-system messages first, keep_start the end of the latest; drop drops the pair), never in the
    template's special tokens. Completions that overflow `max_length` lose their end (drop: the pair)."""

    pairs: int = 0
    truncated_prompts: int = 0
    truncated_completions: int = 0
    prompt_tokens_cut: int = 0
    completion_tokens_cut: int = 0
    dropped_long: int = 0  # pairs dropped: data.truncation=drop, or a template that alone exceeds max_prompt_length
    truncation: str = "keep_end"


def prompt_messages(prompt, system_prompt: str | None, user_suffix: str | None = None) -> list[dict]:
    """The chat messages of a prompt: a string becomes one user message; `system_prompt` is prepended when the
    prompt brings no system message of its own; `user_suffix` is appended to the last user message (a recipe's
    instruction, e.g. Qwen2.5-Math's "Let's think step by step ...")."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    if user_suffix:
        last = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=None)
        if last is not None:
            messages[last]["content"] = messages[last]["content"] + user_suffix
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system_prompt})
    return messages


def _check_template(tokenizer) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            "data.chat_template=true but this tokenizer has no chat template "
            "(a base model?): set data.chat_template=false to train on raw prompts"
        )


def render_messages(tokenizer, messages: list[dict], chat_template: bool) -> str:
    """The prompt text the model reads: the whole conversation through the chat template, ending with the
    assistant header; without a template, the one message's text as it is."""
    if not chat_template:
        return "\n\n".join(m["content"] for m in messages)
    _check_template(tokenizer)
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(
    tokenizer, prompt, chat_template: bool, system_prompt: str | None, user_suffix: str | None = None
) -> str:
    """The prompt text of a problem or conversation: system message, the last user turn followed by
    `user_suffix`, the generation prompt (the same text for pair sampling, training and evaluation)."""
    if not chat_template:
        if not isinstance(prompt, str):
            raise ConfigError(
                "data.chat_template=false but the data has conversational prompts (lists of "
                "messages): they need the chat template"
            )
        return prompt + (user_suffix or "")
    return render_messages(tokenizer, prompt_messages(prompt, system_prompt, user_suffix), True)


def _cut_order(messages: list[dict], keep_end: bool) -> list[int]:
    """Which message texts to cut first: keep_end the earliest, keep_start the latest; system messages last."""
    order = list(range(len(messages))) if keep_end else list(range(len(messages)))[::-1]
    return [i for i in order if messages[i]["role"] != "system"] + [i for i in order if messages[i]["role"] == "system"]


def _shorten(tokenizer, text: str, excess: int, keep_end: bool) -> str:
    """`text` without its first (keep_end) or last `excess` tokens, cut at a whole character."""
    ids = tokenizer(text, add_special_tokens=False).input_ids
    keep = max(0, len(ids) - excess)
    kept = ids[len(ids) - keep :] if keep_end else ids[:keep]
    out = tokenizer.decode(kept).strip("\ufffd") if keep else ""  # a byte-level cut can split a character
    if len(out) >= len(text):  # always progress
        out = text[1:] if keep_end else text[:-1]
    return out


def fit_prompt(
    tokenizer, messages: list[dict], chat_template: bool, limit: int, truncation: str
) -> tuple[list[int], int] | None:
    """Token ids of the rendered prompt within `limit` tokens, cutting message text only (the template's
    special tokens, BOS and assistant header stay whole); (ids, tokens cut), or None: dropped."""
    ids = tokenizer(render_messages(tokenizer, messages, chat_template), add_special_tokens=not chat_template).input_ids
    full = len(ids)
    if full <= limit:
        return ids, 0
    if truncation == "drop":
        return None
    messages = [dict(m) for m in messages]
    keep_end = truncation == "keep_end"
    for i in _cut_order(messages, keep_end):
        while len(ids) > limit and messages[i]["content"]:
            messages[i]["content"] = _shorten(tokenizer, messages[i]["content"], len(ids) - limit, keep_end)
            ids = tokenizer(
                render_messages(tokenizer, messages, chat_template), add_special_tokens=not chat_template
            ).input_ids
        if len(ids) <= limit:
            return ids, full - len(ids)
    return None  # the template alone is longer than the limit


def template_bos_count(tokenizer, messages: list[dict], chat_template: bool) -> int:
    """BOS tokens the prompt format itself writes for these messages' roles (their texts emptied).

    A chat template may write BOS once at the start (Llama-3's `<|begin_of_text|>`) or use the BOS token as its
    message delimiter (SmolLM2's ChatML writes `<|im_start|>` before every message): what the template writes is
    right by definition. A BOS beyond those, a doubled one at the start or one inside a message's text, comes from
    the data or from a tokenizer adding its own on top of the template's, and the model never saw it so."""
    skeleton = [{**m, "content": ""} for m in messages]
    ids = tokenizer(render_messages(tokenizer, skeleton, chat_template), add_special_tokens=not chat_template).input_ids
    return ids.count(tokenizer.bos_token_id)


def tokenize_pairs(
    pairs: Sequence[PreferencePair],
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    completion_eos: str | None = None,
    chat_template: bool = True,
    system_prompt: str | None = None,
    truncation: str = "keep_end",
    user_suffix: str | None = None,
) -> tuple[list[TokenizedPair], TokenizeStats]:
    """Prompt and completions tokenized separately (so the boundary is exact), completion + EOS.

    A prompt over `max_prompt_length` is cut inside its message text (`truncation`, see `TokenizeStats`);
    completions are then cut at their end so that prompt + completion fits `max_length`. All counted.
    """
    if max_prompt_length >= max_length:
        raise ConfigError(f"data.max_prompt_length ({max_prompt_length}) must be < data.max_length ({max_length})")
    if truncation not in TRUNCATION:
        raise ConfigError(f"data.truncation must be one of {', '.join(TRUNCATION)} (got {truncation!r})")
    eos = completion_eos or tokenizer.eos_token
    bos_id = tokenizer.bos_token_id
    expected_bos: dict[tuple, int] = {}  # by the roles of a prompt's messages
    out, stats = [], TokenizeStats(truncation=truncation)
    for pair in pairs:
        if not chat_template and not isinstance(pair.prompt, str):
            raise DataError(f"pair {pair.pair_id}: a conversational prompt needs data.chat_template=true")
        messages = prompt_messages(pair.prompt, system_prompt if chat_template else None, user_suffix)
        fitted = fit_prompt(tokenizer, messages, chat_template, max_prompt_length, truncation)
        if fitted is None:
            stats.dropped_long += 1
            continue
        prompt, cut = fitted
        if bos_id is not None:
            roles = tuple(m["role"] for m in messages)
            if roles not in expected_bos:
                expected_bos[roles] = template_bos_count(tokenizer, messages, chat_template)
            if prompt.count(bos_id) != expected_bos[roles]:
                raise DataError(
                    f"pair {pair.pair_id}: the prompt has {prompt.count(bos_id)} BOS tokens "
                    f"({tokenizer.bos_token}) where its {'chat template' if chat_template else 'tokenizer'} "
                    f"writes {expected_bos[roles]}: a message's text carries the BOS token itself"
                )
        budget = max_length - len(prompt)
        completions = [
            tokenizer(text + eos, add_special_tokens=False).input_ids for text in (pair.chosen, pair.rejected)
        ]
        over = [max(0, len(ids) - budget) for ids in completions]
        if truncation == "drop" and any(over):
            stats.dropped_long += 1
            continue
        stats.truncated_prompts += cut > 0
        stats.prompt_tokens_cut += cut
        stats.truncated_completions += sum(n > 0 for n in over)
        stats.completion_tokens_cut += sum(over)
        out.append(TokenizedPair(pair.pair_id, tuple(prompt), *(tuple(ids[:budget]) for ids in completions)))
        stats.pairs += 1
    if pairs and not out:
        raise DataError(
            f"all {len(pairs)} pairs were dropped: each is longer than data.max_prompt_length="
            f"{max_prompt_length} / data.max_length={max_length} (data.truncation={truncation})"
        )
    return out, stats


@dataclass
class SharedPrefixRows:
    """The packed layout of a batch: one row per pair instead of two, nothing computed twice.

    Prompt+chosen and prompt+rejected share a prefix (the prompt, and often the start of the answers): the
    "trunk", their longest common prefix. Row i holds trunk_i, then the chosen tail, then the rejected tail.
    Position ids restart at len(trunk) for each tail, and `mask` (B, 1, L, L) lets a tail token see the trunk
    and its own tail only (causally), so every hidden state equals the one in the two separate sequences.
    A trunk completion token is scored once and counted for both sequences of its pair.

    The flat layout (`collate_flat`) uses the same fields with `mask=None`: one row of all 2B sequences end to
    end, position ids restarting at 0 for each, for attention that separates sequences by their position ids
    (flash-attention's variable-length kernels; transformers builds the block mask for sdpa and eager).
    """

    position_ids: torch.Tensor  # (B, L)
    mask: torch.Tensor | None  # (B, 1, L, L) bool, True = may attend; None: sequences separated by position ids
    score_index: torch.Tensor  # (S,) flat index row * L + col of the hidden state that predicts a scored token
    score_target: torch.Tensor  # (S,) the scored token
    contrib_score: torch.Tensor  # (C,) index into the S scored tokens ...
    contrib_seq: torch.Tensor  # (C,) ... and the sequence (0..2B-1: chosen rows, then rejected) it counts for
    counts: torch.Tensor  # (2B,) scored tokens per sequence
    tokens: int  # tokens of the 2B unpacked sequences (what tokens/s counts)
    last_index: torch.Tensor  # (2B,) flat index of each sequence's last token (a reward model reads it)

    def to(self, device) -> SharedPrefixRows:
        t: dict[str, Any] = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in vars(self).items()}
        return SharedPrefixRows(**t)


@dataclass
class PreferenceBatch:
    """B pairs as 2B right-padded rows: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected.

    `completion_mask[r, t]` is 1 where token t of row r is a completion token (what the log-probs sum over):
    prompt and padding are 0. With `packed` set (see `SharedPrefixRows`), the tensors hold B packed rows
    instead and the log-probs come from the packed layout.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    pair_ids: list[str]
    extras: dict = field(default_factory=dict)
    packed: SharedPrefixRows | None = None

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens of the 2B prompt+completion sequences, whatever the layout."""
        return self.packed.tokens if self.packed is not None else int(self.attention_mask.sum())

    def to(self, device) -> PreferenceBatch:
        return PreferenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.pair_ids,
            self.extras,
            self.packed.to(device) if self.packed is not None else None,
        )


PACKING_LAYOUTS = ("shared_prefix", "flat")


def collate(pairs: Sequence[TokenizedPair], pad_id: int, packing: bool | str | None = False) -> PreferenceBatch:
    """Pairs → a batch: 2B padded rows; with `packing` True or "shared_prefix" B shared-prefix rows, with
    "flat" one row of 2B sequences (see `SharedPrefixRows`). Every layout gives the same log-probs."""
    if packing == "flat":
        return collate_flat(pairs, pad_id)
    if packing in (True, "shared_prefix"):
        return collate_packed(pairs, pad_id)
    if packing not in (False, None):
        raise ValueError(f"packing must be False, True or one of {PACKING_LAYOUTS} (got {packing!r})")
    rows = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    return PreferenceBatch(*padded_rows(rows, pad_id), [p.pair_id for p in pairs])


def padded_rows(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(prompt ids, completion ids) rows → right-padded (input_ids, attention_mask, completion_mask)."""
    width = max(len(a) + len(b) for a, b in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    comp = torch.zeros((len(rows), width), dtype=torch.bool)
    for r, (prompt, completion) in enumerate(rows):
        n, m = len(prompt), len(completion)
        ids[r, : n + m] = torch.tensor([*prompt, *completion], dtype=torch.long)
        attn[r, : n + m] = 1
        comp[r, n : n + m] = True
    return ids, attn, comp


def _common_prefix(a: tuple[int, ...], b: tuple[int, ...]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def collate_packed(pairs: Sequence[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """B rows of trunk + chosen tail + rejected tail (see `SharedPrefixRows`); same log-probs as `collate`."""
    b = len(pairs)
    layout = []
    for p in pairs:
        n = len(p.prompt_ids)
        t = n + _common_prefix(p.chosen_ids, p.rejected_ids)  # the trunk: prompt + shared start of the answers
        full_c, full_r = p.prompt_ids + p.chosen_ids, p.prompt_ids + p.rejected_ids
        layout.append((n, t, full_c[:t], full_c[t:], full_r[t:]))
    width = max(len(trunk) + len(tc) + len(tr) for _, _, trunk, tc, tr in layout)
    ids = torch.full((b, width), pad_id, dtype=torch.long)
    attn = torch.zeros((b, width), dtype=torch.long)
    comp = torch.zeros((b, width), dtype=torch.bool)
    pos = torch.zeros((b, width), dtype=torch.long)
    seg = torch.full((b, width), -1, dtype=torch.long)  # 0 trunk, 1 chosen tail, 2 rejected tail, -1 padding
    score_index: list[int] = []
    score_target: list[int] = []
    contrib_score: list[int] = []
    contrib_seq: list[int] = []
    last = [0] * (2 * b)
    tokens = 0

    def score(row: int, predictor: int, target: int, *seqs: int) -> None:
        if predictor < 0:  # a first token with nothing before it is not scored (as in the padded layout)
            return
        for s in seqs:
            contrib_score.append(len(score_index))
            contrib_seq.append(s)
        score_index.append(row * width + predictor)
        score_target.append(target)

    for i, (n, t, trunk, tail_c, tail_r) in enumerate(layout):
        a, r = len(tail_c), len(tail_r)
        ids[i, : t + a + r] = torch.tensor(trunk + tail_c + tail_r, dtype=torch.long)
        attn[i, : t + a + r] = 1
        comp[i, n : t + a + r] = True
        pos[i, :t] = torch.arange(t)
        pos[i, t : t + a] = torch.arange(t, t + a)
        pos[i, t + a : t + a + r] = torch.arange(t, t + r)
        seg[i, :t], seg[i, t : t + a], seg[i, t + a : t + a + r] = 0, 1, 2
        tokens += 2 * n + len(pairs[i].chosen_ids) + len(pairs[i].rejected_ids)
        for j in range(n, t):  # shared completion tokens: scored once, counted for chosen and rejected
            score(i, j - 1, trunk[j], i, b + i)
        for m in range(a):
            score(i, t + m - 1, tail_c[m], i)
        for m in range(r):
            score(i, (t - 1) if m == 0 else (t + a + m - 1), tail_r[m], b + i)
        # a sequence's last token: the end of its tail, or of the trunk when it has no tail of its own
        last[i], last[b + i] = i * width + (t + a - 1 if a else t - 1), i * width + (t + a + r - 1 if r else t - 1)
    q, k = seg[:, :, None], seg[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    mask = causal & (((k == 0) & (q >= 0)) | ((k == q) & (q > 0)))
    mask |= torch.eye(width, dtype=torch.bool)  # padding attends to itself only (no fully masked row)
    contrib_seq_t = torch.tensor(contrib_seq, dtype=torch.long)
    packed = SharedPrefixRows(
        position_ids=pos,
        mask=mask[:, None],
        score_index=torch.tensor(score_index, dtype=torch.long),
        score_target=torch.tensor(score_target, dtype=torch.long),
        contrib_score=torch.tensor(contrib_score, dtype=torch.long),
        contrib_seq=contrib_seq_t,
        counts=torch.bincount(contrib_seq_t, minlength=2 * b),
        tokens=tokens,
        last_index=torch.tensor(last, dtype=torch.long),
    )
    return PreferenceBatch(ids, attn, comp, [p.pair_id for p in pairs], packed=packed)


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
    return [pairs[i : i + micro_batch_size] for i in range(0, len(pairs), micro_batch_size)]


def collate_flat(pairs: Sequence[TokenizedPair], pad_id: int) -> PreferenceBatch:
    """One row of the 2B sequences end to end (prompt+chosen for each pair, then prompt+rejected), no padding.

    Position ids restart at 0 for each sequence and there is no attention mask: the attention tells the
    sequences apart by their position ids (`SharedPrefixRows` with `mask=None`). Nothing is shared, nothing padded.
    """
    b = len(pairs)
    seqs = [(p.prompt_ids, p.chosen_ids) for p in pairs] + [(p.prompt_ids, p.rejected_ids) for p in pairs]
    ids: list[int] = []
    pos: list[int] = []
    comp: list[bool] = []
    last: list[int] = []
    score_index: list[int] = []
    score_target: list[int] = []
    for prompt, completion in seqs:
        start, n = len(ids), len(prompt)
        ids += list(prompt) + list(completion)
        last.append(len(ids) - 1)
        pos += range(n + len(completion))
        comp += [False] * n + [True] * len(completion)
        for m, token in enumerate(completion):
            if n + m == 0:  # a first token with nothing before it is not scored (as in the padded layout)
                continue
            score_index.append(start + n + m - 1)
            score_target.append(token)
    seq_of_score = [
        s for s, (prompt, completion) in enumerate(seqs) for m in range(len(completion)) if len(prompt) + m > 0
    ]
    contrib_seq = torch.tensor(seq_of_score, dtype=torch.long)
    packed = SharedPrefixRows(
        position_ids=torch.tensor([pos], dtype=torch.long),
        mask=None,
        score_index=torch.tensor(score_index, dtype=torch.long),
        score_target=torch.tensor(score_target, dtype=torch.long),
        contrib_score=torch.arange(len(score_index)),
        contrib_seq=contrib_seq,
        counts=torch.bincount(contrib_seq, minlength=2 * b),
        tokens=len(ids),
        last_index=torch.tensor(last, dtype=torch.long),
    )
    return PreferenceBatch(
        torch.tensor([ids], dtype=torch.long),
        torch.ones((1, len(ids)), dtype=torch.long),
        torch.tensor([comp], dtype=torch.bool),
        [p.pair_id for p in pairs],
        packed=packed,
    )
