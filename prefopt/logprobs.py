"""Completion log-probabilities of a causal LM without full-vocabulary tensors.

The losses need log π(y|x) summed over completion tokens, nothing else. Computing `[rows, length, vocab]`
logits and their log-softmax (what a plain `model(**batch).logits` does) costs memory that grows with
batch × length × vocab: 3.6 GB at Qwen's 151,936 tokens for a 4M-parameter model. Here the backbone
runs once over chosen and rejected rows together (or over shared-prefix packed rows, see
`prefopt.data.batching.SharedPrefixRows`), and the LM head is applied only at positions whose next token
is a completion token, one (tokens × vocabulary) tile at a time: the forward keeps per-tile
log-normalizers only, and the backward recomputes each tile's logits to form its gradient (the idea of
fused linear cross-entropy, in plain PyTorch). Tiles are small enough to stay in a CPU's last-level cache,
and the only full-tile elementwise work is one fused `log_softmax` (forward) and one `softmax` (backward):
per-row factors are folded into the small (tokens × hidden) operands of the gradient matmuls instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch

from prefopt.data.batching import PreferenceBatch
from prefopt.errors import ConfigError
from prefopt.losses import PairLogps
from prefopt.losses.base import FIELD_GROUPS

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # logits per tile: 4M floats = 16 MB in float32 (fits a CPU's last-level cache)
VOCAB_TILE = 4096  # vocabulary columns per tile


def _tiles(n: int, vocab: int, chunk_elements: int) -> tuple[int, int]:
    cols = max(1, min(vocab, VOCAB_TILE, chunk_elements))
    return max(1, chunk_elements // cols), cols


# Columns of the per-token statistics the tiled head can return beside the log-probs (no gradient).
STAT_LOG_SUM_SQ, STAT_ENTROPY, STAT_TOP1 = 0, 1, 2


class _HeadLogprobs(torch.autograd.Function):
    """log softmax(h Wᵀ + b)[target] for N hidden states, tile by tile; see the module docstring.

    With `stats`, also (N, 3) per-token statistics of the whole next-token distribution p, from the same
    tiles and without a (tokens × vocabulary) tensor beyond one tile: log Σ_v p_v² (WPO's normaliser,
    = logsumexp(2z) − 2·logsumexp(z)), the entropy −Σ_v p_v log p_v, and whether the target is the argmax
    (ties go to the lowest index, as torch.argmax). They carry no gradient. Per tile t with in-tile softmax
    q = softmax(z_t), log-normaliser L_t and weight w_t = e^{L_t − L}: Σ p² = Σ_t w_t²·Σ q², and
    H = −Σ_t w_t·(Σ q·log q + L_t − L).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_elements, stats=False):
        n, vocab = hidden.shape[0], weight.shape[0]
        rows, cols = _tiles(n, vocab, chunk_elements)
        device = hidden.device.type
        # Under autocast the matmuls run in its dtype, in backward too (autocast is off there): cast explicitly.
        dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else weight.dtype
        h_all = hidden.detach().to(dt)
        n_tiles = math.ceil(vocab / cols)
        tile_lse = torch.empty((n_tiles, n), dtype=torch.float32, device=hidden.device)
        if stats:  # per tile: Σ q², Σ q·log q, and the best logit with its column
            tile_sq, tile_qlogq = torch.empty_like(tile_lse), torch.empty_like(tile_lse)
            best = torch.full((n,), -math.inf, dtype=torch.float32, device=hidden.device)
            best_idx = torch.zeros(n, dtype=torch.long, device=hidden.device)
        for t, v0 in enumerate(range(0, vocab, cols)):
            w = weight[v0 : v0 + cols].detach().to(dt)
            b = bias[v0 : v0 + cols].detach().to(dt) if bias is not None else None
            for r0 in range(0, n, rows):
                logits = torch.nn.functional.linear(h_all[r0 : r0 + rows], w, b).float()
                if not stats:
                    ls = torch.log_softmax(logits, dim=-1)
                    tile_lse[t, r0 : r0 + rows] = logits[:, 0] - ls[:, 0]  # this tile's log Σ exp(logits)
                    continue
                # The same normaliser by hand, so the statistics share its exp: d = z − max (in place), e = e^d,
                # s = Σe: log Σ e^z = max + log s, Σq² = e·e / s², Σ q log q = e·d / s − log s. (`argmax` then a
                # gather: on CPU, `max` with indices is several times slower.)
                arg = logits.argmax(-1)
                top = logits.gather(1, arg[:, None]).squeeze(1)
                d = logits.sub_(top[:, None])
                e = torch.exp(d)
                total = e.sum(-1)
                log_total = total.log()
                tile_lse[t, r0 : r0 + rows] = top + log_total
                tile_sq[t, r0 : r0 + rows] = torch.linalg.vecdot(e, e) / total**2
                tile_qlogq[t, r0 : r0 + rows] = torch.linalg.vecdot(e, d) / total - log_total
                better = top > best[r0 : r0 + rows]  # strict: an earlier tile keeps a tie, as torch.argmax
                best[r0 : r0 + rows] = torch.where(better, top, best[r0 : r0 + rows])
                best_idx[r0 : r0 + rows] = torch.where(better, arg + v0, best_idx[r0 : r0 + rows])
        lse = torch.logsumexp(tile_lse, dim=0)
        # the target's logit as the tile's matmul makes it: operands in `dt`, sum in float32, result rounded to `dt`
        target_logit = (h_all.float() * weight[targets].detach().to(dt).float()).sum(-1)
        if bias is not None:
            target_logit = target_logit + bias[targets].detach().to(dt).float()
        target_logit = target_logit.to(dt).float()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, tile_lse)
        ctx.chunk_elements, ctx.dt = chunk_elements, dt
        if stats:
            rel = tile_lse - lse  # log w_t
            log_sum_sq = torch.logsumexp(2 * rel + tile_sq.log(), dim=0)
            entropy = -(rel.exp() * (tile_qlogq + rel)).sum(0)
            table = torch.stack([log_sum_sq, entropy, (best_idx == targets).float()], dim=1)
        else:
            table = torch.zeros((n, 0), dtype=torch.float32, device=hidden.device)
        ctx.mark_non_differentiable(table)
        return target_logit - lse, table

    @staticmethod
    def backward(ctx, grad, _grad_table=None):
        hidden, weight, bias, targets, lse, tile_lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, vocab = hidden.shape[0], weight.shape[0]
        rows, cols = _tiles(n, vocab, ctx.chunk_elements)
        g = grad.float()
        dt = ctx.dt
        h_all = hidden.to(dt)
        grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        # d logp / d logit_v = 1[v = target] − p_v. The softmax term, tile by tile: p = softmax_tile · e^(lse_t − lse),
        # so a = −g · e^(lse_t − lse) scales rows of the small operands, never the (tokens × vocab) tile.
        for t, v0 in enumerate(range(0, vocab, cols)):
            w = weight[v0 : v0 + cols].to(dt)
            b = bias[v0 : v0 + cols].to(dt) if bias is not None else None
            for r0 in range(0, n, rows):
                h = h_all[r0 : r0 + rows]
                # in `dt` (bf16 under autocast: accumulated in float32 inside the kernel), the dtype the matmuls take
                p = torch.softmax(torch.nn.functional.linear(h, w, b), dim=-1)
                a = -g[r0 : r0 + rows] * torch.exp(tile_lse[t, r0 : r0 + rows] - lse[r0 : r0 + rows])
                if grad_h is not None:  # need_h
                    grad_h[r0 : r0 + rows].addcmul_((p @ w).float(), a[:, None])
                if grad_w is not None:  # need_w
                    grad_w[v0 : v0 + cols] += (p.t() @ (h.float() * a[:, None]).to(dt)).float()
                if grad_b is not None:  # need_b
                    grad_b[v0 : v0 + cols] += p.float().t() @ a
        # the target term (+1 at the target's logit)
        if grad_h is not None:
            grad_h += g[:, None] * weight[targets].float()
        if grad_w is not None:
            grad_w.index_add_(0, targets, g[:, None] * hidden.float())
        if grad_b is not None:
            grad_b.index_add_(0, targets, g)
        return (
            grad_h.to(hidden.dtype) if grad_h is not None else None,
            grad_w.to(weight.dtype) if grad_w is not None else None,
            grad_b.to(bias.dtype) if grad_b is not None else None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    targets: torch.Tensor,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    stats: bool = False,
):
    """log p(target) for N hidden states (N, H) under the LM head, `chunk_elements` logits at a time.

    With `stats`: (log-probs, (N, 3) statistics: columns STAT_LOG_SUM_SQ, STAT_ENTROPY, STAT_TOP1), see
    `_HeadLogprobs`."""
    if hidden.shape[0] == 0:
        weight = cast(torch.Tensor, head.weight)
        empty = hidden.new_zeros(0, dtype=torch.float32) + 0 * weight.sum()  # keeps the graph connected
        return (empty, hidden.new_zeros((0, 3), dtype=torch.float32)) if stats else empty
    logps, table = _HeadLogprobs.apply(hidden, head.weight, getattr(head, "bias", None), targets, chunk_elements, stats)
    return (logps, table) if stats else logps


