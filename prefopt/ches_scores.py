"""CHES: which preference pairs displace the chosen response, scored before training.

Razin et al., "Unintentional Unalignment: Likelihood Displacement in Direct Preference Optimization"
(arXiv 2410.08847, ICLR 2025), Definition 2: the centered hidden embedding similarity of a pair under the
starting model,

    CHES_x(y+, y-) = < Σ_{k=1}^{|y+|} h_{x,y+<k} , Σ_{k'=1}^{|y-|} h_{x,y-<k'} > − || Σ_{k=1}^{|y+|} h_{x,y+<k} ||²

where h_{x,z<k} is the model's last hidden state (the one the LM head turns into the logits of token k)
given the prompt x and the first k−1 tokens of response z. The length-normalized variant (the paper's
Section 6, where it filters the training data) replaces each sum by the mean over the response's tokens:

    CHES_ln = < (1/|y+|) Σ_k h+ , (1/|y-|) Σ_k' h- > − || (1/|y+|) Σ_k h+ ||²

Both follow the official code (princeton-nlp/unintentional-unalignment, ches/ches.py). A high score means
the two responses look alike to the model: the paper shows those pairs drive the chosen response's
likelihood down during DPO, and that dropping the highest-scoring ones mitigates it.

The responses are tokenized as a preference run tokenizes them (`prefopt.data.batching.tokenize_pairs`:
chat template, system prompt, truncation, completion + EOS), so the hidden states are those the training
loss reads. `drop_top_ches` (`data.drop_top_ches`) drops the top share of the training pairs.
"""

from __future__ import annotations

import gc
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prefopt.data.batching import TokenizedPair, collate, tokenize_pairs
from prefopt.data.rows import is_local, read_rows
from prefopt.data.sources import PreferencePair, validate_rows
from prefopt.errors import ConfigError
from prefopt.io import atomic_write_text
from prefopt.models import load_model

log = logging.getLogger("prefopt")

# The per-pair fields a scored pair file carries, by variant.
FIELDS = {"raw": "ches", "length_normalized": "ches_length_normalized"}
TOKEN_BUDGET = 32768  # tokens (rows × padded width) per forward


def ches(
    sum_chosen: torch.Tensor,
    sum_rejected: torch.Tensor,
    n_chosen: torch.Tensor | None = None,
    n_rejected: torch.Tensor | None = None,
) -> torch.Tensor:
    """CHES from the summed hidden states (..., H) of each response; with the token counts, the
    length-normalized CHES (the sums divided by them first). See the module docstring."""
    if n_chosen is not None and n_rejected is not None:
        sum_chosen = sum_chosen / n_chosen.unsqueeze(-1)
        sum_rejected = sum_rejected / n_rejected.unsqueeze(-1)
    return (sum_chosen * sum_rejected).sum(-1) - (sum_chosen * sum_chosen).sum(-1)


def ches_from_hidden(h_chosen: torch.Tensor, h_rejected: torch.Tensor) -> dict[str, float]:
    """Both variants for one pair from its responses' hidden states, (|y+|, H) and (|y-|, H)."""
    sc, sr = h_chosen.double().sum(0), h_rejected.double().sum(0)
    nc, nr = torch.tensor(float(h_chosen.shape[0])), torch.tensor(float(h_rejected.shape[0]))
    return {
        FIELDS["raw"]: float(ches(sc, sr)),
        FIELDS["length_normalized"]: float(ches(sc, sr, nc.double(), nr.double())),
    }


def _batches(pairs: Sequence[TokenizedPair], budget: int) -> list[list[int]]:
    """Indices of `pairs`, longest first, grouped so that 2 × pairs × longest stays within `budget` tokens."""
    order = sorted(range(len(pairs)), key=lambda i: -pairs[i].length)
    out: list[list[int]] = []
    for i in order:
        if out and 2 * (len(out[-1]) + 1) * pairs[out[-1][0]].length <= budget:
            out[-1].append(i)
        else:
            out.append([i])
    return out


