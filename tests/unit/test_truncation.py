"""Long prompts are cut inside their message text, never in the template: real Qwen2.5 and Llama-3 tokenizers."""

from __future__ import annotations

import pytest

from prefopt.data.batching import tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.errors import DataError
from prefopt.tokenizer import char_tokenizer

LONG = " ".join(f"word{i}" for i in range(400))  # ~800-1200 tokens with any of the tokenizers


def conversations() -> list[PreferencePair]:
    """Prompts of every shape: a plain string, a multi-turn conversation with a system message, short and long."""
    system = {"role": "system", "content": "You are a careful math tutor. " * 3}
    return [
        PreferencePair("START " + LONG + " What is 2 + 2? END", "4.", "5.", "plain-long"),
        PreferencePair("What is 2 + 2?", "4.", "5.", "plain-short"),
        PreferencePair(
            (
                system,
                {"role": "user", "content": "FIRST " + LONG},
                {"role": "assistant", "content": LONG},
                {"role": "user", "content": "LAST question: what is 3 + 5? END"},
            ),
            "8.",
            "9.",
            "multi-long",
        ),
        PreferencePair((system, {"role": "user", "content": "hi"}), "hello", "bye", "multi-short"),
    ]


def template_parts(tok, name: str) -> tuple[int | None, list[int]]:
    """The template's BOS id (None for Qwen) and the token ids of its assistant header."""
    header = (
        "<|im_start|>assistant\n" if name.startswith("qwen") else "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    return tok.bos_token_id if name.startswith("llama") else None, tok(header, add_special_tokens=False).input_ids


@pytest.mark.parametrize("mode", ["keep_end", "keep_start"])
def test_every_truncated_prompt_keeps_the_templates_bos_and_assistant_header(real_tokenizer, mode):
    name, tok = real_tokenizer
    bos, header = template_parts(tok, name)
    pairs, stats = tokenize_pairs(
        conversations(),
        tok,
        max_length=192,
        max_prompt_length=128,
        truncation=mode,
        completion_eos="<|im_end|>" if name.startswith("qwen") else "<|eot_id|>",
    )
    assert len(pairs) == 4 and stats.truncated_prompts == 2 and stats.prompt_tokens_cut > 1000
    for p in pairs:
        ids = list(p.prompt_ids)
        assert len(ids) <= 128
        if bos is None:  # Qwen: no BOS at all
            assert "<|endoftext|>" not in tok.decode(ids) and ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
        else:  # Llama-3: exactly one <|begin_of_text|>, first
            assert ids.count(bos) == 1 and ids[0] == bos
        assert ids[-len(header) :] == header, (p.pair_id, tok.decode(ids[-8:]))
    by_id = {p.pair_id: tok.decode(p.prompt_ids) for p in pairs}
    if mode == "keep_end":  # the question at the end survives; the start of the earliest turn is cut
        assert "what is 3 + 5? END" in by_id["multi-long"] and "FIRST" not in by_id["multi-long"]
        assert "What is 2 + 2? END" in by_id["plain-long"] and "START" not in by_id["plain-long"]
        assert "careful math tutor" in by_id["multi-long"]  # the system message is cut last
    else:  # the start survives; the end of the latest turns is cut
        assert "START" in by_id["plain-long"] and "END" not in by_id["plain-long"]
        assert "FIRST" in by_id["multi-long"] and "what is 3 + 5?" not in by_id["multi-long"]
    assert tok.decode(pairs[1].prompt_ids).count("What is 2 + 2?") == 1  # short prompts are untouched


def test_drop_drops_and_counts_the_long_pairs(real_tokenizer):
    name, tok = real_tokenizer
    pairs, stats = tokenize_pairs(conversations(), tok, max_length=192, max_prompt_length=128, truncation="drop")
    assert [p.pair_id for p in pairs] == ["plain-short", "multi-short"]
    assert (stats.pairs, stats.dropped_long, stats.truncated_prompts, stats.prompt_tokens_cut) == (2, 2, 0, 0)
    with pytest.raises(DataError, match=r"all 2 pairs were dropped.*data\.truncation=drop"):
        tokenize_pairs(conversations()[::2], tok, max_length=192, max_prompt_length=128, truncation="drop")


def test_completions_lose_their_end_and_are_counted(real_tokenizer):
    name, tok = real_tokenizer
    long_answer = PreferencePair("What is 2 + 2?", "4. " + LONG, "5.", "long-answer")
    (p,), stats = tokenize_pairs([long_answer], tok, max_length=96, max_prompt_length=64)
    assert len(p.prompt_ids) + len(p.chosen_ids) == 96 and tok.decode(p.chosen_ids).startswith("4. word0")
    assert stats.truncated_completions == 1 and stats.completion_tokens_cut > 500


def test_the_char_tokenizers_cut_text_not_template_either():
    for family in ("qwen", "llama3"):
        tok = char_tokenizer(family)
        bos, header = template_parts(tok, "qwen" if family == "qwen" else "llama3")
        pairs, stats = tokenize_pairs(conversations(), tok, max_length=256, max_prompt_length=200)
        assert stats.truncated_prompts == 2
        for p in pairs:
            assert len(p.prompt_ids) <= 200 and list(p.prompt_ids[-len(header) :]) == header
            assert (bos is None and tok.bos_token_id is None) or (
                p.prompt_ids.count(bos) == 1 and p.prompt_ids[0] == bos
            )


def test_a_template_longer_than_the_limit_drops_the_pair_instead_of_cutting_it(real_tokenizer):
    name, tok = real_tokenizer
    many_turns = tuple({"role": r, "content": "x"} for r in ["user", "assistant"] * 20) + (
        {"role": "user", "content": "q"},
    )
    pairs, stats = tokenize_pairs(
        [PreferencePair(many_turns, "a", "b", "t"), PreferencePair("q", "a", "b", "ok")],
        tok,
        max_length=96,
        max_prompt_length=64,
    )
    assert [p.pair_id for p in pairs] == ["ok"] and stats.dropped_long == 1
