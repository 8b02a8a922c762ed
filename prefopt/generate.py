"""Completions from a policy: batched Hugging Face `generate` (left padding), or vLLM on a GPU when installed.

Both backends take rendered prompt texts (chat template already applied) and return, per prompt, `n`
completion texts with special tokens removed. Greedy decoding is `temperature=0` with `n=1`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch

from prefopt.errors import ConfigError

log = logging.getLogger(__name__)

BACKENDS = ("auto", "hf", "vllm")


@dataclass
class GenerationConfig:
    """How completions are produced (`generation:` in conf/mathloop.yaml)."""

    backend: str = "auto"  # auto: vLLM when it is installed and a GPU is visible, else hf
    batch_size: int = 1024  # sequences (prompts x samples) per HF `generate` call; vLLM batches itself
    max_new_tokens: int = 64
    top_p: float = 1.0
    vllm_gpu_memory_utilization: float = 0.5
    stop_tokens: tuple[str, ...] = ()  # more tokens that end a completion (those the tokenizer lacks are skipped)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ConfigError(f"generation.backend must be one of {', '.join(BACKENDS)} (got {self.backend!r})")
        if self.batch_size < 1:
            raise ConfigError(f"generation.batch_size must be >= 1 (got {self.batch_size})")
        if self.max_new_tokens < 1:
            raise ConfigError(f"generation.max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generation.top_p must be in (0, 1] (got {self.top_p})")
        if isinstance(self.stop_tokens, str) or not all(isinstance(t, str) for t in self.stop_tokens):
            raise ConfigError(f"generation.stop_tokens must be a list of token strings (got {self.stop_tokens!r})")
        self.stop_tokens = tuple(self.stop_tokens)


@dataclass
class Completions:
    """`texts[i]` are prompt i's samples; `finished[i][j]` says sample j ended with a stop token; `token_ids[i][j]`
    are sample j's generated token ids up to and including its stop token (None where a generator gives none)."""

    texts: list[list[str]]
    finished: list[list[bool]]
    token_ids: list[list[list[int]]] | None = None

    @property
    def unfinished(self) -> int:
        return sum(not f for row in self.finished for f in row)


def stop_token_ids(tokenizer, completion_eos: str | None, extra: Sequence[str] = ()) -> list[int]:
    """The tokens that end a completion: the model's completion EOS (e.g. <|im_end|>), the tokenizer's EOS and
    `extra` (generation.stop_tokens), each where the tokenizer has it as one token."""
    ids = []
    for token in (completion_eos, tokenizer.eos_token, *extra):
        if token is not None:
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is not None and tid != tokenizer.unk_token_id and tid not in ids:
                ids.append(tid)
    if not ids:
        raise ConfigError("the tokenizer has no EOS token to stop generation at (set model.completion_eos)")
    return ids


def _until_stop(row: list[int], stop_ids: Sequence[int]) -> list[int]:
    """A generated row up to and including its first stop token (what follows it is padding)."""
    for i, token in enumerate(row):
        if token in stop_ids:
            return row[: i + 1]
    return row


@contextmanager
def decoding_weights(model: torch.nn.Module, device: torch.device) -> Iterator[None]:
    """On CPU, decode with every weight flagged trainable (no gradient is taken: generation runs under no_grad).

    torch's CPU matmuls for one-token decoding steps take ~2× as long on bfloat16 weights that do not require
    grad (a frozen reference, a LoRA policy's base): 100 greedy answers from SmolLM2-135M in 14 s instead of 6 s,
    most of it page faults (scripts/decode_speed.py). The flags are restored afterwards."""
    frozen = [p for p in model.parameters() if not p.requires_grad] if device.type == "cpu" else []
    for p in frozen:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(False)


