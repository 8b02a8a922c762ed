"""Offline character-level tokenizers with the real chat templates of the target families.

The tiny CPU models use these instead of the hub tokenizers: they are real `PreTrainedTokenizerFast`
objects (chat template, special tokens, EOS, padding) built from the `tokenizers` library without any
download, so the data path that real Qwen / Llama tokenizers take is the one the tests exercise.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

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

FAMILIES = {
    # family: (special tokens, chat template, named special tokens)
    "qwen": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        QWEN_TEMPLATE,
        dict(eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None),
    ),
    "llama3": (
        ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
         "<|finetune_right_pad_id|>"],
        LLAMA3_TEMPLATE,
        dict(eos_token="<|eot_id|>", pad_token="<|finetune_right_pad_id|>", bos_token="<|begin_of_text|>"),
    ),
}

CHARS = list(string.printable[:95]) + ["\n"]  # printable ASCII from '0' to ' ', plus newline


def char_tokenizer(family: str = "qwen") -> PreTrainedTokenizerFast:
    """A character-level tokenizer for `family` ('qwen' or 'llama3'), built offline."""
    if family not in FAMILIES:
        raise ConfigError(f"model.tokenizer_family must be one of {sorted(FAMILIES)} (got {family!r})")
    specials, template, named = FAMILIES[family]
    vocab = {tok: i for i, tok in enumerate(specials + ["<unk>"] + sorted(set(CHARS)))}
    # BPE with no merges splits every word into characters; no pre-tokenizer, so spaces stay characters.
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", **{k: v for k, v in named.items() if v})
    tok.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in named.values()]})
    tok.chat_template = template
    tok.padding_side = "right"
    return tok
