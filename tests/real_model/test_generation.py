"""Prompts and greedy answers through prefopt on SmolLM2-135M-Instruct: those of its chat template and
`model.generate`."""

from __future__ import annotations

import pytest
import torch

from prefopt.data.batching import render_prompt, tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.generate import GenerationConfig, HFGenerator

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
PROBLEMS = ["What is 3 + 4?", "What is 12 + 9?", "Name a fruit."]


def test_prompts_render_byte_for_byte_as_the_chat_template(smol):
    _, tok = smol
    for problem in PROBLEMS:
        messages = [{"role": "user", "content": problem}]
        theirs = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ours = render_prompt(tok, problem, True, None)
        assert ours == theirs and f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" in ours  # the default system message
        pairs, _ = tokenize_pairs([PreferencePair(problem, "x", "y", "p")], tok, max_length=128, max_prompt_length=96)
        assert (
            list(pairs[0].prompt_ids)
            == tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
                "input_ids"
            ]
        )
    own = "Answer briefly."
    assert render_prompt(tok, PROBLEMS[0], True, own) == tok.apply_chat_template(
        [{"role": "system", "content": own}, {"role": "user", "content": PROBLEMS[0]}],
        add_generation_prompt=True,
        tokenize=False,
    )


def test_greedy_generation_equals_model_generate(smol):
    model, tok = smol
    prompts = [render_prompt(tok, p, True, None) for p in PROBLEMS]
    ours = HFGenerator(model, tok, GenerationConfig(max_new_tokens=24), completion_eos="<|im_end|>").generate(prompts)
    stop = tok.convert_tokens_to_ids("<|im_end|>")
    for prompt, text in zip(prompts, ours.texts):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=24, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id
            )
        assert text == [tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)]
        assert text[0].strip()  # the real model answers something
