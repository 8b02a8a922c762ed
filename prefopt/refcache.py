"""Reference log-probs computed once, kept on disk, shared by every run that has the same inputs.

Every loss with a reference compares the policy with the *initial* policy (a frozen copy, or the LoRA base
with adapters off). The reference's summed completion log-probs and token counts over the train and eval
pairs depend only on its weights, the tokenizer, the tokenized pairs and the numeric set-up, so a sweep over
losses and β computes them in one no-grad pass and every run loads them: no reference model in memory and no
reference forward per step. `python -m prefopt.reference [overrides]` builds the cache as its own job. For the
held-out pairs it also keeps every completion token's log-prob (`TOKEN_TENSORS`), which the evaluation's
token-level displacement reads (`prefopt.displacement`).

The file name is the sha256 of everything that determines the values (see `cache_header`), so a cache made
for other weights, tokenizer, data, template, lengths or precision cannot be picked up; a file whose header
or checksum does not match (a killed writer, a disk error) is reported and rebuilt. Files are written to a
temporary name and renamed, so concurrent sweep jobs never read half a file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import torch
from safetensors.torch import save_file

from prefopt.data.batching import TokenizedPair, collate, micro_batches
from prefopt.errors import ConfigError, TrainingError
from prefopt.io import atomic_target, cache_key
from prefopt.logprobs import PairLogpsModel, autocast_dtype, packing_layout
from prefopt.losses import PairLogps
from prefopt.losses.base import FIELD_GROUPS
from prefopt.reference_providers import ReferenceProvider

log = logging.getLogger("prefopt")

DEFAULT_DIR = "outputs/cache/reference"
FORMAT = 1  # bump when the meaning of the stored values changes
# The held-out pairs' per-token log-probs (the evaluation's displacement), flat in pair order. Added to a file
# beside its sums: a file without them keeps its key and is completed on load (see `build`).
TOKEN_TENSORS = ("eval_chosen_token_logps", "eval_rejected_token_logps")


def _columns(fields: Sequence[str]) -> list[str]:
    """The stored columns: the four sums, then the two of each optional field group a loss needs (sorted)."""
    return ["chosen", "rejected", "chosen_tokens", "rejected_tokens"] + [
        name for group in sorted(fields) for name in FIELD_GROUPS[group]
    ]


def cache_dir(setting: str | None, loss) -> Path | None:
    """The `reference_cache` setting as a directory (None: no cache); refuses it for a reference-free loss."""
    if setting in (None, "", False, "null", "none"):
        return None
    if not loss.reference:
        raise ConfigError(
            f"reference_cache={setting}: loss {loss.key!r} is reference-free (reference: false), "
            f"so it has no reference log-probs to cache; drop reference_cache (or set it to null)"
        )
    return Path(DEFAULT_DIR if setting == "auto" else str(setting)).expanduser()


# -- the key ------------------------------------------------------------------------------------------------
def _sha256(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def pairs_digest(pairs: Sequence[TokenizedPair]) -> str:
    """A hash of the tokenized pairs, in order: ids and every token id."""
    h = hashlib.sha256()
    for p in pairs:
        h.update(json.dumps([p.pair_id, p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def _local_files(path: str | None) -> list | None:
    """Name, size and mtime of a local checkpoint's files: rewritten weights at the same path change the key."""
    if not path or not Path(path).expanduser().is_dir():
        return None
    root = Path(path).expanduser()
    return sorted(
        [str(f.relative_to(root)), f.stat().st_size, f.stat().st_mtime_ns] for f in root.rglob("*") if f.is_file()
    )


