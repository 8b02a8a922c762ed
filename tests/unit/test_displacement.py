"""Token-level displacement: per-token log-probs against a naive full-vocabulary computation in every layout, the
per-pair changes and bins on hand-made numbers, the reference cache's per-token values, and the W&B histograms."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prefopt import displacement, refcache
from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import TokenizedPair, collate, tokenize_pairs
from prefopt.logprobs import PairLogpsModel, pair_logps
from prefopt.models import ModelSpec, load_model, load_tokenizer
from prefopt.tracking import RunLog
from tests.helpers.config import TINY_SPEC

LAYOUTS = [None, "flat", "shared_prefix"]


@pytest.fixture(scope="module")
def setup():
    spec = ModelSpec(**TINY_SPEC)
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    rows, _, _ = ArithmeticData(n_train=6, n_eval=2).load()
    pairs, _ = tokenize_pairs(rows, tok, max_length=128, max_prompt_length=64)
    odd = [  # chosen a prefix of rejected (a long shared prefix), identical answers, an empty prompt
        TokenizedPair("prefix", pairs[0].prompt_ids, (40, 41), (40, 41, 42, 43)),
        TokenizedPair("same", pairs[1].prompt_ids, (70, 71, 72), (70, 71, 72)),
        TokenizedPair("no-prompt", (), (40, 44, 45), (40, 46)),
    ]
    return model, tok, pairs + odd


def naive_tokens(model, pairs, pad_id):
    """Each sequence's completion-token log-probs from full [2B, T, V] logits and a full log_softmax."""
    batch = collate(pairs, pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()[:, :-1]
    logp = torch.log_softmax(logits, -1).gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    mask = batch.completion_mask[:, 1:].bool()
    return [logp[s][mask[s]] for s in range(logp.shape[0])]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_per_token_logps_equal_a_full_vocabulary_log_softmax(setup, layout):
    model, tok, pairs = setup
    expected = naive_tokens(model, pairs, tok.pad_token_id)
    with torch.no_grad():
        lp = pair_logps(model, collate(pairs, tok.pad_token_id, packing=layout), chunk_elements=512, per_token=True)
    b = len(pairs)
    counts = torch.cat([lp.chosen_tokens, lp.rejected_tokens]).long().tolist()
    rows = torch.cat([lp.chosen_token_logps, lp.rejected_token_logps])
    for s in range(2 * b):
        assert counts[s] == len(expected[s])
        torch.testing.assert_close(rows[s, : counts[s]], expected[s], rtol=1e-5, atol=1e-5)
        assert not rows[s, counts[s] :].any()  # zeros past the completion
    # the sums the losses read are the per-token values summed
    torch.testing.assert_close(lp.chosen, lp.chosen_token_logps.sum(1), rtol=1e-5, atol=1e-5)
    plain = pair_logps(model, collate(pairs, tok.pad_token_id, packing=layout), chunk_elements=512)
    assert plain.chosen_token_logps is None  # only asked for by the evaluation


def test_response_change_on_worked_numbers():
    policy, reference = [-1.0, -2.0, -0.5, -3.0, -1.5], [-1.5, -1.0, -0.5, -2.0, -2.5]  # d = .5, -1, 0, -1, 1
    c = displacement.response_change(policy, reference)
    assert c["tokens"] == 5 and c["logp"] == -8.0 and c["ref_logp"] == -7.5
    assert c["delta"] == pytest.approx(-0.5) and c["delta_per_token"] == pytest.approx(-0.1)
    # token t is in bin floor(10 (t + 1/2) / 5) = 1, 3, 5, 7, 9
    assert c["bins"] == [None, 0.5, None, -1.0, None, 0.0, None, -1.0, None, 1.0]
    assert c["first"] == pytest.approx(-0.375) and c["rest"] == pytest.approx(1.0)
    assert c["token_delta"] == [0.5, -1.0, 0.0, -1.0, 1.0]
    two = displacement.response_change(policy, reference, bins=2, first=1)  # bins floor(2 (t + 1/2) / 5): 0 0 1 1 1
    assert two["bins"] == [pytest.approx(-0.25), pytest.approx(0.0)]
    assert two["first"] == 0.5 and two["rest"] == pytest.approx(-0.25)
    short = displacement.response_change([-1.0, -1.0], [-0.5, -2.0])
    assert short["rest"] is None and short["first"] == pytest.approx(0.25)


def _row(pair_id, chosen_delta, chosen_n, rejected_delta, rejected_n):
    """A pair whose every token changed by the same amount, the reference at zero."""
    c, r = np.full(chosen_n, chosen_delta / chosen_n), np.full(rejected_n, rejected_delta / rejected_n)
    return (pair_id, c, np.zeros(chosen_n), r, np.zeros(rejected_n))


def test_pair_records_and_summary_on_worked_numbers():
    rows = [
        _row("a", -2.0, 4, -3.0, 2),
        _row("b", -1.0, 4, 0.5, 1),
        _row("c", 0.5, 5, -1.0, 4),
        _row("d", 1.0, 10, 2, 8),
    ]
    texts = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    records = [displacement.pair_record(7, row, texts) for row in rows]
    a = records[0]
    assert a["step"] == 7 and a["pair_id"] == "a" and a["chosen_tokens"] == 4 and a["rejected_tokens"] == 2
    assert a["chosen_delta"] == pytest.approx(-2.0) and a["chosen_delta_per_token"] == pytest.approx(-0.5)
    assert a["margin_delta"] == pytest.approx(1.0)  # -2 - (-3)
    assert a["prompt_text"] == "q" and a["chosen_text"] == "good" and a["rejected_text"] == "bad"
    s = displacement.summary(records)
    p = displacement.PREFIX
    assert s[p + "chosen_fell"] == 0.5 and s[p + "rejected_fell"] == 0.5  # a, b fell; a, c fell
    assert s[p + "both_fell"] == 0.25 and s[p + "margin_grew"] == 0.5  # margins 1, -1.5, 1.5, -1
    assert s[p + "chosen_fell_mean"] == pytest.approx(-1.5) and s[p + "chosen_fell_median"] == pytest.approx(-1.5)
    assert s[p + "chosen_fell_mean_per_token"] == pytest.approx(-0.375)  # -0.5 and -0.25
    assert s[p + "chosen_delta_per_token_p50"] == pytest.approx(np.median([-0.5, -0.25, 0.1, 0.1]))
    assert s[p + "chosen_first_delta_per_token"] == pytest.approx(np.mean([-0.5, -0.25, 0.1, 0.1]))
    assert s[p + "rejected_rest_delta_per_token"] == pytest.approx(0.25)  # only d has more than 4 rejected tokens
    grew = [displacement.pair_record(1, _row("x", 1.0, 3, 0.0, 3), {})]
    assert p + "chosen_fell_mean" not in displacement.summary(grew)  # no size where no pair fell
    assert sorted(r["pair_id"] for r in displacement.most_displaced(records, 2)) == ["a", "b"]
    hist = displacement.histograms(records)
    assert hist[p + "hist/chosen_delta"].tolist() == pytest.approx([-2.0, -1.0, 0.5, 1.0])
    profile = displacement.profile(records, "chosen")
    assert profile.shape == (4, displacement.BINS) and profile[0, 1] == pytest.approx(-0.5)
    assert np.isnan(profile[0, 0])  # 4 tokens: bins 1, 3, 6, 8


def _cache_kwargs(model, tok, pairs, tmp_path, layout):
    header = {"format": refcache.FORMAT, "what": "per-token test", "layout": str(layout)}
    return dict(
        directory=tmp_path,
        header=header,
        logps=PairLogpsModel(model, chunk_elements=512),
        model=model,
        train_pairs=pairs[:4],
        eval_pairs=pairs[4:],
        pad_id=tok.pad_token_id,
        micro_batch_size=2,
        packing=layout,
        device=torch.device("cpu"),
    )


@pytest.mark.parametrize("layout", LAYOUTS)
def test_cached_per_token_reference_equals_the_live_one(setup, tmp_path, layout):
    model, tok, pairs = setup
    kwargs = _cache_kwargs(model, tok, pairs, tmp_path, layout)
    refcache.build(**kwargs)
    cache = refcache.build(**kwargs)  # read from the file
    evals = pairs[4:]
    with torch.no_grad():
        live = PairLogpsModel(model, chunk_elements=512)(collate(evals, tok.pad_token_id, packing=layout), True)
    stored = cache.logps(None, evals, per_token=True)
    for name in ("chosen_token_logps", "rejected_token_logps"):
        a, b = getattr(stored, name), getattr(live, name)
        torch.testing.assert_close(a[:, : b.shape[1]], b.float(), rtol=1e-5, atol=1e-5)
    with pytest.raises(Exception, match="no per-token values"):
        cache.tokens(pairs[:1])  # a training pair: sums only


def test_a_cache_file_without_per_token_values_is_completed_under_its_key(setup, tmp_path, caplog):
    model, tok, pairs = setup
    kwargs = _cache_kwargs(model, tok, pairs, tmp_path, "shared_prefix")
    first = refcache.build(**kwargs)
    key = refcache.reference_key(kwargs["header"])
    tensors = load_file(str(first.path))
    refcache.save(first.path, key, kwargs["header"], {k: tensors[k] for k in ("train", "eval")})  # an older file
    caplog.set_level(logging.INFO, logger="prefopt")
    again = refcache.build(**kwargs)
    assert "loaded 9 pairs" in caplog.text and "added the held-out pairs' per-token values" in caplog.text
    assert again.path == first.path and torch.equal(again.values, first.values)
    for side in range(2):
        torch.testing.assert_close(again.tokens(pairs[4:])[side], first.tokens(pairs[4:])[side])
    assert set(load_file(str(first.path))) == {"train", "eval", *refcache.TOKEN_TENSORS}
    caplog.clear()
    refcache.build(**kwargs)
    assert "loaded 9 pairs" in caplog.text and "added" not in caplog.text
    # per-token values that do not fit the token counts: a damaged file, rebuilt
    bad = dict(tensors, **{refcache.TOKEN_TENSORS[0]: tensors[refcache.TOKEN_TENSORS[0]][:-1]})
    refcache.save(first.path, key, kwargs["header"], bad)
    caplog.clear()
    refcache.build(**kwargs)
    assert "do not match its token counts" in caplog.text and "computed 9 pairs" in caplog.text


class _Run:
    def __init__(self):
        self.logged = []

    def log(self, row):
        self.logged.append(row)


def test_histograms_go_to_wandb_as_histograms(tmp_path):
    import wandb

    run_log = RunLog(tmp_path, {})
    run_log.log_histograms(3, {"x": np.array([1.0, 2.0])})  # no W&B: nothing, no error
    run_log.wandb = _Run()
    run_log.log_histograms(4, {"eval/displacement/hist/chosen_delta": np.array([-1.0, 0.5, 2.0]), "empty": []})
    (row,) = run_log.wandb.logged
    assert row["step"] == 4 and set(row) == {"step", "eval/displacement/hist/chosen_delta"}
    hist = row["eval/displacement/hist/chosen_delta"]
    assert isinstance(hist, wandb.Histogram) and sum(hist.histogram) == 3
