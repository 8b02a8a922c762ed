"""scripts/memory_plan.py: parameter counts against real models, the activation formula against autograd, and the
plan's sanity (checkpointing, a cached reference and sharding all shrink what they should)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load():
    spec = importlib.util.spec_from_file_location("memory_plan", ROOT / "scripts" / "memory_plan.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


mp = _load()

TINY = {
    "qwen2_untied": (
        "qwen2",
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=False,
        ),
    ),
    "qwen2_tied": (
        "qwen2",
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=160,
            num_hidden_layers=3,
            num_attention_heads=8,
            num_key_value_heads=4,
            tie_word_embeddings=True,
        ),
    ),
    "llama": (
        "llama",
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=1,
            tie_word_embeddings=False,
        ),
    ),
    "llama_biases_head_dim": (
        "llama",
        dict(
            vocab_size=96,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=32,
            attention_bias=True,
            mlp_bias=True,
            tie_word_embeddings=True,
        ),
    ),
}


def _model(model_type, values, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    config = mp.make_config(model_type, values)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return config, AutoModelForCausalLM.from_config(config, dtype=dtype)


@pytest.mark.parametrize("name", sorted(TINY))
def test_param_count_equals_a_real_model(name):
    config, model = _model(*TINY[name])
    assert mp.param_counts(config)["total"] == sum(p.numel() for p in model.parameters())
    layer = model.model.layers[0]
    assert mp.param_counts(config)["layer"] == sum(p.numel() for p in layer.parameters())


@pytest.mark.parametrize("name", ["qwen2_untied", "llama"])
def test_lora_param_count_equals_peft(name):
    from peft import LoraConfig, get_peft_model

    config, model = _model(*TINY[name])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=list(mp.LORA_TARGETS)))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert mp.lora_param_count(config, 4) == trainable


def test_published_counts_are_the_known_sizes():
    counts = {name: mp.param_counts(mp.make_config(t, v))["total"] for name, (t, v) in mp.PUBLISHED.items()}
    # Qwen2.5-7B/-Math-7B 7.62 B, Llama-3.1-8B 8.03 B, Qwen2.5-1.5B/-Math-1.5B 1.54 B (the model cards' sizes)
    assert counts == {
        "Qwen2.5-Math-7B": 7_615_616_512,
        "Llama-3.1-8B(-Instruct)": 8_030_261_248,
        "Qwen2.5-Math-1.5B": 1_543_714_304,
    }
    llama = mp.make_config(*mp.PUBLISHED["Llama-3.1-8B(-Instruct)"])
    assert mp.lora_param_count(llama, 16) == 41_943_040  # what peft prints for r=16 on all linear layers


def _saved_bytes_per_token(model, tokens: int, lora: bool) -> float:
    """Bytes autograd keeps for one decoder layer (unique storages, parameters excluded), per token."""
    base = model.base_model.model if lora else model
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in params and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, base.config.vocab_size, (1, tokens))
    hidden = base.model.embed_tokens(ids).detach().requires_grad_(True)
    positions = torch.arange(tokens)[None]
    cos, sin = (x.detach() for x in base.model.rotary_emb(hidden, positions))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        base.model.layers[0](hidden, attention_mask=None, position_ids=positions, position_embeddings=(cos, sin))
    rope = cos.untyped_storage().nbytes() + sin.untyped_storage().nbytes()  # counted once per model, not per layer
    return (sum(seen.values()) - rope) / tokens


@pytest.mark.parametrize("name", ["qwen2_untied", "llama"])
@pytest.mark.parametrize("lora", [False, True])
def test_layer_activation_formula_matches_autograd(name, lora):
    """The per-layer formula is what transformers' decoder layer really saves in bf16 with sdpa (flash kernel)."""
    config, model = _model(*TINY[name], dtype=torch.bfloat16)
    model.train()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=list(mp.LORA_TARGETS)))
    measured = _saved_bytes_per_token(model, 128, lora)
    assert measured == pytest.approx(mp.layer_activation_bytes(config, lora_r=8 if lora else 0), rel=0.02)


@pytest.fixture(scope="module")
def plan():
    models = {name: mp.make_config(t, v) for name, (t, v) in mp.PUBLISHED.items()}
    return models, mp.plan(models, mp.Workload())