def _positions(batch: PreferenceBatch):
    # Logits at position t predict token t+1: a position counts when its *next* token is a completion token.
    mask = batch.completion_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols, batch.input_ids[:, 1:][rows, cols], mask.sum(dim=1)


@dataclass
class ScoredTokens:
    """The scored completion tokens of a batch's 2B sequences, whatever the layout.

    `token_logps` (S,) are the log-probs of the scored tokens; contribution k adds token `contrib_score[k]`
    to sequence `contrib_seq[k]` (a shared-prefix token counts for chosen and rejected), and each sequence's
    contributions come in completion order. `stats` (S, 3) when asked for (see `_HeadLogprobs`).
    """

    token_logps: torch.Tensor
    stats: torch.Tensor | None
    contrib_score: torch.Tensor
    contrib_seq: torch.Tensor
    counts: torch.Tensor

    def per_sequence(self, values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over each sequence's completion tokens of a per-scored-token value, (2B,)."""
        v, seq = values[self.contrib_score], self.contrib_seq
        if keep is not None:
            v, seq = v[keep], seq[keep]
        return torch.zeros(self.counts.shape[0], dtype=v.dtype, device=v.device).index_add(0, seq, v)

    def completion_position(self) -> torch.Tensor:
        """1-based position of each contribution's token within its sequence's completion, (C,)."""
        seq = self.contrib_seq
        ordered, order = torch.sort(seq, stable=True)
        starts = torch.cumsum(self.counts, 0) - self.counts
        rank = torch.arange(seq.shape[0], device=seq.device) - starts.to(seq.device)[ordered] + 1
        return torch.empty_like(rank).scatter_(0, order, rank)

    def per_token(self, values: torch.Tensor) -> torch.Tensor:
        """A per-scored-token value laid out per sequence, (2B, T): row s holds its completion tokens' values in
        completion order, zeros past `counts[s]` (T = the longest completion)."""
        width = int(self.counts.max()) if self.counts.numel() else 0
        out = torch.zeros((self.counts.shape[0], width), dtype=values.dtype, device=values.device)
        out[self.contrib_seq, self.completion_position() - 1] = values[self.contrib_score]
        return out


def sequence_logps(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    backbone: Callable | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-prob, completion token count) per sequence, from one forward over all rows.

    Sequences are the batch's 2B prompt+completion sequences (chosen, then rejected), whatever its layout.
    `backbone`: what to call instead of `model.get_decoder()` (e.g. its `torch.compile`d form).
    """
    scored = score_tokens(model, batch, chunk_elements, backbone)
    return scored.per_sequence(scored.token_logps), scored.counts.to(scored.token_logps.dtype)


def score_tokens(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    backbone: Callable | None = None,
    stats: bool = False,
) -> ScoredTokens:
    """One forward over all rows, then the tiled LM head at the scored positions only (any layout)."""
    lm: Any = model  # a transformers (or PEFT) model
    backbone = lm.get_decoder() if backbone is None else backbone
    if batch.packed is not None:
        return _packed_scored(model, backbone, batch, chunk_elements, stats)
    head = lm.get_output_embeddings()
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    rows, cols, targets, counts = _positions(batch)
    out = chunked_token_logps(hidden[rows, cols], head, targets, chunk_elements, stats=stats)
    token_logps, table = out if stats else (out, None)
    return ScoredTokens(token_logps, table, torch.arange(rows.shape[0], device=rows.device), rows, counts)


def _packed_scored(
    model: torch.nn.Module, backbone: Callable, batch: PreferenceBatch, chunk_elements: int, stats: bool
) -> ScoredTokens:
    pk = batch.packed
    assert pk is not None  # called for a packed batch
    head = cast(Any, model).get_output_embeddings()
    hidden = packed_hidden(model, backbone, batch, lambda: head.weight.dtype)
    flat = hidden.reshape(-1, hidden.shape[-1])
    out = chunked_token_logps(flat[pk.score_index], head, pk.score_target, chunk_elements, stats=stats)
    token_logps, table = out if stats else (out, None)
    return ScoredTokens(token_logps, table, pk.contrib_score, pk.contrib_seq, pk.counts)


def packed_hidden(
    model: torch.nn.Module, backbone: Callable, batch: PreferenceBatch, mask_dtype: Callable[[], torch.dtype]
) -> torch.Tensor:
    """`backbone`'s last hidden states (rows, L, H) over a packed batch (`batch.packed`: shared-prefix or flat rows).

    The shared-prefix layout's 4D mask is passed through as is (transformers' masking utils return it unchanged):
    boolean for sdpa, additive for eager attention (which adds it to the scores), in the dtype `mask_dtype()` gives.
    It is asked only then: under FSDP2 nothing touches a sharded weight before the forward's own hooks."""
    pk = batch.packed
    assert pk is not None  # called for a packed batch
    mask = pk.mask  # None in the flat layout: transformers separates the sequences by their position ids
    if mask is not None and _attention(model) == "eager":
        dtype = mask_dtype()
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)
    with _attention_kernel(batch.input_ids, checkpointed=_checkpointed(model)):
        return backbone(
            input_ids=batch.input_ids, attention_mask=mask, position_ids=pk.position_ids, use_cache=False
        ).last_hidden_state


