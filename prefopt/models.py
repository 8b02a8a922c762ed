"""Model specs: the tiny CPU models built from a config, and real checkpoints loaded by hub id or path.

A `ModelSpec` is what a `conf/model/*.yaml` instantiates to. `load_model` and `load_tokenizer` are the one
place that turns it into a `transformers` model and tokenizer, so the tiny model saved with
`save_pretrained` and `Qwen/Qwen2.5-Math-7B` go through the same code. A GGUF file (`gguf_file`) is converted
once into such a directory (`prefopt.gguf`) and then loads like any other checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from prefopt import gguf
from prefopt.errors import ConfigError
from prefopt.tokenizer import char_tokenizer, with_chat_template

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSpec:
    """What to load: `name_or_path` (hub id or local dir), a `gguf_file`, or a tiny `arch` + `config` (random init)."""

    name_or_path: str | None = None
    gguf_file: str | None = None  # a GGUF file (path, or package:<module>/<file>), converted once (prefopt.gguf)
    gguf_cache: str = gguf.DEFAULT_CACHE  # where converted GGUF files are kept, by the file's sha256
    arch: str | None = None  # transformers model_type for from-config models, e.g. "qwen2", "llama"
    config: dict[str, Any] = field(default_factory=dict)  # from-config kwargs (and overrides for real models)
    tokenizer: str | None = None  # hub id / path; None = same as name_or_path; "char" = offline char tokenizer
    tokenizer_family: str = "qwen"  # chat format of the char tokenizer: qwen | llama3
    chat_template: str | None = None  # attach this template (a name in prefopt.tokenizer.TEMPLATES, or Jinja text)
    completion_eos: str | None = None  # token that ends a completion; None = tokenizer.eos_token
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto (bfloat16 where the device computes it, else float32)
    attn_implementation: str = "sdpa"
    gradient_checkpointing: bool = False
    revision: str | None = None
    init_seed: int = 0  # seed of the random init of from-config models
    lora: dict[str, Any] = field(default_factory=lambda: {"r": 0})  # conf/model/lora/default.yaml

    def __post_init__(self):
        if sum(x is not None for x in (self.name_or_path, self.gguf_file, self.arch)) != 1:
            raise ConfigError(
                "model: set exactly one of model.name_or_path (a checkpoint), model.gguf_file (a GGUF "
                "file) or model.arch (a tiny model)"
            )
        if self.dtype == "auto":
            self.dtype = auto_dtype()
        if self.dtype not in DTYPES:
            raise ConfigError(f"model.dtype must be one of {sorted(DTYPES) + ['auto']} (got {self.dtype!r})")
        self.lora = {
            "r": 0,
            "alpha": 32,
            "dropout": 0.0,
            "target_modules": "all-linear",
            "load_in_4bit": False,
            "merge_on_export": False,
            **dict(self.lora or {}),
        }
        if self.lora["r"] < 0:
            raise ConfigError(f"model.lora.r must be >= 0 (got {self.lora['r']})")
        if self.lora["load_in_4bit"]:
            if self.lora["r"] == 0:
                raise ConfigError("model.lora.load_in_4bit=true needs adapters: set model.lora.r > 0")
            if not torch.cuda.is_available():
                raise ConfigError("model.lora.load_in_4bit=true needs a CUDA GPU (bitsandbytes 4-bit kernels)")
            try:
                import bitsandbytes  # noqa: F401
            except ImportError:
                raise ConfigError("model.lora.load_in_4bit=true needs the bitsandbytes package") from None

    @property
    def uses_lora(self) -> bool:
        return self.lora["r"] > 0

    @property
    def identity(self) -> str:
        """A string that names these weights, for cache keys and logs."""
        if self.gguf_file:
            return f"gguf:{self.gguf_file}"
        if self.name_or_path:
            return f"{self.name_or_path}@{self.revision or 'main'}"
        cfg = ",".join(f"{k}={v}" for k, v in sorted(self.config.items()))
        return f"{self.arch}[{cfg}]seed={self.init_seed}"

    def check_available(self) -> None:
        """Fail in seconds, before any data is read, when the checkpoint cannot be found."""
        if self.gguf_file is not None:
            gguf.resolve_path(self.gguf_file)
            gguf.check_readers()
            return
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

    def converted(self) -> ModelSpec:
        """This spec reading an ordinary model directory: a GGUF file converted (once, cached), else itself."""
        if self.gguf_file is None:
            return self
        path = gguf.converted_dir(self.gguf_file, self.gguf_cache)
        return dataclasses.replace(self, name_or_path=str(path), gguf_file=None, revision=None)


def auto_dtype() -> str:
    """bfloat16 where the device computes it natively (a CUDA GPU that supports it, a CPU with bf16 instructions
    that oneDNN uses), else float32."""
    if torch.cuda.is_available():
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    try:
        native = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    except (AttributeError, RuntimeError):  # a build without the query: do not guess
        native = False
    return "bfloat16" if native else "float32"


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    spec = spec.converted()
    source = spec.tokenizer or spec.name_or_path
    tok: PreTrainedTokenizerBase
    if source in (None, "char"):
        tok = char_tokenizer(spec.tokenizer_family)
    else:
        tok = AutoTokenizer.from_pretrained(source, revision=spec.revision)
    with_chat_template(tok, spec.chat_template)
    if tok.pad_token is None:  # Llama ships without one; padding never counts (masked), any token will do
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_model(spec: ModelSpec, vocab_size: int | None = None) -> torch.nn.Module:
    """The policy (or a reference copy) as a `transformers` causal LM, in train mode."""
    spec = spec.converted()
    dtype = DTYPES[spec.dtype]
    if spec.arch is not None:
        kwargs = dict(spec.config)
        if vocab_size is not None:
            kwargs.setdefault("vocab_size", vocab_size)
        config = AutoConfig.for_model(spec.arch, **kwargs)
        config._attn_implementation = resolve_attention(spec.attn_implementation)
        with torch.random.fork_rng(devices=[]):  # the init seed is the model's own, not the run's
            torch.manual_seed(spec.init_seed)
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        spec.check_available()
        assert spec.name_or_path is not None  # no `arch`: a checkpoint (a GGUF file was converted to one above)
        extra = {}
        if spec.lora["load_in_4bit"]:
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        model = AutoModelForCausalLM.from_pretrained(
            spec.name_or_path,
            revision=spec.revision,
            dtype=dtype,
            attn_implementation=resolve_attention(spec.attn_implementation),
            **extra,
            **spec.config,
        )
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if spec.uses_lora:
        model = add_lora(model, spec)
    model.train()
    return model


def resolve_attention(choice: str) -> str:
    """`auto`: flash-attention 2 when it is installed and a GPU is there, else PyTorch's sdpa."""
    if choice != "auto":
        return choice
    try:
        import flash_attn  # noqa: F401

        return "flash_attention_2" if torch.cuda.is_available() else "sdpa"
    except ImportError:
        return "sdpa"


def add_lora(model: torch.nn.Module, spec: ModelSpec) -> torch.nn.Module:
    """Wrap `model` with peft LoRA adapters; the base weights are frozen (and may be 4-bit)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if spec.lora["load_in_4bit"]:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=spec.gradient_checkpointing)
    targets = spec.lora["target_modules"]
    config = LoraConfig(
        r=spec.lora["r"],
        lora_alpha=spec.lora["alpha"],
        lora_dropout=spec.lora["dropout"],
        target_modules=targets if isinstance(targets, str) else list(targets),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def reference_context(model: torch.nn.Module):
    """For a LoRA policy the reference is its own base: adapters switched off, no second copy in memory."""
    return model.disable_adapter


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    """A frozen reference: eval mode (no dropout), no parameter asks for a gradient."""
    model.eval()
    model.requires_grad_(False)
    return model
