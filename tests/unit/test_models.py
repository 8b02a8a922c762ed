"""Real checkpoints by path go through the same loader as the tiny models; chat formats and BOS handling."""

from __future__ import annotations

import json

import pytest

from prefopt.data.batching import tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.errors import ConfigError, DataError
from prefopt.models import ModelSpec, load_model, load_tokenizer

TINY = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)


@pytest.fixture(scope="module", params=[("qwen2", "qwen"), ("llama", "llama3")])
def saved(request, tmp_path_factory):
    """A tiny model and tokenizer saved with save_pretrained: a stand-in for a downloaded hub checkpoint."""
    arch, family = request.param
    spec = ModelSpec(arch=arch, config=TINY, tokenizer="char", tokenizer_family=family)
    path = tmp_path_factory.mktemp(arch)
    load_model(spec).save_pretrained(path)
    load_tokenizer(spec).save_pretrained(path)
    return path, family


def test_a_saved_checkpoint_loads_and_trains_through_the_real_preset(saved, tiny_run, tmp_path):
    path, family = saved
    preset = "qwen_math" if family == "qwen" else "llama3_8b"
    summary, run_dir = tiny_run(
        f"model={preset}",
        f"model.name_or_path={path}",
        "model.dtype=float32",
        "model.attn_implementation=sdpa",
        "model.gradient_checkpointing=false",
        "steps=2",
        # the preset's recipe (conf/recipe/) runs on a GPU over a 4-bit base, by epochs
        "hardware=cpu",
        "model.lora.load_in_4bit=false",
        "epochs=null",
        "data=arith",  # the preset chooses the paper's pair file; the tiny pairs here
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "complete"
    first = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["train/loss"] == pytest.approx(0.6931471805599453, abs=1e-6)


def test_llama_prompts_carry_exactly_one_bos_and_qwen_none(saved):
    path, family = saved
    tok = load_tokenizer(ModelSpec(name_or_path=str(path)))
    pairs, _ = tokenize_pairs(
        [PreferencePair("What is 2 + 2?", "4", "5", "p0")], tok, max_length=128, max_prompt_length=64
    )
    bos = tok.bos_token_id
    if family == "llama3":
        assert pairs[0].prompt_ids.count(bos) == 1 and pairs[0].prompt_ids[0] == bos
        assert pairs[0].chosen_ids[-1] == tok.convert_tokens_to_ids("<|eot_id|>")
    else:
        assert bos is None
        assert pairs[0].chosen_ids[-1] == tok.convert_tokens_to_ids("<|im_end|>")


def test_a_doubled_bos_is_refused():
    tok = load_tokenizer(ModelSpec(arch="llama", config=TINY, tokenizer="char", tokenizer_family="llama3"))
    with pytest.raises(DataError, match="2 BOS tokens .* where its chat template writes 1"):
        tokenize_pairs(
            [PreferencePair("<|begin_of_text|>What is 2 + 2?", "4", "5", "p0")],
            tok,
            max_length=128,
            max_prompt_length=64,
        )


def test_missing_local_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a directory with a saved model"):
        ModelSpec(name_or_path=str(tmp_path / "nope")).check_available()


def test_unknown_hub_id_offline_names_the_model_and_the_fix(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"'org/model'.*model\.name_or_path=DIR"):
        ModelSpec(name_or_path="org/model").check_available()