MATH_ATTENTION_MAX_LENGTH = 1024


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether a layer of `model` recomputes its activations in the backward pass (transformers' flag)."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _attention_kernel(input_ids: torch.Tensor, checkpointed: bool = False):
    """On CPU, short packed rows run sdpa's math kernel: with an arbitrary mask it beats the CPU flash kernel
    (measured: 9% of a whole training step at ~90-token rows); long rows keep the flash kernel's O(L) memory.
    Not under gradient checkpointing: the backward pass recomputes each layer outside this context, with the
    default kernel, and a recomputation that saves other tensors than the forward did is refused."""
    from contextlib import nullcontext

    if checkpointed or input_ids.device.type != "cpu" or input_ids.shape[1] > MATH_ATTENTION_MAX_LENGTH:
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def _attention(model: torch.nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "_attn_implementation", None)


def supports_packing(model: torch.nn.Module) -> bool:
    """Whether the model's attention takes the shared-prefix layout's 4D mask (sdpa and eager do; flash-attention
    not)."""
    return _attention(model) in ("sdpa", "eager")


def packing_layout(setting: bool | str | None, model: torch.nn.Module) -> str | None:
    """`train.packing` → the batch layout for this model: "shared_prefix", "flat" or None (padded rows).

    true (auto): shared-prefix rows where the attention takes a 4D mask (sdpa, eager), else the flat layout
    (flash-attention: its variable-length kernel, no padding); false: padded rows; or a layout by name."""
    if setting in (False, None, "none", "padded"):
        return None
    if setting in (True, "auto"):
        return "shared_prefix" if supports_packing(model) else "flat"
    if setting == "flat":
        return "flat"
    if setting == "shared_prefix":
        if not supports_packing(model):
            raise ConfigError(
                f"train.packing=shared_prefix needs attention that takes a 4D mask (sdpa or eager), "
                f"not {_attention(model)!r}: use train.packing=flat or true"
            )
        return "shared_prefix"
    raise ConfigError(f"train.packing must be true, false, shared_prefix or flat (got {setting!r})")


def plain_sequence_logps(model: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook computation (full logits, full log-softmax): the reference the chunked path is tested against."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.completion_mask[:, 1:]
    return (logps * mask).sum(dim=1), mask.sum(dim=1).to(logps.dtype)


def pair_logps(
    model: torch.nn.Module,
    batch: PreferenceBatch,
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
    backbone: Callable | None = None,
    fields: Sequence[str] = (),
    diagnostics: bool = False,
    per_token: bool = False,
) -> PairLogps:
    """The batch's `PairLogps`; the optional field groups in `fields` (a loss's `needs`, see
    `prefopt.losses.base.FIELD_GROUPS`), with `diagnostics` the entropy / top-1 sums for the metrics, and with
    `per_token` each completion token's log-prob (`chosen_token_logps` / `rejected_token_logps`, detached).

    `prefix_logps`: ℓ_{≤m}, the sum over the first m = min(n_w, n_l) completion tokens of each sequence
    (differentiable). `head_logps`: Σ_t (log p_t − log Σ_v p_v²) (detached). Both come from the tiled head's
    per-token values: nothing of vocabulary size is kept.
    """
    unknown = set(fields) - set(FIELD_GROUPS)
    if unknown:
        raise ValueError(f"unknown PairLogps field groups {sorted(unknown)}; known: {sorted(FIELD_GROUPS)}")
    scored = score_tokens(model, batch, chunk_elements, backbone, stats=diagnostics or "head_logps" in fields)
    sums, counts = scored.per_sequence(scored.token_logps), scored.counts.to(scored.token_logps.dtype)
    b = batch.num_pairs
    extra: dict[str, torch.Tensor] = {}
    if "prefix_logps" in fields:
        m = torch.minimum(scored.counts[:b], scored.counts[b:]).repeat(2)
        keep = scored.completion_position() <= m[scored.contrib_seq]
        prefix = scored.per_sequence(scored.token_logps, keep)
        extra.update(chosen_prefix=prefix[:b], rejected_prefix=prefix[b:])
    if "head_logps" in fields:
        assert scored.stats is not None  # asked for above
        head = scored.per_sequence(scored.token_logps.detach() - scored.stats[:, STAT_LOG_SUM_SQ])
        extra.update(chosen_head=head[:b], rejected_head=head[b:])
    if diagnostics:
        assert scored.stats is not None  # asked for above
        entropy = scored.per_sequence(scored.stats[:, STAT_ENTROPY])
        top1 = scored.per_sequence(scored.stats[:, STAT_TOP1])
        extra.update(chosen_entropy=entropy[:b], rejected_entropy=entropy[b:], chosen_top1=top1[:b])
    if per_token:
        tokens = scored.per_token(scored.token_logps.detach())
        extra.update(chosen_token_logps=tokens[:b], rejected_token_logps=tokens[b:])
    return PairLogps(chosen=sums[:b], rejected=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:], **extra)


class PairLogpsModel(torch.nn.Module):
    """A causal LM whose forward returns the batch's `PairLogps`.

    The engine wraps this module, not the bare LM, in DDP or FSDP: the backbone and the chunked LM head
    then run inside one `forward`, so the wrappers' hooks (gradient sync, parameter all-gather) fire.
    `autocast`: a dtype to run the forward in under `torch.autocast` (mixed precision over float32 weights).
    `compile`: run the decoder (embeddings, layers, final norm) through `torch.compile(dynamic=True)`, which
    fuses the elementwise work between the matmuls (norms, rotary, SiLU·gate, residuals, casts); the LM
    head stays the tiled function above. The compiled form is held beside the model, not in it: the
    model's own forward (generation, evaluation, export) and its state-dict keys are unchanged.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS,
        autocast: torch.dtype | None = None,
        compile: bool = False,
        fields: Sequence[str] = (),
        diagnostics: bool = False,
    ):
        super().__init__()
        self.model = model
        self.chunk_elements = chunk_elements
        self.autocast = autocast
        self.fields, self.diagnostics = tuple(fields), diagnostics  # see `pair_logps`
        if compile:
            check_compiler(next(model.parameters()).device)
        # in __dict__, not as a submodule: a submodule would add `_orig_mod.` keys to this module's state dict
        lm: Any = model  # a transformers (or PEFT) model
        self.__dict__["compiled_backbone"] = torch.compile(lm.get_decoder(), dynamic=True) if compile else None

    def forward(self, batch: PreferenceBatch, per_token: bool = False) -> PairLogps:
        """`per_token`: also each completion token's log-prob (the evaluation's displacement; see `pair_logps`)."""
        args: tuple[Any, ...] = (
            self.model,
            batch,
            self.chunk_elements,
            self.compiled_backbone,
            self.fields,
            self.diagnostics,
            per_token,
        )
        if self.autocast is None:
            return pair_logps(*args)
        with torch.autocast(batch.input_ids.device.type, dtype=self.autocast):
            return pair_logps(*args)


def autocast_dtype(hardware) -> torch.dtype | None:
    """`hardware.mixed_precision=bf16` without FSDP (whose MixedPrecisionPolicy casts instead): bf16 autocast."""
    mode = getattr(hardware, "mixed_precision", None)
    if mode is None or getattr(hardware, "strategy", "none") == "fsdp":
        return None
    if mode != "bf16":
        raise ConfigError(f"hardware.mixed_precision must be bf16 or null (got {mode!r})")
    return torch.bfloat16


def check_compiler(device: torch.device) -> None:
    """torch.compile on CPU generates C++: fail at start, naming the fix, when no C++ compiler is installed."""
    import os
    import shutil

    if device.type != "cpu":
        return
    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise ConfigError(
            "train.compile=true on CPU needs a C++ compiler for torch.compile (g++, c++ or clang++ on "
            "PATH, or CXX): install one (e.g. apt install g++) or set train.compile=false"
        )