@torch.no_grad()
def response_hidden_sums(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, budget: int = TOKEN_BUDGET
) -> tuple[torch.Tensor, torch.Tensor]:
    """(sums (2, N, H), counts (2, N)): per pair, Σ over each response's tokens of the hidden state that
    predicts it (index 0: chosen, 1: rejected), in float32, on the CPU."""
    lm: Any = model
    backbone = lm.get_decoder()
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    sums: list[torch.Tensor | None] = [None] * len(pairs)
    counts: list[torch.Tensor | None] = [None] * len(pairs)
    try:
        for idx in _batches(pairs, budget):
            batch = collate([pairs[i] for i in idx], pad_id).to(device)
            hidden = backbone(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False
            ).last_hidden_state
            # The state at position t predicts token t+1: it counts when token t+1 is a response token.
            mask = batch.completion_mask[:, 1:].unsqueeze(-1).float()
            total = (hidden[:, :-1].float() * mask).sum(1).cpu()  # (2B, H): chosen rows, then rejected rows
            n = mask.sum((1, 2)).cpu()
            b = len(idx)
            for j, i in enumerate(idx):
                sums[i] = torch.stack([total[j], total[b + j]])
                counts[i] = torch.stack([n[j], n[b + j]])
    finally:
        model.train(was_training)
    if not pairs:
        return torch.zeros(2, 0, 0), torch.zeros(2, 0)
    return torch.stack(sums, 1), torch.stack(counts, 1)  # type: ignore[arg-type]


def score_tokenized(
    model: torch.nn.Module, pairs: Sequence[TokenizedPair], pad_id: int, budget: int = TOKEN_BUDGET
) -> list[dict[str, float]]:
    """Both CHES variants of each tokenized pair under `model` ({"ches": ..., "ches_length_normalized": ...})."""
    if not pairs:
        return []
    sums, counts = response_hidden_sums(model, pairs, pad_id, budget)
    sums, counts = sums.double(), counts.double()
    raw = ches(sums[0], sums[1]).tolist()
    normalized = ches(sums[0], sums[1], counts[0], counts[1]).tolist()
    return [{FIELDS["raw"]: r, FIELDS["length_normalized"]: v} for r, v in zip(raw, normalized)]


def score_pairs(
    model: torch.nn.Module, tokenizer, pairs: Sequence[PreferencePair], tokenize: dict
) -> list[dict[str, float] | None]:
    """CHES of each pair as a preference run tokenizes it (`tokenize`: tokenize_pairs' settings, with
    completion_eos); None for a pair tokenization drops (data.truncation=drop)."""
    numbered = [replace(p, pair_id=str(i)) for i, p in enumerate(pairs)]
    tokenized, _ = tokenize_pairs(numbered, tokenizer, **tokenize)
    scores = score_tokenized(model, tokenized, tokenizer.pad_token_id)
    out: list[dict[str, float] | None] = [None] * len(pairs)
    for t, s in zip(tokenized, scores):
        out[int(t.pair_id)] = s
    return out


def summary(scores: Sequence[dict[str, float] | None]) -> dict:
    """Counts and quantiles of both variants (what a provenance file and summary.json record)."""
    kept = [s for s in scores if s is not None]
    out: dict[str, Any] = {"pairs": len(scores), "scored": len(kept), "unscored": len(scores) - len(kept)}
    for variant, name in FIELDS.items():
        values = np.array([s[name] for s in kept], dtype=float)
        if values.size:
            q = np.quantile(values, [0.0, 0.25, 0.5, 0.75, 0.9, 1.0])
            out[variant] = {
                "mean": float(values.mean()),
                **dict(zip(("min", "q25", "median", "q75", "q90", "max"), map(float, q))),
            }
    return out


def score_pair_rows(model, tokenizer, rows: list[dict], tokenize: dict) -> dict:
    """Add `ches` and `ches_length_normalized` to each pair dict {prompt, chosen, rejected, ...} (in place;
    a pair tokenization drops gets none); returns the summary."""
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], str(i)) for i, r in enumerate(rows)]
    scores = score_pairs(model, tokenizer, pairs, tokenize)
    for row, score in zip(rows, scores):
        row.update(score or {})
    return summary(scores)


def scored_path(source, run_dir: Path) -> Path:
    """Where `score_file` writes: `<stem>.ches.jsonl` beside a local file, else run_dir/pairs.ches.jsonl."""
    path = Path(str(source.path)).expanduser()
    if is_local(str(source.path)) and path.is_file():
        return path.with_name(f"{path.stem}.ches.jsonl")
    return Path(run_dir) / "pairs.ches.jsonl"


