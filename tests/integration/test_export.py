"""What prefopt saves, the ecosystem reloads identically: the same tokens and the same greedy generation."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from prefopt.models import ModelSpec, load_model, load_tokenizer
from prefopt.tokenizer import packaged_tokenizer_dir, save_tokenizer

TEXTS = [
    "What is 12 + 7?\nLet me think.\n\nThe answer is \\boxed{19}.",
    "  two  spaces\tand a tab\n",
    "<|im_start|>user\nhi<|im_end|>\n",
    "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>",
]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 5?\nAnswer in \\boxed{}."}]


def same_tokens(ours, theirs, texts=TEXTS) -> None:
    assert len(theirs) == len(ours) and theirs.get_vocab() == ours.get_vocab()
    for text in texts:
        assert theirs(text).input_ids == ours(text).input_ids, text
        assert theirs.decode(theirs(text).input_ids) == ours.decode(ours(text).input_ids)
    assert theirs.chat_template == ours.chat_template
    assert theirs.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True
    )
    assert (theirs.eos_token, theirs.bos_token, theirs.pad_token) == (ours.eos_token, ours.bos_token, ours.pad_token)


def greedy(model, tok, max_new_tokens: int = 24) -> list[int]:
    text = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None
        )
    return out[0, enc.input_ids.shape[1] :].tolist()


@pytest.mark.parametrize("preset,family", [("tiny_qwen", "qwen"), ("tiny_llama", "llama3")])
def test_a_tiny_runs_final_reloads_with_auto_classes_identically(tiny_run, tmp_path, preset, family):
    _, run_dir = tiny_run(f"model={preset}", "steps=1", "eval_every=0", run_dir=tmp_path / "run")
    final = run_dir / "final"
    # The class every transformers version knows (5.x writes `TokenizersBackend`, which 4.x lacks). The char
    # tokenizer is written in the byte-level alphabet, so a rebuild as Qwen2Tokenizer keeps its spaces and newlines.
    saved = json.loads((final / "tokenizer_config.json").read_text())
    assert saved["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not isinstance(saved.get("extra_special_tokens"), list)  # 4.x reads that key as a dict and fails on a list
    spec = ModelSpec(name_or_path=str(final), tokenizer="char", tokenizer_family=family)  # how prefopt reloads it
    ours_tok, ours = load_tokenizer(spec), load_model(spec)
    # Texts in the tiny alphabet (printable ASCII and newline). A character outside it (a tab) is <unk> for prefopt
    # and for PreTrainedTokenizerFast, but transformers >= 5.4 rebuilds a qwen2 checkpoint's tokenizer as
    # Qwen2Tokenizer whatever tokenizer_config.json says, and that drops unknown bytes instead.
    in_alphabet = [t for t in TEXTS if "\t" not in t]
    assert ours_tok("\t").input_ids == [ours_tok.unk_token_id]
    for theirs_tok in (AutoTokenizer.from_pretrained(final), PreTrainedTokenizerFast.from_pretrained(final)):
        same_tokens(ours_tok, theirs_tok, in_alphabet)
    theirs = AutoModelForCausalLM.from_pretrained(final)
    assert type(theirs).__name__ == ("Qwen2ForCausalLM" if family == "qwen" else "LlamaForCausalLM")
    assert greedy(theirs, AutoTokenizer.from_pretrained(final)) == greedy(ours, ours_tok)


def test_a_tiny_model_around_a_real_tokenizer_reloads_identically(real_tokenizer, tmp_path):
    name, tok = real_tokenizer
    arch = "qwen2" if name.startswith("qwen") else "llama"
    config = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
    )
    policy = load_model(ModelSpec(arch=arch, config=config), vocab_size=len(tok))
    before = greedy(policy, tok)
    policy.save_pretrained(tmp_path, safe_serialization=True)
    save_tokenizer(tok, tmp_path)
    theirs_tok = AutoTokenizer.from_pretrained(tmp_path)
    same_tokens(tok, theirs_tok)
    assert greedy(AutoModelForCausalLM.from_pretrained(tmp_path), theirs_tok) == before


def test_a_run_on_a_real_tokenizer_trains_on_conversations_and_its_final_reloads(real_tokenizer, tiny_run, tmp_path):
    name, tok = real_tokenizer
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 5?"}]
    rows = [
        {
            "prompt": turns,
            "chosen": [{"role": "assistant", "content": f"{i}: 8."}],
            "rejected": [{"role": "assistant", "content": f"{i}: 9."}],
        }
        for i in range(12)
    ]
    path = tmp_path / "conv.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    preset, eos = ("tiny_qwen", "<|im_end|>") if name.startswith("qwen") else ("tiny_llama", "<|eot_id|>")
    summary, run_dir = tiny_run(
        f"model={preset}",
        f"model.tokenizer={packaged_tokenizer_dir(name)}",
        f"model.chat_template={name}",
        f"model.config.vocab_size={len(tok)}",
        "model.config.hidden_size=16",
        "model.config.intermediate_size=32",
        f"model.completion_eos='{eos}'",
        "data=jsonl",
        f"data.source.path={path}",
        "steps=2",
        "eval_every=0",
        run_dir=tmp_path / "run",
    )
    assert summary["status"] == "complete" and summary["data"]["tokenize"]["train"]["pairs"] == 11
    same_tokens(tok, AutoTokenizer.from_pretrained(run_dir / "final"))
