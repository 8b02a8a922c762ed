"""A LoRA run is scored on its trained weights: the adapters merged into a fresh full-precision copy of the base,
saved, and that directory loaded by vLLM (here a recording stand-in at the engine's class boundary, on CPU)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import prefopt.generate
import prefopt.mathloop.loop as loop_module
from prefopt.generate import HFGenerator

# The tiny warm-up (its default 350 steps) gives a policy that answers some arithmetic right; LoRA adapters
# trained hard on the arithmetic pairs (lr 3e-2) then change its greedy answers.
LORA_RUN = [
    "mathloop.warmup=true",
    "mathloop.pairs=false",
    "mathloop.evaluate=true",
    "warmup.progress=false",
    "data.source.n_train=150",
    "data.source.n_eval=50",
    "verify.workers=1",
    "model.lora.r=8",
    "model.lora.alpha=16",
    "lr=3e-2",
    "steps=12",
    "batch_size=8",
    "micro_batch_size=8",
    "evaluation.benchmarks=[arith]",
    "generation.max_new_tokens=24",
]


class RecordingEngine:
    """Stands in for prefopt.generate.VLLMGenerator: records the weights directory it is built on (and what that
    directory holds), then generates greedily with HF from exactly those weights, loaded from disk."""

    built: list[dict] = []

    def __init__(self, model_path, tokenizer, config, completion_eos=None, dtype="bfloat16", seed=0):
        from transformers import AutoModelForCausalLM

        path = Path(model_path)
        RecordingEngine.built.append({"path": path, "files": sorted(p.name for p in path.iterdir()), "dtype": dtype})
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.hf = HFGenerator(model, tokenizer, config, completion_eos)

    def generate(self, prompts, n=1, temperature=0.0, seed=0):
        return self.hf.generate(prompts, n=n, temperature=temperature, seed=seed)


@pytest.fixture
def vllm_stand_in(monkeypatch):
    RecordingEngine.built = []
    monkeypatch.setattr(prefopt.generate, "vllm_usable", lambda: True)  # as on a GPU with vLLM installed
    monkeypatch.setattr(loop_module, "VLLMGenerator", RecordingEngine)
    monkeypatch.setattr(loop_module, "_VLLM", {})
    return RecordingEngine


def _answers(path: Path) -> list[str]:
    return [json.loads(line)["output"] for line in path.read_text().splitlines()]


def test_a_lora_run_is_scored_on_the_merged_weights_not_the_base(tiny_run, tmp_path, vllm_stand_in):
    summary, run_dir = tiny_run(*LORA_RUN, f"mathloop.cache_dir={tmp_path / 'cache'}", run_dir=tmp_path / "run")
    built = vllm_stand_in.built
    warmed = Path(summary["mathloop"]["warmup"]["path"]) / "policy"
    # before training: the engine loads the starting policy (the warmed-up weights); after: the merged copy
    assert [b["path"] for b in built] == [warmed, run_dir / "final_merged"]
    merged_files = built[1]["files"]
    assert "model.safetensors" in merged_files and "config.json" in merged_files
    assert "adapter_config.json" not in merged_files  # full weights, not the adapters vLLM would not read
    assert built[1]["dtype"] == "float32"  # the model's own dtype (the real presets: bfloat16), never 4-bit
    assert (run_dir / "final" / "adapter_config.json").is_file()
    assert not (run_dir / "final_merged").exists()  # a scoring copy only (model.lora.merge_on_export keeps it)
    assert loop_module._VLLM == {}  # its engine went with it

    # the adapters changed the greedy answers, so the score after differs from the score before
    before, after = (
        _answers(run_dir / "verified_before" / "arith.jsonl"),
        _answers(run_dir / "verified" / "arith.jsonl"),
    )
    assert len(before) == len(after) == 50 and before != after
    metrics = summary["metrics"]
    assert metrics["eval/verified/arith"] != metrics["eval/verified_before/arith"]


def test_the_merged_copy_generates_what_the_policy_in_memory_does(tiny_run, tmp_path, vllm_stand_in, monkeypatch):
    """The same run with HF generate on the in-memory LoRA policy gives the same greedy answers as the stand-in
    engine on the merged directory; merge_on_export keeps that directory."""
    cache = f"mathloop.cache_dir={tmp_path / 'cache'}"
    tiny_run(*LORA_RUN, cache, "model.lora.merge_on_export=true", run_dir=tmp_path / "vllm")
    assert (tmp_path / "vllm" / "final_merged" / "model.safetensors").is_file()
    tiny_run(*LORA_RUN, cache, "generation.backend=hf", run_dir=tmp_path / "hf")
    assert _answers(tmp_path / "vllm" / "verified" / "arith.jsonl") == _answers(
        tmp_path / "hf" / "verified" / "arith.jsonl"
    )