class HFGenerator:
    """Batched `model.generate` with left padding; works for any causal LM prefopt can load, on any device."""

    def __init__(self, model: torch.nn.Module, tokenizer, config: GenerationConfig, completion_eos: str | None = None):
        self.model, self.tokenizer, self.cfg = model, tokenizer, config
        self.stop_ids = stop_token_ids(tokenizer, completion_eos, config.stop_tokens)

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, seed: int = 0) -> Completions:
        if n < 1:
            raise ConfigError(f"number of samples per prompt must be >= 1 (got {n})")
        if temperature <= 0 and n > 1:
            raise ConfigError("greedy decoding (temperature 0) gives one completion per prompt; n must be 1")
        model, tok = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        side, tok.padding_side = tok.padding_side, "left"  # new tokens follow every prompt's last token
        device = next(model.parameters()).device
        sample = temperature > 0
        kwargs = dict(
            max_new_tokens=self.cfg.max_new_tokens,
            do_sample=sample,
            eos_token_id=self.stop_ids,
            pad_token_id=tok.pad_token_id,
            num_return_sequences=n,
        )
        if sample:
            kwargs.update(temperature=float(temperature), top_p=self.cfg.top_p, top_k=0)
        texts, finished, ids = [], [], []
        try:
            with (
                decoding_weights(model, device),
                torch.random.fork_rng(devices=[device] if device.type == "cuda" else []),
            ):
                torch.manual_seed(seed)
                per_call = max(1, self.cfg.batch_size // n)  # memory grows with sequences, not prompts
                for start in range(0, len(prompts), per_call):
                    chunk = list(prompts[start : start + per_call])
                    enc = tok(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                    out = cast(Any, model).generate(**enc, **kwargs)  # torch types a module attribute as a Tensor
                    new = out[:, enc.input_ids.shape[1] :].cpu()
                    ended = torch.isin(new, torch.tensor(self.stop_ids)).any(dim=1).tolist()
                    decoded = tok.batch_decode(new, skip_special_tokens=True)
                    cut = [_until_stop(row, self.stop_ids) for row in new.tolist()]
                    for i in range(len(chunk)):
                        texts.append(decoded[i * n : (i + 1) * n])
                        finished.append(ended[i * n : (i + 1) * n])
                        ids.append(cut[i * n : (i + 1) * n])
        finally:
            tok.padding_side = side
            model.train(was_training)
        return Completions(texts, finished, ids)


class VLLMGenerator:
    """vLLM's offline engine on a saved policy directory or hub id (GPU only)."""

    def __init__(
        self,
        model_path: str,
        tokenizer,
        config: GenerationConfig,
        completion_eos: str | None = None,
        dtype: str = "bfloat16",
        seed: int = 0,
    ):
        from vllm import LLM

        self.cfg, self.tokenizer = config, tokenizer
        self.stop_ids = stop_token_ids(tokenizer, completion_eos, config.stop_tokens)
        self.llm = LLM(
            model=str(model_path), dtype=dtype, seed=seed, gpu_memory_utilization=config.vllm_gpu_memory_utilization
        )

    def generate(self, prompts: Sequence[str], n: int = 1, temperature: float = 0.0, seed: int = 0) -> Completions:
        from vllm import SamplingParams

        params = SamplingParams(
            n=n,
            temperature=float(temperature),
            top_p=self.cfg.top_p if temperature > 0 else 1.0,
            max_tokens=self.cfg.max_new_tokens,
            seed=seed,
            stop_token_ids=self.stop_ids,
            skip_special_tokens=True,
        )
        # Token ids, not text: the rendered chat template already holds any BOS, and vLLM would add another.
        ids = [{"prompt_token_ids": self.tokenizer(p, add_special_tokens=False).input_ids} for p in prompts]
        outputs = self.llm.generate(ids, params, use_tqdm=False)
        texts = [[c.text for c in o.outputs] for o in outputs]
        finished = [[c.finish_reason == "stop" for c in o.outputs] for o in outputs]
        return Completions(texts, finished, [[list(c.token_ids) for c in o.outputs] for o in outputs])


def vllm_usable() -> bool:
    return importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


def choose_backend(config: GenerationConfig, saved_path: str | None) -> str:
    """`hf` or `vllm`: vLLM needs the package, a GPU and weights on disk (or a hub id) to load from."""
    if config.backend == "vllm":
        if not vllm_usable():
            raise ConfigError(
                "generation.backend=vllm but vLLM is not installed or no GPU is visible (use generation.backend=hf)"
            )
        if saved_path is None:
            raise ConfigError("generation.backend=vllm needs the policy saved on disk (set policy=DIR)")
        return "vllm"
    if config.backend == "auto" and saved_path is not None and vllm_usable():
        return "vllm"
    return "hf"
