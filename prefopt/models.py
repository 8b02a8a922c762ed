"""Model specs: the tiny CPU models built from a config, and real checkpoints loaded by hub id or path.

A `ModelSpec` is what a `conf/model/*.yaml` instantiates to. `load_model` and `load_tokenizer` are the one
place that turns it into a `transformers` model and tokenizer, so the tiny model saved with
`save_pretrained` and `Qwen/Qwen2.5-Math-7B` go through the same code.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from prefopt.errors import ConfigError
from prefopt.tokenizer import char_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """What to load: either `name_or_path` (hub id or local dir) or a tiny `arch` + `config` with random init."""

    name_or_path: str | None = None
    arch: str | None = None  # transformers model_type for from-config models, e.g. "qwen2", "llama"
    config: dict[str, Any] = field(default_factory=dict)  # from-config kwargs (and overrides for real models)
    tokenizer: str | None = None  # hub id / path; None = same as name_or_path; "char" = offline char tokenizer
    tokenizer_family: str = "qwen"  # chat format of the char tokenizer: qwen | llama3
    completion_eos: str | None = None  # token that ends a completion; None = tokenizer.eos_token
    dtype: str = "float32"
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    revision: str | None = None
    init_seed: int = 0  # seed of the random init of from-config models

    def __post_init__(self):
        if (self.name_or_path is None) == (self.arch is None):
            raise ConfigError("model: set exactly one of model.name_or_path (a checkpoint) or model.arch (a tiny model)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {sorted(DTYPES)} (got {self.dtype!r})")

    @property
    def identity(self) -> str:
        """A string that names these weights, for cache keys and logs."""
        if self.name_or_path:
            return f"{self.name_or_path}@{self.revision or 'main'}"
        cfg = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.arch}[{cfg}]seed={self.init_seed}"

    def check_available(self) -> None:
        """Fail in seconds, before any data is read, when the checkpoint cannot be found."""
        if self.name_or_path is None or Path(self.name_or_path).is_dir():
            return
        if Path(self.name_or_path).exists() or self.name_or_path.startswith(("/", "./", "../", "~")):
            raise ConfigError(f"model.name_or_path={self.name_or_path!r}: not a directory with a saved model")
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(self.name_or_path, "config.json", revision=self.revision), str):
            return
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        reason = "HF_HUB_OFFLINE is set" if offline else None
        if not offline:
            try:  # one short metadata request: is the hub reachable from here?
                from huggingface_hub import model_info

                model_info(self.name_or_path, revision=self.revision, timeout=10)
                return
            except Exception as exc:  # noqa: BLE001 - any failure means "cannot download"
                reason = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        raise ConfigError(
            f"model {self.name_or_path!r} is not in the local Hugging Face cache and cannot be downloaded "
            f"({reason}); download it where the hub is reachable (huggingface-cli download {self.name_or_path} "
            f"--local-dir DIR) and run with model.name_or_path=DIR"
        )


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    source = spec.tokenizer or spec.name_or_path
    if source in (None, "char"):
        tok = char_tokenizer(spec.tokenizer_family)
    else:
        tok = AutoTokenizer.from_pretrained(source, revision=spec.revision)
    if tok.pad_token is None:  # Llama ships without one; padding never counts (masked), any token will do
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(spec: ModelSpec, vocab_size: int | None = None) -> torch.nn.Module:
    """The policy (or a reference copy) as a `transformers` causal LM, in train mode."""
    dtype = DTYPES[spec.dtype]
    if spec.arch is not None:
        kwargs = dict(spec.config)
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(spec.arch, **kwargs)
        config._attn_implementation = spec.attn_implementation
        with torch.random.fork_rng(devices=[]):  # the init seed is the model's own, not the run's
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        spec.check_available()
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path, revision=spec.revision, dtype=dtype,
            attn_implementation=spec.attn_implementation, **spec.config,
        )
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    model.train()
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference: eval mode (no dropout), no parameter asks for a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model
