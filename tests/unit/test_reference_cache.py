"""The reference log-prob cache: its key, its values against a live reference, damage, and no reference model."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from prefopt import refcache
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import TokenizedPair, tokenize_pairs
from prefopt.errors import ConfigError
from prefopt.models import ModelSpec, load_model, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
TOKENIZE = dict(max_length=128, max_prompt_length=64, completion_eos=None, chat_template=True, system_prompt=None)


def header(spec_kw=None, data_kw=None, tokenize_kw=None, edit_pairs=None, model_dir=None):
    spec = ModelSpec(**({"arch": "qwen2", "config": CONFIG, "tokenizer": "char"} | (spec_kw or {})))
    if model_dir is not None:
        spec = ModelSpec(name_or_path=str(model_dir), tokenizer="char")
    tok = load_tokenizer(spec)
    model = (
        load_model(ModelSpec(arch="qwen2", config=CONFIG | dict(spec.config), tokenizer="char"), len(tok))
        if model_dir is not None
        else load_model(spec, len(tok))
    )
    data = ArithmeticData(n_train=6, n_eval=2, **(data_kw or {}))
    train_rows, eval_rows, _ = data.load()
    tok_args = TOKENIZE | (tokenize_kw or {})
    train, _ = tokenize_pairs(train_rows, tok, **{k: v for k, v in tok_args.items()})
    evals, _ = tokenize_pairs(eval_rows, tok, **tok_args)
    if edit_pairs:
        train = edit_pairs(train)
    return refcache.reference_key(
        refcache.cache_header(
            spec=spec,
            model=model,
            tokenizer=tok,
            data_fingerprint=data.fingerprint(),
            tokenize=tok_args,
            train_pairs=train,
            eval_pairs=evals,
        )
    )


def _one_token_changed(pairs):
    p = pairs[0]
    return [
        TokenizedPair(p.pair_id, p.prompt_ids, p.chosen_ids[:-1] + (p.chosen_ids[-1] + 1,), p.rejected_ids)
    ] + pairs[1:]


CHANGES = {
    "model init seed": dict(spec_kw={"init_seed": 1}),
    "model size": dict(spec_kw={"config": CONFIG | {"hidden_size": 48}}),
    "model dtype": dict(spec_kw={"dtype": "bfloat16"}),
    "attention": dict(spec_kw={"attn_implementation": "eager"}),
    "vocabulary": dict(spec_kw={"config": CONFIG | {"vocab_size": 160}}),
    "tokenizer / chat template": dict(spec_kw={"tokenizer_family": "llama3", "arch": "llama"}),
    "completion eos": dict(spec_kw={"completion_eos": "<|endoftext|>"}),
    "data source": dict(data_kw={"seed": 7}),
    "one token of one pair": dict(edit_pairs=_one_token_changed),
    "pair order": dict(edit_pairs=lambda ps: ps[::-1]),
    "max_length (truncation)": dict(tokenize_kw={"max_length": 60, "max_prompt_length": 40}),
    "max_prompt_length": dict(tokenize_kw={"max_prompt_length": 30}),
    "chat template off": dict(tokenize_kw={"chat_template": False}),
    "system prompt": dict(tokenize_kw={"system_prompt": "Be brief."}),
}


def test_cache_key_is_stable_for_the_same_inputs():
    assert header() == header()


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_cache_key_changes_with_every_input(change):
    assert header(**CHANGES[change]) != header()


def test_cache_key_of_a_saved_checkpoint_changes_when_its_files_change(tmp_path):
    spec = ModelSpec(arch="qwen2", config=CONFIG, tokenizer="char")
    load_model(spec, 100).save_pretrained(tmp_path / "ckpt")
    first = header(model_dir=tmp_path / "ckpt")
    assert header(model_dir=tmp_path / "ckpt") == first
    weights = next((tmp_path / "ckpt").glob("*.safetensors"))
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))  # rewritten in place
    assert header(model_dir=tmp_path / "ckpt") != first


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_cached_run_equals_live_run_and_a_second_run_loads_the_cache(tiny_run, tmp_path, caplog):
    cache = tmp_path / "cache"
    caplog.set_level(logging.INFO, logger="prefopt")
    _, live = tiny_run("reference_cache=null", run_dir=tmp_path / "live")
    _, cached = tiny_run(f"reference_cache={cache}", run_dir=tmp_path / "cached")
    assert "reference log-probs: computed 40 pairs" in caplog.text
    files = list(cache.glob("*.safetensors"))
    assert len(files) == 1
    a, b = read_metrics(live), read_metrics(cached)
    keys = [k for k in a[-1] if k.startswith(("train/", "eval/")) and "time" not in k and "per_s" not in k]
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-6, abs=1e-6), (ra["step"], k)
    caplog.clear()
    tiny_run(f"reference_cache={cache}", "loss=ipo", run_dir=tmp_path / "ipo")  # another loss of the sweep
    assert "reference log-probs: loaded 40 pairs from cache" in caplog.text and "computed" not in caplog.text
    assert list(cache.glob("*.safetensors")) == files


def test_a_cached_run_constructs_no_reference_model(tiny_run, monkeypatch, tmp_path):
    import copy

    import prefopt.engine
    import prefopt.logprobs
    import prefopt.models
    import prefopt.training

    loads, frozen, copies, calls = [], [], [], []
    real_load, real_freeze, real_pair = prefopt.models.load_model, prefopt.models.freeze, prefopt.logprobs.pair_logps
    monkeypatch.setattr(prefopt.training, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(prefopt.training, "freeze", lambda m: frozen.append(1) or real_freeze(m))
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(obj, *a, **k):
        if isinstance(obj, torch.nn.Module):
            copies.append(1)
        return real_deepcopy(obj, *a, **k)

    monkeypatch.setattr(copy, "deepcopy", counting_deepcopy)
    monkeypatch.setattr(
        prefopt.logprobs,
        "pair_logps",
        lambda m, *a, **k: calls.append(torch.is_grad_enabled()) or real_pair(m, *a, **k),
    )
    cache = tmp_path / "cache"
    tiny_run(f"reference_cache={cache}", "eval_every=0", run_dir=tmp_path / "first")  # builds the cache
    assert loads == [1] and frozen == [] and copies == []
    calls.clear()
    tiny_run(f"reference_cache={cache}", "eval_every=0", run_dir=tmp_path / "second")  # loads it
    assert loads == [1, 1] and frozen == [] and copies == []
    # 3 steps × 2 micro-batches with gradients, then the final evaluation (4 no-grad micro-batches): all of the
    # policy; a live reference would add one no-grad forward per training micro-batch
    assert calls.count(True) == 6 and calls.count(False) == 4


def test_damaged_cache_files_are_detected_and_rebuilt(tmp_path, caplog):
    pairs = [TokenizedPair(f"p{i}", (1, 2, 3), (4, 5 + i), (6,)) for i in range(5)]
    hdr = {"format": 1, "what": "test"}

    def logps(batch, per_token=False):
        from prefopt.losses import PairLogps

        n = batch.num_pairs
        tokens = dict(chosen_token_logps=torch.full((n, 2), 0.5), rejected_token_logps=torch.ones(n, 2))
        return PairLogps(
            torch.arange(n, dtype=torch.float32),
            -torch.arange(n, dtype=torch.float32),
            torch.full((n,), 2.0),
            torch.ones(n),
            **(tokens if per_token else {}),
        )

    model = torch.nn.Linear(1, 1)

    def build():
        return refcache.build(
            directory=tmp_path,
            header=hdr,
            logps=logps,
            model=model,
            train_pairs=pairs[:3],
            eval_pairs=pairs[3:],
            pad_id=0,
            micro_batch_size=2,
            packing=False,
            device="cpu",
        )

    caplog.set_level(logging.INFO, logger="prefopt")
    first = build()
    path = first.path
    good = path.read_bytes()
    assert "computed 5 pairs" in caplog.text
    lp = first(pairs[3:])
    assert lp.chosen.tolist() == [0.0, 1.0] and lp.rejected_tokens.tolist() == [1.0, 1.0]

    damages = {
        "truncated": good[: len(good) // 2],
        "empty": b"",
        "flipped value": good[:-3] + bytes([good[-3] ^ 0x40]) + good[-2:],
        "garbage": b"\x00" * len(good),
    }
    for name, data in damages.items():
        path.write_bytes(data)
        caplog.clear()
        again = build()
        assert "is damaged" in caplog.text and "computed 5 pairs" in caplog.text, name
        torch.testing.assert_close(again.values, first.values)
        caplog.clear()
        build()
        assert "loaded 5 pairs" in caplog.text and "is damaged" not in caplog.text, name  # the rewritten file is whole
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary file left behind
    with pytest.raises(Exception, match="not in the reference cache"):
        first([TokenizedPair("unknown", (1,), (2,), (3,))])


def test_reference_free_loss_with_a_cache_is_refused_naming_the_key(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match="reference_cache"):
        tiny_run("loss=simpo", f"reference_cache={tmp_path}", run_dir=tmp_path / "run")


def test_cache_entry_point_builds_the_cache_a_run_then_loads(tiny_run, tmp_path, caplog):
    cache = tmp_path / "cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    from tests.helpers.config import TINY

    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.reference",
            *TINY,
            f"reference_cache={cache}",
            f"hydra.run.dir={tmp_path / 'job'}",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "reference log-probs: computed 40 pairs" in res.stdout + res.stderr
    assert len(list(cache.glob("*.safetensors"))) == 1
    caplog.set_level(logging.INFO, logger="prefopt")
    tiny_run(f"reference_cache={cache}", run_dir=tmp_path / "run")
    assert "reference log-probs: loaded 40 pairs" in caplog.text


def test_a_five_loss_sweep_computes_reference_logps_once(tmp_path):
    """`-m loss=dpo,ipo,slic,caldpo,bpo reference_cache=DIR`: the first job computes the reference log-probs, the
    other four load them (each job's own log says which), and no job loads a reference model."""
    from tests.helpers.config import TINY

    cache, sweep = tmp_path / "cache", tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.run",
            "-m",
            "loss=dpo,ipo,slic,caldpo,bpo",
            *TINY,
            "eval_every=0",
            f"reference_cache={cache}",
            f"hydra.sweep.dir={sweep}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    logs = {
        json.loads((d / "summary.json").read_text())["loss"]: (d / "run.log").read_text()
        for d in sweep.iterdir()
        if (d / "summary.json").is_file()
    }
    assert sorted(logs) == ["bpo", "caldpo", "dpo", "ipo", "slic"]
    computed = [k for k, text in logs.items() if "reference log-probs: computed 40 pairs" in text]
    loaded = [k for k, text in logs.items() if "reference log-probs: loaded 40 pairs from cache" in text]
    assert computed == ["dpo"] and sorted(loaded) == ["bpo", "caldpo", "ipo", "slic"]
    assert len(list(cache.glob("*.safetensors"))) == 1
