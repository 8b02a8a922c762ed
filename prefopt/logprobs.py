"""Completion log-probabilities of a causal LM without full-vocabulary tensors.

The losses need log π(y|x) summed over completion tokens, nothing else. Computing `[rows, length, vocab]`
logits and their log-softmax (what a plain `model(**batch).logits` does) costs memory that grows with
batch × length × vocab: 3.6 GB at Qwen's 151,936 tokens for a 4M-parameter model. Here the backbone
runs once over chosen and rejected rows together, the LM head is applied only at positions whose next
token is a completion token, in chunks, and each chunk is checkpointed so backward recomputes its logits
instead of keeping them (the idea of fused linear cross-entropy, in plain PyTorch).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from prefopt.data.batching import PreferenceBatch
from prefopt.losses import PairLogps

DEFAULT_CHUNK_ELEMENTS = 1 << 25  # logits elements per chunk: 32M floats = 128 MB in float32


def _token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                 targets: torch.Tensor) -> torch.Tensor:
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(-1, targets[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def chunked_token_logps(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
                        chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> torch.Tensor:
    """log p(target) for N hidden states (N, H) under the LM head, `chunk_elements` logits at a time."""
    weight, bias = head.weight, getattr(head, "bias", None)
    chunk = max(1, chunk_elements // weight.shape[0])
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    parts = []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start: start + chunk], targets[start: start + chunk]
        if needs_grad:  # keep only the chunk's inputs; backward recomputes its logits
            parts.append(checkpoint(_token_logps, h, weight, bias, t, use_reentrant=False))
        else:
            parts.append(_token_logps(h, weight, bias, t))
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=torch.float32)


def _positions(batch: PreferenceBatch):
    # Logits at position t predict token t+1: a position counts when its *next* token is a completion token.
    mask = batch.completion_mask[:, 1:]
    rows, cols = mask.nonzero(as_tuple=True)
    return rows, cols, batch.input_ids[:, 1:][rows, cols], mask.sum(dim=1)


def sequence_logps(model: torch.nn.Module, batch: PreferenceBatch,
                   chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed completion log-prob, completion token count) per row, from one forward over all rows."""
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    hidden = backbone(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).last_hidden_state
    rows, cols, targets, counts = _positions(batch)
    token_logps = chunked_token_logps(hidden[rows, cols], head, targets, chunk_elements)
    sums = torch.zeros(batch.input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), counts.to(token_logps.dtype)


def plain_sequence_logps(model: torch.nn.Module, batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook computation (full logits, full log-softmax): the reference the chunked path is tested against."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
    logps = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.completion_mask[:, 1:]
    return (logps * mask).sum(dim=1), mask.sum(dim=1).to(logps.dtype)


def pair_logps(model: torch.nn.Module, batch: PreferenceBatch,
               chunk_elements: int = DEFAULT_CHUNK_ELEMENTS) -> PairLogps:
    sums, counts = sequence_logps(model, batch, chunk_elements)
    b = batch.num_pairs
    return PairLogps(chosen=sums[:b], rejected=sums[b:], chosen_tokens=counts[:b], rejected_tokens=counts[b:])


class PairLogpsModel(torch.nn.Module):
    """A causal LM whose forward returns the batch's `PairLogps`.

    The engine wraps this module, not the bare LM, in DDP or FSDP: the backbone and the chunked LM head
    then run inside one `forward`, so the wrappers' hooks (gradient sync, parameter all-gather) fire.
    """

    def __init__(self, model: torch.nn.Module, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        super().__init__()
        self.model = model
        self.chunk_elements = chunk_elements

    def forward(self, batch: PreferenceBatch) -> PairLogps:
        return pair_logps(self.model, batch, self.chunk_elements)