def cache_header(
    *,
    spec,
    model: torch.nn.Module,
    tokenizer,
    data_fingerprint: str,
    tokenize: dict[str, Any],
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    autocast: str | None = None,
    fields: Sequence[str] = (),
) -> dict[str, Any]:
    """Everything the reference log-probs depend on; `cache_key` hashes it into the file name.

    `fields`: the optional `PairLogps` field groups stored beside the four sums (a loss's `needs`); absent
    from the header when there are none, so the caches of the other losses keep their keys."""
    config = getattr(model, "config", None)
    header = {
        "format": FORMAT,
        "reference": {  # the initial policy (LoRA: its base, adapters off)
            "identity": spec.identity,
            "config": dict(spec.config),
            "dtype": spec.dtype,
            "attn_implementation": getattr(config, "_attn_implementation", spec.attn_implementation),
            "load_in_4bit": bool(spec.lora.get("load_in_4bit")) if hasattr(spec, "lora") else False,
            "vocab_size": int(cast(Any, model).get_output_embeddings().weight.shape[0]),
            "local_files": _local_files(spec.name_or_path),
        },
        "tokenizer": {
            "name": spec.tokenizer or spec.name_or_path,
            "family": spec.tokenizer_family,
            "size": len(tokenizer),
            "chat_template": _sha256(str(getattr(tokenizer, "chat_template", None) or "")),
            "eos": tokenizer.eos_token,
            "completion_eos": spec.completion_eos,
        },
        "data": {
            "source": data_fingerprint,
            "train": pairs_digest(train_pairs),
            "eval": pairs_digest(eval_pairs),
            "train_pairs": len(train_pairs),
            "eval_pairs": len(eval_pairs),
        },
        "tokenize": dict(tokenize),  # template on/off, system prompt, max lengths (truncation is keep-prompt-end)
        "numerics": {"autocast": autocast},
    }
    if fields:
        header["fields"] = sorted(fields)
    return header


def reference_key(header: dict[str, Any]) -> str:
    return cache_key(header, length=64)


