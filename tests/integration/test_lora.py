"""LoRA through peft: one model in memory, ln 2 at step 0, adapter-only gradients, save/resume/merge."""

from __future__ import annotations

import json
import math

import pytest
import torch


def test_lora_run_loads_one_model_and_trains_adapters_only(tiny_run, monkeypatch, tmp_path):
    import prefopt.engine
    import prefopt.models
    import prefopt.training

    loads, grads = [], {}
    real_load = prefopt.models.load_model
    monkeypatch.setattr(prefopt.training, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    real_step = prefopt.engine.Trainer.train_step

    def spy(self):
        if not grads:  # after the first step's backward, look at which parameters got gradients
            orig = self.optimizer.step

            def record(*a, **k):
                grads.update({n: p.grad is not None for n, p in self.policy.named_parameters()})
                return orig(*a, **k)

            self.optimizer.step = record
        return real_step(self)

    monkeypatch.setattr(prefopt.engine.Trainer, "train_step", spy)
    summary, run_dir = tiny_run(
        "model.lora.r=4", "steps=3", "eval_every=0", "model.lora.merge_on_export=true", run_dir=tmp_path / "lora"
    )
    assert loads == [1]  # the reference is the base with adapters off: no second model
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    train_rows = [r for r in rows if "train/loss" in r]
    assert train_rows[-1]["train/rewards/margins"] != 0.0  # the adapters did move the policy away from its base
    with_grad = {n for n, g in grads.items() if g}
    assert with_grad and all("lora_" in n for n in with_grad)
    assert {n for n in grads if "lora_" in n} == with_grad
    assert (run_dir / "final" / "adapter_model.safetensors").is_file()
    assert not (run_dir / "final" / "model.safetensors").exists()
    assert (run_dir / "final_merged" / "model.safetensors").is_file()


def test_lora_adapters_save_load_and_merge_to_the_same_function(tiny_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from prefopt.models import ModelSpec, load_model

    _, run_dir = tiny_run(
        "model.lora.r=4",
        "steps=3",
        "eval_every=0",
        "model.lora.merge_on_export=true",
        "lr=1e-2",
        run_dir=tmp_path / "lora",
    )
    spec = ModelSpec(
        arch="qwen2",
        tokenizer="char",
        config=dict(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
            tie_word_embeddings=True,
        ),
    )
    base = load_model(spec).eval()
    ids = torch.tensor([[5, 17, 30, 42, 8, 9]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        adapted = PeftModel.from_pretrained(base, run_dir / "final").eval()
        adapted_logits = adapted(input_ids=ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(run_dir / "final_merged").eval()(input_ids=ids).logits
    assert not torch.allclose(adapted_logits, base_logits)
    torch.testing.assert_close(merged_logits, adapted_logits, atol=1e-5, rtol=1e-4)


def test_lora_resume_continues_from_the_adapter_checkpoint(tiny_run, tmp_path):
    full, _ = tiny_run("model.lora.r=4", "steps=4", "save_every=2", "lr=1e-2", run_dir=tmp_path / "full")
    tiny_run("model.lora.r=4", "steps=2", "save_every=2", "lr=1e-2", run_dir=tmp_path / "cut")
    resumed, _ = tiny_run("model.lora.r=4", "steps=4", "save_every=2", "lr=1e-2", run_dir=tmp_path / "cut")
    assert resumed["resumed_from_step"] == 2
    assert resumed["metrics"]["train/loss"] == pytest.approx(full["metrics"]["train/loss"], abs=1e-6)
    assert resumed["metrics"]["eval/loss"] == pytest.approx(full["metrics"]["eval/loss"], abs=1e-6)
