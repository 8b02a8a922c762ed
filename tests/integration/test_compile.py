"""`train.compile=true`: the decoder runs through torch.compile and the run computes what it computes without."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from prefopt.data.batching import collate
from prefopt.logprobs import PairLogpsModel
from prefopt.models import ModelSpec, load_model


def test_compile_without_a_cxx_compiler_is_refused_naming_the_fix(monkeypatch):
    from prefopt.errors import ConfigError
    from prefopt.logprobs import check_compiler

    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(ConfigError, match="needs a C\\+\\+ compiler.*train.compile=false"):
        check_compiler(torch.device("cpu"))
    check_compiler(torch.device("meta"))  # only CPU code generation needs one


def _rows(run_dir):
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_compiled_run_equals_an_eager_one(tiny_run, tmp_path):
    """Losses, rewards and eval of a compiled run match an eager run's step by step (fusion reorders float sums,
    so to 1e-4, not bit for bit), and the checkpoint has the eager model's keys (no `_orig_mod.` prefixes)."""
    _, eager = tiny_run("train.compile=false", "steps=3", run_dir=tmp_path / "eager")
    _, compiled = tiny_run("train.compile=true", "steps=3", run_dir=tmp_path / "compiled")
    a, b = _rows(eager), _rows(compiled)
    keys = [
        k
        for k in {k for r in a for k in r}
        if k.startswith(("train/loss", "train/rewards/", "train/logps/", "eval/loss", "train/grad_norm"))
        and "accuracies" not in k
    ]  # a step function of margins that start at exactly 0
    assert len(a) == len(b) >= 3 and len(keys) >= 5
    for ra, rb in zip(a, b):
        assert ra.keys() == rb.keys()
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-4, abs=1e-4), (ra["step"], k)

    def ckpt(d):
        return sorted((d / "checkpoints").glob("step_*"))[-1]

    ta = load_file(next(ckpt(eager).glob("*.safetensors")))
    tb = load_file(next(ckpt(compiled).glob("*.safetensors")))
    assert sorted(ta) == sorted(tb)
    for k in ta:
        torch.testing.assert_close(tb[k], ta[k], rtol=1e-3, atol=1e-4, msg=k)


def test_the_compiled_form_sits_beside_the_model(tiny_model_and_batch):
    model, batch = tiny_model_and_batch
    wrapped = PairLogpsModel(model, compile=True)
    assert wrapped.compiled_backbone is not None
    assert list(wrapped.state_dict()) == list(PairLogpsModel(model).state_dict())  # no `_orig_mod.` keys
    assert "compiled_backbone" not in dict(wrapped.named_modules())
    with torch.no_grad():
        eager, comp = PairLogpsModel(model)(batch), wrapped(batch)
    torch.testing.assert_close(comp.chosen, eager.chosen, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(comp.rejected, eager.rejected, rtol=1e-4, atol=1e-4)
    out = model(input_ids=batch.input_ids[:1, :5])  # the model's own forward (generation, eval) stays eager
    assert out.logits.shape[-1] == model.config.vocab_size


@pytest.fixture
def tiny_model_and_batch():
    from prefopt.data.arith import ArithmeticData
    from prefopt.data.batching import tokenize_pairs
    from prefopt.models import load_tokenizer

    spec = ModelSpec(
        arch="qwen2",
        config=dict(
            vocab_size=128,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        tokenizer="char",
    )
    tok = load_tokenizer(spec)
    train, _, _ = ArithmeticData(n_train=4, n_eval=1).load()
    pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
    return load_model(spec, vocab_size=len(tok)), collate(pairs, tok.pad_token_id, packing=True)