# -- the values ---------------------------------------------------------------------------------------------
class ReferenceCache(ReferenceProvider):
    """Reference `PairLogps` of known pairs: `cache(pairs)` returns them for a micro-batch, on `device`; as the
    Trainer's reference provider it needs no model."""

    def __init__(
        self,
        pairs: Sequence[TokenizedPair],
        values: torch.Tensor,
        key: str,
        path: Path | None,
        device: torch.device | str = "cpu",
        fields: Sequence[str] = (),
        token_logps: dict[TokenizedPair, tuple[torch.Tensor, torch.Tensor]] | None = None,
    ):
        self.columns = _columns(fields)
        if values.shape != (len(pairs), len(self.columns)):
            raise ValueError(f"reference values of shape {tuple(values.shape)} for {len(pairs)} pairs")
        self.index = {p: i for i, p in enumerate(pairs)}  # by value: equal pairs have equal reference values
        self.values = values.to(device)
        self.key, self.path = key, path
        # the held-out pairs' per-token log-probs (chosen, rejected): the evaluation's displacement reads them
        self.token_logps = token_logps or {}

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, pairs: Sequence[TokenizedPair]) -> PairLogps:
        try:
            idx = [self.index[p] for p in pairs]
        except KeyError as exc:
            raise TrainingError(f"pair {exc.args[0].pair_id!r} is not in the reference cache {self.path}") from None
        v = self.values[torch.tensor(idx, device=self.values.device)]
        return PairLogps(**{name: v[:, i] for i, name in enumerate(self.columns)})

    def logps(self, batch, pairs: Sequence[TokenizedPair], per_token: bool = False) -> PairLogps:
        lp = self(pairs)
        if per_token:
            lp.chosen_token_logps, lp.rejected_token_logps = self.tokens(pairs)
        return lp

    def tokens(self, pairs: Sequence[TokenizedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored per-token log-probs of held-out `pairs`, (B, T) each, zeros past a completion's end."""
        try:
            rows = [self.token_logps[p] for p in pairs]
        except KeyError as exc:
            raise TrainingError(
                f"pair {exc.args[0].pair_id!r} has no per-token values in the reference cache {self.path} "
                f"(only the held-out pairs have)"
            ) from None
        width = max((len(t) for row in rows for t in row), default=0)
        out = torch.zeros((2, len(rows), width), dtype=torch.float32, device=self.values.device)
        for i, row in enumerate(rows):
            for side, t in enumerate(row):
                out[side, i, : len(t)] = t
        return out[0], out[1]


@torch.no_grad()
def compute_values(
    logps: Callable,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    micro_batch_size: int,
    packing: bool | str | None,
    device: torch.device,
    fields: Sequence[str] = (),
) -> torch.Tensor:
    """(N, 4 + 2·fields) float32: chosen, rejected, chosen tokens, rejected tokens (then the field groups'
    columns, see `_columns`), by the engine's own log-prob path."""
    out, columns = [], _columns(fields)
    for micro in micro_batches(list(pairs), micro_batch_size):
        lp = logps(collate(micro, pad_id, packing=packing).to(device))
        out.append(torch.stack([getattr(lp, c) for c in columns], dim=1).float().cpu())
    return torch.cat(out) if out else torch.zeros(0, len(columns))


@torch.no_grad()
def compute_token_values(
    logps: Callable,
    pairs: Sequence[TokenizedPair],
    pad_id: int,
    micro_batch_size: int,
    packing: bool | str | None,
    device: torch.device,
    fields: Sequence[str] = (),
) -> dict[str, torch.Tensor]:
    """The held-out pairs' values from one pass: "eval" as `compute_values`, and every completion token's
    log-prob (`TOKEN_TENSORS`: chosen, rejected), flat, pair after pair in completion order."""
    out, columns = [], _columns(fields)
    chosen: list[torch.Tensor] = []
    rejected: list[torch.Tensor] = []
    for micro in micro_batches(list(pairs), micro_batch_size):
        lp = logps(collate(micro, pad_id, packing=packing).to(device), per_token=True)
        out.append(torch.stack([getattr(lp, c) for c in columns], dim=1).float().cpu())
        for flat, values, counts in (
            (chosen, lp.chosen_token_logps, lp.chosen_tokens),
            (rejected, lp.rejected_token_logps, lp.rejected_tokens),
        ):
            keep = torch.arange(values.shape[1], device=values.device)[None, :] < counts.long()[:, None]
            flat.append(values[keep].float().cpu())
    return {
        "eval": torch.cat(out) if out else torch.zeros(0, len(columns)),
        TOKEN_TENSORS[0]: torch.cat(chosen) if chosen else torch.zeros(0),
        TOKEN_TENSORS[1]: torch.cat(rejected) if rejected else torch.zeros(0),
    }


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def save(path: Path, key: str, header: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write to a temporary file in the same directory, then rename: readers see a whole file or none."""
    meta = {"key": key, "header": json.dumps(header, sort_keys=True, default=str), "sha256": _checksum(tensors)}
    with atomic_target(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)


def load(path: Path, key: str, sizes: dict[str, int], width: int = 4) -> dict[str, torch.Tensor] | None:
    """The stored tensors, or None when the file is missing; a damaged or mismatching file is None too (logged)."""
    if not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        problem = None
        if meta.get("key") != key:
            problem = "its key does not match its name"
        elif sorted(set(tensors) - set(TOKEN_TENSORS)) != sorted(sizes) or any(
            tensors[k].shape != (n, width) for k, n in sizes.items()
        ):
            problem = f"it holds { ({k: tuple(v.shape) for k, v in tensors.items()}) }, expected {sizes} pairs"
        elif any(k in tensors for k in TOKEN_TENSORS) and not _tokens_fit(tensors):
            problem = "its per-token values do not match its token counts"
        elif meta.get("sha256") != _checksum(tensors):
            problem = "its checksum does not match"
    except Exception as exc:  # noqa: BLE001 - a truncated or garbled file raises all sorts of errors
        problem = f"it cannot be read ({type(exc).__name__}: {str(exc)[:120]})"
    if problem:
        log.warning("reference log-probs: cache file %s is damaged (%s); rebuilding it", path, problem)
        return None
    return tensors


def _tokens_fit(tensors: dict[str, torch.Tensor]) -> bool:
    """Both per-token tensors, each as long as the held-out pairs' completions together."""
    counts = tensors["eval"][:, 2:4].sum(0).long().tolist()
    return all(k in tensors and tensors[k].shape == (n,) for k, n in zip(TOKEN_TENSORS, counts))


def build(
    *,
    directory: Path,
    header: dict,
    logps: Callable,
    model: torch.nn.Module,
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    pad_id: int,
    micro_batch_size: int,
    packing: bool | str | None,
    device: torch.device,
    is_main: bool = True,
) -> ReferenceCache:
    """Load the cache for `header`, or compute it with `logps` (no grad, `model` in eval mode) and store it.

    A file written before the held-out pairs' per-token values were kept is completed (one pass over the
    held-out pairs) and rewritten under the same key: its sums stay as they are."""
    key = reference_key(header)
    path = directory / f"{key}.safetensors"
    sizes = {"train": len(train_pairs), "eval": len(eval_pairs)}
    fields = header.get("fields", ())
    tensors = load(path, key, sizes, len(_columns(fields)))
    compute = lambda what, pairs: _no_grad_pass(  # noqa: E731
        model, what, logps, pairs, pad_id, micro_batch_size, packing, device, fields
    )
    t0 = time.perf_counter()
    if tensors is not None:
        log.info(
            "reference log-probs: loaded %d pairs from cache %s (key %s); no reference model",
            sum(sizes.values()),
            path,
            key[:16],
        )
        if TOKEN_TENSORS[0] not in tensors:  # an older file: the sums only
            tensors.update({k: v for k, v in compute("tokens", eval_pairs).items() if k in TOKEN_TENSORS})
            if is_main:
                save(path, key, header, tensors)
            log.info("reference log-probs: added the held-out pairs' per-token values to %s", path)
    else:
        tensors = {"train": compute("values", train_pairs)["train"], **compute("tokens", eval_pairs)}
        if is_main:  # every rank computes the same values; one writes them
            save(path, key, header, tensors)
        log.info(
            "reference log-probs: computed %d pairs in %.1f s (cache key %s) -> %s",
            sum(sizes.values()),
            time.perf_counter() - t0,
            key[:16],
            path,
        )
    pairs = list(train_pairs) + list(eval_pairs)
    values = torch.cat([tensors["train"], tensors["eval"]]) if pairs else torch.zeros(0, len(_columns(fields)))
    return ReferenceCache(pairs, values, key, path, device, fields, split_tokens(eval_pairs, tensors))


def _no_grad_pass(model, what: str, logps, pairs, pad_id, micro_batch_size, packing, device, fields) -> dict:
    """`compute_values` ("values": {"train": ...}) or `compute_token_values` ("tokens"), `model` in eval mode."""
    was_training = model.training
    model.eval()
    try:
        if what == "values":
            return {"train": compute_values(logps, pairs, pad_id, micro_batch_size, packing, device, fields)}
        return compute_token_values(logps, pairs, pad_id, micro_batch_size, packing, device, fields)
    finally:
        model.train(was_training)


def split_tokens(
    eval_pairs: Sequence[TokenizedPair], tensors: dict[str, torch.Tensor]
) -> dict[TokenizedPair, tuple[torch.Tensor, torch.Tensor]]:
    """The stored flat per-token values cut into each held-out pair's (chosen, rejected) by its token counts."""
    counts = tensors["eval"][:, 2:4].long()
    chosen = torch.split(tensors[TOKEN_TENSORS[0]], counts[:, 0].tolist())
    rejected = torch.split(tensors[TOKEN_TENSORS[1]], counts[:, 1].tolist())
    return {p: (c, r) for p, c, r in zip(eval_pairs, chosen, rejected)}


def reference_cache(
    directory: Path,
    *,
    spec,
    policy: torch.nn.Module,
    tokenizer,
    data,
    tokenize: dict[str, Any],
    train_pairs: Sequence[TokenizedPair],
    eval_pairs: Sequence[TokenizedPair],
    train_cfg,
    hardware,
    fields: Sequence[str] = (),
) -> ReferenceCache:
    """The run's reference cache, built from the initial `policy` (before any checkpoint is loaded into it).

    The reference *is* the initial policy, so no second model is needed: the pass runs on the policy itself
    in eval mode without gradients (LoRA: with its adapters switched off, i.e. its base).
    """
    autocast = autocast_dtype(hardware)  # the same arithmetic as a live reference of this run
    header = cache_header(
        spec=spec,
        model=policy,
        tokenizer=tokenizer,
        data_fingerprint=data.fingerprint(),
        tokenize=tokenize,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        autocast=str(autocast) if autocast else None,
        fields=fields,
    )
    logps_model = PairLogpsModel(policy, train_cfg.chunk_elements, autocast, fields=fields)

    def logps(batch, per_token: bool = False):
        if getattr(spec, "uses_lora", False):
            with cast(Any, policy).disable_adapter():
                return logps_model(batch, per_token)
        return logps_model(batch, per_token)

    packing = packing_layout(getattr(train_cfg, "packing", False), policy)
    return build(
        directory=directory,
        header=header,
        logps=logps,
        model=policy,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        pad_id=tokenizer.pad_token_id,
        micro_batch_size=train_cfg.micro_batch_size,
        packing=packing,
        device=hardware.torch_device,
        is_main=hardware.is_main,
    )
