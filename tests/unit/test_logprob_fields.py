"""The optional PairLogps fields and the entropy / top-1 statistics of the tiled LM head, against a naive
full-softmax computation, in every batch layout; and the reference cache storing the fields a loss needs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from prefopt import refcache
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import TokenizedPair, collate, tokenize_pairs
from prefopt.logprobs import PairLogpsModel, pair_logps
from prefopt.losses import get_loss
from prefopt.models import ModelSpec, load_model, load_tokenizer

CONFIG = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    tie_word_embeddings=True,
)
ALL = ("head_logps", "prefix_logps")


@pytest.fixture(scope="module")
def setup():
    spec = ModelSpec(arch="qwen2", config=CONFIG, tokenizer="char")
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    train, _, _ = ArithmeticData(n_train=8, n_eval=2).load()
    pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
    # a few steps of language modelling on the pairs, so that some tokens are the model's top-1 and some not
    batch = collate(pairs[:4], tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    for _ in range(8):
        opt.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1)
        ).backward()
        opt.step()
    odd = [  # chosen a prefix of rejected, no common answer start, identical answers, an empty prompt
        TokenizedPair("prefix", pairs[0].prompt_ids, (40, 41), (40, 41, 42, 43)),
        TokenizedPair("disjoint", pairs[1].prompt_ids, (50, 51, 52), (60,)),
        TokenizedPair("same", pairs[2].prompt_ids, (70, 71, 72), (70, 71, 72)),
        TokenizedPair("no-prompt", (), (40, 44, 45), (40, 46)),
    ]
    return model, tok, pairs[:4] + odd


def naive(model, batch):
    """Every field from full [2B, T, V] logits, the textbook way."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    logp = torch.log_softmax(logits, -1)
    targets = batch.input_ids[:, 1:]
    tok = logp.gather(-1, targets[..., None]).squeeze(-1)
    mask = batch.completion_mask[:, 1:].float()
    counts = mask.sum(1)
    b = batch.num_pairs
    m = torch.minimum(counts[:b], counts[b:]).repeat(2)
    pos = mask.cumsum(1)
    log_sum_sq = torch.logsumexp(2 * logp, -1)
    entropy = -(logp.exp() * logp).sum(-1)
    top1 = (logits.argmax(-1) == targets).float()

    def seq(x):
        return (x * mask).sum(1)

    return {
        "chosen": seq(tok)[:b],
        "rejected": seq(tok)[b:],
        "chosen_tokens": counts[:b],
        "rejected_tokens": counts[b:],
        "chosen_prefix": seq(tok * (pos <= m[:, None]))[:b],
        "rejected_prefix": seq(tok * (pos <= m[:, None]))[b:],
        "chosen_head": seq(tok - log_sum_sq)[:b],
        "rejected_head": seq(tok - log_sum_sq)[b:],
        "chosen_entropy": seq(entropy)[:b],
        "rejected_entropy": seq(entropy)[b:],
        "chosen_top1": seq(top1)[:b],
    }


@pytest.mark.parametrize("packing", [False, True, "flat"])
@pytest.mark.parametrize("chunk_elements", [40, 1 << 22])  # 40: four vocabulary tiles (40, 40, 40, 8 columns)
def test_fields_equal_a_full_softmax(setup, packing, chunk_elements):
    model, tok, pairs = setup
    want = naive(model, collate(pairs, tok.pad_token_id))
    got = pair_logps(
        model, collate(pairs, tok.pad_token_id, packing=packing), chunk_elements, fields=ALL, diagnostics=True
    )
    for name, value in want.items():
        torch.testing.assert_close(getattr(got, name).detach().float(), value.detach(), rtol=1e-5, atol=1e-5, msg=name)
    assert 0 < float(got.chosen_top1.sum()) < float(got.chosen_tokens.sum())  # the comparison is not vacuous
    assert not got.chosen_head.requires_grad and got.chosen_prefix.requires_grad


def test_fields_are_computed_only_when_asked(setup):
    model, tok, pairs = setup
    plain = pair_logps(model, collate(pairs, tok.pad_token_id))
    assert all(getattr(plain, n) is None for n in ("chosen_prefix", "chosen_head", "chosen_entropy", "chosen_top1"))
    only = pair_logps(model, collate(pairs, tok.pad_token_id), fields=("prefix_logps",))
    assert only.chosen_prefix is not None and only.chosen_head is None and only.chosen_entropy is None
    with pytest.raises(ValueError, match="unknown PairLogps field groups"):
        pair_logps(model, collate(pairs, tok.pad_token_id), fields=("logits",))