def score_file(model, tokenizer, source, tokenize: dict, out: Path, provenance: dict) -> dict:
    """Score every row of `source` (a `FileData`: its `path`, `split`, `subset` and `fields`) and write the
    rows as they were plus `ches` / `ches_length_normalized` to `out` (JSONL), with `<out>.provenance.json`
    (`provenance` + the summary). A row validation drops (empty or identical responses) or tokenization
    drops gets no score. Returns the provenance record."""
    rows = read_rows(source.path, source.split, source.subset)
    pairs: list[PreferencePair] = []
    where: list[int | None] = []
    for number, row in rows.numbered:
        valid, _ = validate_rows([(number, row)], rows.source, source.fields, drop_identical=True)
        where.append(len(pairs) if valid else None)
        pairs.extend(valid)
    scores = score_pairs(model, tokenizer, pairs, tokenize)
    per_row = [scores[i] if i is not None else None for i in where]
    lines = [
        json.dumps({**row, **(s or {})}, ensure_ascii=False, default=str) + "\n"
        for (_, row), s in zip(rows.numbered, per_row)
    ]
    atomic_write_text(out, "".join(lines), what="CHES-scored pairs")
    record = {**provenance, "source": rows.source, "file": out.name, "ches": summary(per_row)}
    meta = out.with_name(out.name + ".provenance.json")
    atomic_write_text(meta, json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return record


# ------------------------------------------------------------------------------------------------------
# Dropping the highest-CHES training pairs (data.drop_top_ches)


@dataclass
class CHESFilter:
    """`data.drop_top_ches` (a share in [0, 1)) and `data.ches_score` (which variant ranks the pairs)."""

    share: float = 0.0
    score: str = "length_normalized"

    def __post_init__(self):
        share = self.share
        if isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 <= share < 1:
            raise ConfigError(
                f"data.drop_top_ches must be a share in [0, 1) of the training pairs to drop (got {share!r})"
            )
        if self.score not in FIELDS:
            raise ConfigError(f"data.ches_score must be one of {', '.join(FIELDS)} (got {self.score!r})")

    @property
    def active(self) -> bool:
        return self.share > 0

    def apply(self, rows: list[PreferencePair], spec, tokenizer, tokenize: dict, hardware, run_dir: Path):
        """(the rows minus the top ⌊share·N⌋ by CHES, a record for summary.json). Scores come from the rows'
        own `ches` fields when every row has one, else from the reference (`spec`, the starting policy); the
        main process writes them per pair to run_dir/ches.jsonl and every process reads that file, so all
        drop the same pairs."""
        field = FIELDS[self.score]
        carried = all(isinstance(r.metadata.get(field), (int, float)) for r in rows)
        path = Path(run_dir) / "ches.jsonl"
        if hardware.is_main:
            scores = (
                [{FIELDS[v]: r.metadata.get(FIELDS[v]) for v in FIELDS} for r in rows]
                if carried
                else reference_scores(rows, spec, tokenizer, tokenize, hardware)
            )
            lines = [json.dumps({"pair_id": r.pair_id, **(s or {})}) + "\n" for r, s in zip(rows, scores)]
            atomic_write_text(path, "".join(lines), what="CHES scores")
        hardware.barrier()
        values = [json.loads(line).get(field) for line in path.read_text().splitlines()]
        kept, record = drop_top(rows, values, self.share)
        record.update(score=self.score, source="pair file" if carried else "reference model", file=str(path))
        log.info(
            "CHES: dropped %d of %d training pairs (the top %.3g by %s CHES; threshold %s)",
            record["dropped"],
            record["pairs"],
            self.share,
            self.score,
            record["threshold"],
        )
        return kept, record


def drop_top(rows: list, values: Sequence[float | None], share: float) -> tuple[list, dict]:
    """`rows` minus the ⌊share·N⌋ with the highest `values` (N: the rows with a value; ties keep file order,
    the earlier row ranked higher); rows without a value are kept. Returns (kept rows, record)."""
    scored = [i for i, v in enumerate(values) if v is not None and math.isfinite(v)]
    k = math.floor(share * len(scored))
    ranked = sorted(scored, key=lambda i: -float(values[i]))  # type: ignore[arg-type]
    dropped = set(ranked[:k])
    record = {
        "share": share,
        "pairs": len(rows),
        "scored": len(scored),
        "dropped": k,
        "kept": len(rows) - k,
        "threshold": float(values[ranked[k - 1]]) if k else None,  # type: ignore[arg-type]  # lowest dropped
        "highest_kept": float(values[ranked[k]]) if k < len(ranked) else None,  # type: ignore[arg-type]
    }
    return [r for i, r in enumerate(rows) if i not in dropped], record


def reference_scores(rows, spec, tokenizer, tokenize: dict, hardware) -> list[dict[str, float] | None]:
    """CHES of `rows` under the starting policy `spec`, loaded for this and freed after."""
    model = load_model(spec, vocab_size=len(tokenizer)).to(hardware.torch_device)
    try:
        return score_pairs(model, tokenizer, rows, tokenize)
    finally:
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def ches_filter(data_cfg) -> CHESFilter | None:
    """The filter `data.drop_top_ches` / `data.ches_score` ask for; None when off (share 0)."""
    made = CHESFilter(data_cfg.get("drop_top_ches", 0.0), data_cfg.get("ches_score", "length_normalized"))
    return made if made.active else None
