"""The BOS rule: a prompt carries the BOS tokens its chat template writes, no more (real tokenizers).

Llama-3's template writes <|begin_of_text|> once at the start; SmolLM2's ChatML uses its BOS token <|im_start|> as
the delimiter of every message; Qwen2.5 has no BOS. A BOS the template did not write (doubled at the start by a
tokenizer adding its own, or inside a message's text) is refused, naming the pair.
"""

from __future__ import annotations

import pytest

from prefopt.data.batching import tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.errors import DataError
from prefopt.tokenizer import packaged_tokenizer

SMOL_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
TURNS = (
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello"},
    {"role": "user", "content": "What is 2 + 2?"},
)


def test_smollm2_prompts_keep_one_bos_per_message_as_its_template_writes(smollm2_tokenizer):
    tok = smollm2_tokenizer
    assert tok.bos_token == "<|im_start|>"
    pairs, _ = tokenize_pairs(
        [PreferencePair("What is 2 + 2?", "4", "5", "plain"), PreferencePair(TURNS, "4", "5", "turns")],
        tok,
        max_length=256,
        max_prompt_length=192,
        completion_eos="<|im_end|>",
    )
    plain, turns = (list(p.prompt_ids) for p in pairs)
    # system (the template's default), user, assistant header: three; four messages and the header: five
    assert plain.count(tok.bos_token_id) == 3 and turns.count(tok.bos_token_id) == 5
    assert plain[0] == tok.bos_token_id and SMOL_SYSTEM in tok.decode(plain)
    expected = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 2?"}], add_generation_prompt=True, tokenize=False
    )
    assert tok.decode(plain) == expected
    assert pairs[0].chosen_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_smollm2_refuses_a_bos_inside_a_message(smollm2_tokenizer):
    with pytest.raises(
        DataError,
        match=r"pair bad: the prompt has 4 BOS tokens \(<\|im_start\|>\) where its chat "
        r"template writes 3",
    ):
        tokenize_pairs(
            [PreferencePair("<|im_start|>What is 2 + 2?", "4", "5", "bad")],
            smollm2_tokenizer,
            max_length=256,
            max_prompt_length=192,
        )


def test_the_real_tokenizers_keep_their_templates_bos(real_tokenizer):
    name, tok = real_tokenizer
    pairs, _ = tokenize_pairs([PreferencePair(TURNS, "4", "5", "turns")], tok, max_length=256, max_prompt_length=192)
    ids = list(pairs[0].prompt_ids)
    if name == "llama3":  # one <|begin_of_text|>, first, however many messages
        assert tok.bos_token_id is not None and ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
    else:
        assert tok.bos_token_id is None


def test_llama3_refuses_a_doubled_bos_at_the_start_and_one_inside_a_message():
    tok = packaged_tokenizer("llama3")
    # without a template the tokenizer adds <|begin_of_text|>; a text that starts with one doubles it
    raw = dict(max_length=128, max_prompt_length=64, chat_template=False)
    pairs, _ = tokenize_pairs([PreferencePair("What is 2 + 2?", "4", "5", "ok")], tok, **raw)
    assert list(pairs[0].prompt_ids[:2]) == [tok.bos_token_id, tok("What", add_special_tokens=False).input_ids[0]]
    with pytest.raises(
        DataError,
        match=r"pair doubled: the prompt has 2 BOS tokens \(<\|begin_of_text\|>\) where "
        r"its tokenizer writes 1",
    ):
        tokenize_pairs([PreferencePair("<|begin_of_text|>What is 2 + 2?", "4", "5", "doubled")], tok, **raw)
    with pytest.raises(
        DataError, match=r"pair inside: the prompt has 2 BOS tokens .* where its chat template writes 1"
    ):
        tokenize_pairs(
            [PreferencePair("<|begin_of_text|>What is 2 + 2?", "4", "5", "inside")],
            tok,
            max_length=128,
            max_prompt_length=64,
        )