@pytest.mark.parametrize("packing", [True, "flat"])
def test_prefix_gradients_equal_the_full_softmax(setup, packing):
    model, tok, pairs = setup

    def grads(fn):
        model.zero_grad()
        prefix = fn()
        (prefix * torch.linspace(-1.0, 2.0, len(prefix))).sum().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    def tiled():
        lp = pair_logps(model, collate(pairs, tok.pad_token_id, packing=packing), 40, fields=("prefix_logps",))
        return torch.cat([lp.chosen_prefix, lp.rejected_prefix])

    def full():
        f = naive(model, collate(pairs, tok.pad_token_id))
        return torch.cat([f["chosen_prefix"], f["rejected_prefix"]])

    a, b = grads(tiled), grads(full)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-4, atol=1e-5)


def test_ld_dpo_with_alpha_one_equals_dpo_on_model_log_probs(setup):
    model, tok, pairs = setup
    batch = collate(pairs, tok.pad_token_id, packing=True)
    policy = pair_logps(model, batch, fields=("prefix_logps",))
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(1.1)  # a reference that differs from the policy
        reference = pair_logps(model, batch, fields=("prefix_logps",))
        model.get_output_embeddings().weight.div_(1.1)
    ld = get_loss("ld_dpo", ld_alpha=1.0)(policy, reference).loss
    torch.testing.assert_close(ld, get_loss("dpo")(policy, reference).loss, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(get_loss("ld_dpo", ld_alpha=0.3)(policy, reference).loss, ld)


# ------------------------------------------------------------------ the reference cache


def _header(model, tok, pairs, fields=()):
    spec = ModelSpec(arch="qwen2", config=CONFIG, tokenizer="char")
    return refcache.cache_header(
        spec=spec,
        model=model,
        tokenizer=tok,
        data_fingerprint="arith-test",
        tokenize={},
        train_pairs=pairs[:6],
        eval_pairs=pairs[6:],
        fields=fields,
    )


def test_cache_key_changes_with_the_needed_fields_only(setup):
    model, tok, pairs = setup
    base = refcache.reference_key(_header(model, tok, pairs))
    assert "fields" not in _header(model, tok, pairs)  # the other losses' caches keep their keys
    keys = {refcache.reference_key(_header(model, tok, pairs, f)) for f in [("prefix_logps",), ("head_logps",), ALL]}
    assert len(keys) == 3 and base not in keys


@pytest.mark.parametrize("fields", [("prefix_logps",), ("head_logps",), ALL])
def test_cached_fields_equal_the_live_reference(setup, tmp_path, fields):
    model, tok, pairs = setup
    live_model = PairLogpsModel(model, fields=fields)
    header = _header(model, tok, pairs, fields)
    kwargs = dict(
        directory=tmp_path,
        header=header,
        logps=live_model,
        model=model,
        train_pairs=pairs[:6],
        eval_pairs=pairs[6:],
        pad_id=tok.pad_token_id,
        micro_batch_size=2,
        packing=True,
        device=torch.device("cpu"),
    )
    cache = refcache.build(**kwargs)
    reloaded = refcache.build(**kwargs)  # from the file this time
    assert torch.equal(reloaded.values, cache.values) and cache.values.shape == (8, 4 + 2 * len(fields))
    with torch.no_grad():
        live = live_model(collate(pairs[2:5], tok.pad_token_id))
    stored = reloaded(pairs[2:5])
    for group in fields:
        for name in refcache.FIELD_GROUPS[group]:
            torch.testing.assert_close(getattr(stored, name), getattr(live, name).float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stored.chosen, live.chosen.float(), rtol=1e-5, atol=1e-5)
    # a cache written for other fields is another file
    other = refcache.build(**{**kwargs, "header": _header(model, tok, pairs)})
    assert other.path != cache.path and other.values.shape == (8, 4)


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("loss", ["ld_dpo", "wpo"])
def test_cached_run_equals_live_run(tiny_run, tmp_path, loss):
    _, live = tiny_run(f"loss={loss}", "reference_cache=null", run_dir=tmp_path / "live")
    _, cached = tiny_run(f"loss={loss}", f"reference_cache={tmp_path / 'cache'}", run_dir=tmp_path / "cached")
    a, b = read_metrics(live), read_metrics(cached)
    keys = {k for r in a for k in r if k.startswith(("train/", "eval/")) and "time" not in k and "per_s" not in k}
    assert f"train/{loss}/" + ("tail_tokens" if loss == "ld_dpo" else "weight") in keys
    assert {"train/entropy", "train/mean_token_accuracy", "eval/entropy", "eval/mean_token_accuracy"} <= keys
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra:
                assert rb[k] == pytest.approx(ra[k], rel=1e-5, abs=1e-6), (ra["step"], k)