def test_checkpointing_and_chunking_shrink_activations_and_logits(plan):
    _, result = plan
    for entry in result.values():
        for s in entry["scenarios"].values():
            assert 0 < s["act_ckpt"] < s["act_full"] / 5
            assert 0 < s["logits_chunked"] < s["logits_plain"] / 10
            assert s["total_prefopt"] < s["total_plain"]


def test_cached_reference_reduces_the_total(plan):
    _, result = plan
    for entry in result.values():
        for s in entry["scenarios"].values():
            assert s["ref_cached"] == 0 < s["ref_live"]
            assert s["total_cached"] == s["total_prefopt"] - s["ref_live"]


def test_sharding_over_8_divides_the_sharded_parts_by_8(plan):
    models, _ = plan
    one = mp.plan(models, mp.Workload(gpus=1))
    eight = mp.plan(models, mp.Workload(gpus=8))
    for name in models:
        a, b = one[name]["scenarios"]["fsdp"], eight[name]["scenarios"]["fsdp"]
        for key in ("weights", "grads", "adamw"):
            assert b[key] == pytest.approx(a[key] / 8, rel=1e-9)
        for key in ("gathered", "act_full", "act_ckpt", "logits_plain", "logits_chunked"):
            assert b[key] == a[key]  # not sharded: whole units, and each GPU runs its own micro-batch
        assert one[name]["scenarios"]["lora"] == eight[name]["scenarios"]["lora"]


def test_activations_scale_with_the_micro_batch(plan):
    models, result = plan
    double = mp.plan(models, mp.Workload(pairs=4))
    for name in models:
        a, b = result[name]["scenarios"]["fsdp"], double[name]["scenarios"]["fsdp"]
        assert b["act_full"] == 2 * a["act_full"] and b["act_ckpt"] == 2 * a["act_ckpt"]
        assert b["weights"] == a["weights"]


def test_the_7_8b_models_fit_on_8_gpus_only_with_prefopts_memory_savings(plan):
    _, result = plan
    w = mp.Workload()
    for name in ("Qwen2.5-Math-7B", "Llama-3.1-8B(-Instruct)"):
        fsdp = result[name]["scenarios"]["fsdp"]
        assert mp.fits(fsdp["total_prefopt"], w) and not mp.fits(fsdp["total_plain"], w)
        assert mp.fits(result[name]["scenarios"]["lora"]["total_prefopt"], w)


def test_markdown_and_json(tmp_path, capsys):
    out = tmp_path / "plan.json"
    result = mp.main(["--json", str(out)])
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("|")]
    header = rows[0]
    for name in mp.PUBLISHED:
        assert f"{name} FSDP ×8" in header and f"{name} LoRA ×1" in header
    labels = [row.split("|")[1].strip() for row in rows[2:]]
    expected = (
        ["parameters", "vocabulary"] + [label for _, label in mp.COMPONENTS] + [label for _, label, _ in mp.TOTALS]
    )
    assert labels == expected
    assert all(row.count("|") == 8 for row in rows)  # label + 6 columns
    assert "152,064" in text and "128,256" in text and "151,936" in text
    totals = [row for row in rows if row.startswith("| total")]
    assert all("fits" in row for row in totals) and "does not fit" in totals[-1]
    saved = json.loads(out.read_text())
    assert saved["workload"]["gpus"] == 8 and set(saved["models"]) == set(mp.PUBLISHED)
    assert saved["models"] == json.loads(json.dumps(result))


def test_a_local_config_json(tmp_path, capsys):
    config, model = _model(*TINY["llama"])
    config.save_pretrained(tmp_path)
    result = mp.main(["--config", str(tmp_path / "config.json"), "--gpus", "2"])
    assert capsys.readouterr().out.count("FSDP ×2") == 1
    (entry,) = result.values()
    assert entry["params"] == sum(p.numel() for p in model.parameters())


def test_pure_bf16_master_halves_the_sharded_state(plan):
    models, result = plan
    bf16 = mp.plan(models, mp.Workload(master_dtype_bytes=2))
    for name in models:
        a, b = result[name]["scenarios"]["fsdp"], bf16[name]["scenarios"]["fsdp"]
        for key in ("weights", "grads", "adamw"):
            assert b[key] == pytest.approx(a[key] / 2, rel=1e-9)
