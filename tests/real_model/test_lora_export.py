"""A LoRA run on SmolLM2-135M-Instruct: `final/` (adapters) and `final_merged/` reload with PEFT and
AutoModelForCausalLM and answer greedily with the same tokens as the policy the run held in memory."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from prefopt.data.batching import render_prompt
from prefopt.engine import Trainer
from tests.helpers.config import compose_cfg

pytestmark = pytest.mark.slow

PROBLEMS = ["What is 3 + 4?", "What is 12 + 9?"]
NEW_TOKENS = 16


def greedy(model, tok) -> list[list[int]]:
    out = []
    for problem in PROBLEMS:
        ids = tok(render_prompt(tok, problem, True, None), return_tensors="pt", add_special_tokens=False).input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


def test_lora_run_exports_adapters_and_merged_weights_that_reload(smol_dir, monkeypatch, tmp_path):
    from prefopt.run import train

    in_memory = {}
    fit = Trainer.fit

    def fit_and_remember(self, run_log):
        result = fit(self, run_log)
        was = self.policy.training
        self.policy.eval()
        in_memory["tokens"] = greedy(self.policy, tok)
        self.policy.train(was)
        return result

    tok = AutoTokenizer.from_pretrained(smol_dir)
    monkeypatch.setattr(Trainer, "fit", fit_and_remember)
    cache = str(Path(smol_dir).parent)
    cfg = compose_cfg(
        [
            "model=smollm2_135m",
            f"model.gguf_cache={cache}",
            "model.dtype=float32",
            "hardware=cpu",
            "hardware.threads=auto",
            "model.lora.merge_on_export=true",
            "steps=2",
            "batch_size=2",
            "micro_batch_size=2",
            "eval_every=0",
            "lr=2e-3",
            "data.source.n_train=4",
            "data.source.n_eval=2",
        ]
    )
    run_dir = tmp_path / "run"
    summary = train(cfg, run_dir=run_dir)
    assert summary["status"] == "complete"
    final, merged_dir = run_dir / "final", run_dir / "final_merged"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 16
    assert set(adapter["target_modules"]) == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }

    assert AutoTokenizer.from_pretrained(final).chat_template == tok.chat_template
    base = AutoModelForCausalLM.from_pretrained(smol_dir, dtype=torch.float32)
    reloaded = PeftModel.from_pretrained(base, final).eval()
    lora_b = [p for n, p in reloaded.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # the adapters moved: this is not the base model
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    expected = in_memory["tokens"]
    assert greedy(reloaded, tok) == expected
    assert greedy(merged, AutoTokenizer.from_pretrained(merged_dir)) == expected
