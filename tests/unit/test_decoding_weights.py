"""prefopt.generate.decoding_weights: frozen weights decode as trainable ones on CPU, and stay frozen afterwards."""

from __future__ import annotations

import torch

from prefopt.generate import GenerationConfig, HFGenerator, decoding_weights
from prefopt.models import ModelSpec, load_model, load_tokenizer
from tests.helpers.config import TINY_SPEC


def tiny():
    spec = ModelSpec(**TINY_SPEC)
    tokenizer = load_tokenizer(spec)
    return load_model(spec, vocab_size=len(tokenizer)), tokenizer


def test_flags_are_lifted_inside_and_restored_after_even_on_error():
    model, _ = tiny()
    model.requires_grad_(False)
    first = next(model.parameters())
    first.requires_grad_(True)  # one trainable weight (a LoRA adapter) stays trainable
    try:
        with decoding_weights(model, torch.device("cpu")):
            assert all(p.requires_grad for p in model.parameters())
            raise RuntimeError("generation failed")
    except RuntimeError:
        pass
    assert first.requires_grad
    assert not any(p.requires_grad for p in list(model.parameters())[1:])


def test_generation_with_frozen_weights_gives_the_same_tokens_and_no_gradients():
    model, tokenizer = tiny()
    generator = HFGenerator(model, tokenizer, GenerationConfig(max_new_tokens=6))
    prompts = ["1+2=", "30+4="]
    trainable = generator.generate(prompts)
    model.requires_grad_(False)
    frozen = generator.generate(prompts)
    assert frozen.token_ids == trainable.token_ids
    assert not any(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())
