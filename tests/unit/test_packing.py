"""Shared-prefix packing: one row per pair gives the padded layout's log-probs and gradients."""

from __future__ import annotations

import json

import pytest
import torch

from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import TokenizedPair, collate, tokenize_pairs
from prefopt.logprobs import pair_logps, sequence_logps, supports_packing
from prefopt.models import ModelSpec, load_model, load_tokenizer
from tests.helpers.config import TINY_SPEC

SPEC = TINY_SPEC


@pytest.fixture(scope="module", params=["qwen", "llama3"])
def setup(request):
    arch = "qwen2" if request.param == "qwen" else "llama"
    spec = ModelSpec(**{**SPEC, "arch": arch, "tokenizer_family": request.param})
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    train, _, _ = ArithmeticData(n_train=12, n_eval=2).load()
    pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
    odd = [  # chosen a prefix of rejected, no common answer start, identical answers, an empty prompt
        TokenizedPair("prefix", pairs[0].prompt_ids, (40, 41), (40, 41, 42, 43)),
        TokenizedPair("disjoint", pairs[1].prompt_ids, (50, 51, 52), (60,)),
        TokenizedPair("same", pairs[2].prompt_ids, (70, 71, 72), (70, 71, 72)),
        TokenizedPair("no-prompt", (), (40, 44, 45), (40, 46)),
    ]
    return model, tok, pairs, odd


def _grads(model, batch):
    model.zero_grad()
    sums, counts = sequence_logps(model, batch)
    (sums * torch.linspace(-1.0, 2.0, len(sums))).sum().backward()  # a different weight per sequence
    return sums.detach(), counts, {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same_logps_and_grads(model, expected, actual):
    """Two layouts of the same pairs: equal log-prob sums, token counts and parameter gradients (1e-5)."""
    s_exp, c_exp, g_exp = _grads(model, expected)
    s_act, c_act, g_act = _grads(model, actual)
    torch.testing.assert_close(s_act, s_exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_act, c_exp)
    for n in g_exp:
        torch.testing.assert_close(g_act[n], g_exp[n], rtol=1e-5, atol=1e-5, msg=n)


@pytest.mark.parametrize("which", ["arith", "odd", "mixed"])
def test_packed_equals_padded_values_and_gradients(setup, which):
    model, tok, pairs, odd = setup
    micro = {"arith": pairs[:6], "odd": odd, "mixed": pairs[6:9] + odd[:2]}[which]
    padded, packed = collate(micro, tok.pad_token_id), collate(micro, tok.pad_token_id, packing=True)
    assert packed.input_ids.shape[0] == len(micro) and padded.input_ids.shape[0] == 2 * len(micro)
    assert packed.num_tokens == padded.num_tokens  # tokens/s counts the same work in both layouts
    assert_same_logps_and_grads(model, padded, packed)


def test_packed_equals_padded_with_eager_attention(setup):
    _, tok, pairs, odd = setup
    model = load_model(ModelSpec(**{**SPEC, "attn_implementation": "eager"}), vocab_size=len(tok))
    micro = pairs[:4] + odd[:2]
    # an additive mask for eager attention
    assert_same_logps_and_grads(model, collate(micro, tok.pad_token_id), collate(micro, tok.pad_token_id, packing=True))


def test_packed_equals_padded_under_gradient_checkpointing(setup):
    """The backward pass recomputes each layer: the packed rows' kernel choice must hold there too, or torch
    refuses the recomputation (CheckpointError). Checkpointed packed rows give the plain padded layout's values."""
    model, tok, pairs, odd = setup
    arch = "qwen2" if "Qwen2" in type(model).__name__ else "llama"
    spec = ModelSpec(**{**SPEC, "arch": arch, "gradient_checkpointing": True})
    checkpointed = load_model(spec, vocab_size=len(tok))
    checkpointed.load_state_dict(model.state_dict())
    checkpointed.train()
    assert checkpointed.is_activation_checkpointing
    micro = pairs[:4] + odd[:2]
    s_exp, c_exp, g_exp = _grads(model, collate(micro, tok.pad_token_id))
    s_act, c_act, g_act = _grads(checkpointed, collate(micro, tok.pad_token_id, packing=True))
    torch.testing.assert_close(s_act, s_exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(c_act, c_exp)
    for n in g_exp:
        torch.testing.assert_close(g_act[n], g_exp[n], rtol=1e-5, atol=1e-5, msg=n)


def test_packed_layout_shares_the_prefix_and_isolates_the_answers(setup):
    _, tok, pairs, odd = setup
    p = odd[0]  # chosen (40, 41) is a prefix of rejected (40, 41, 42, 43)
    batch = collate([p], tok.pad_token_id, packing=True)
    n = len(p.prompt_ids)
    assert batch.input_ids[0].tolist() == list(p.prompt_ids) + [40, 41, 42, 43]  # trunk = prompt + 40 41
    assert batch.packed.position_ids[0].tolist() == list(range(n + 4))

    q = pairs[0]  # "a + b = X. ..." vs "a + b = Y. ...": a shared answer start, then two tails
    batch = collate([q], tok.pad_token_id, packing=True)
    t = n + next(i for i, (a, b) in enumerate(zip(q.chosen_ids, q.rejected_ids)) if a != b)
    tail_c, tail_r = len(q.chosen_ids) - (t - n), len(q.rejected_ids) - (t - n)
    pos = batch.packed.position_ids[0].tolist()
    assert pos[: t + tail_c] == list(range(t + tail_c)) and pos[t + tail_c : t + tail_c + tail_r] == list(
        range(t, t + tail_r)
    )
    mask = batch.packed.mask[0, 0]
    chosen = slice(t, t + tail_c)
    rejected = slice(t + tail_c, t + tail_c + tail_r)
    assert not mask[rejected, chosen].any()  # the rejected answer never sees the chosen one
    assert mask[rejected, :t].all() and mask[chosen, :t].all()  # both see the whole trunk
    assert not mask.triu(1).any()  # causal
    # shared answer tokens are scored once and counted for both sequences
    shared = t - n
    assert batch.packed.counts.tolist() == [len(q.chosen_ids), len(q.rejected_ids)]
    assert len(batch.packed.score_target) == shared + tail_c + tail_r


@pytest.mark.parametrize("layout", ["true", "flat"])
def test_a_run_with_packing_equals_one_without(tiny_run, tmp_path, layout):
    def losses(run_dir):
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [
            (r["step"], k, v)
            for r in rows
            for k, v in sorted(r.items())
            if k.startswith(("train/loss", "eval/loss", "train/logps", "train/rewards/margins"))
        ]

    _, packed = tiny_run(f"train.packing={layout}", run_dir=tmp_path / "packed")
    _, padded = tiny_run("train.packing=false", run_dir=tmp_path / "padded")
    a, b = losses(packed), losses(padded)
    assert [x[:2] for x in a] == [x[:2] for x in b] and a
    for (step, key, va), (_, _, vb) in zip(a, b):
        assert va == pytest.approx(vb, rel=1e-5, abs=1e-5), (step, key)


def test_attention_without_4d_masks_falls_back_to_padded_rows(setup):
    model, *_ = setup
    assert supports_packing(model)
    impl = model.config._attn_implementation
    try:
        model.config._attn_implementation = "flash_attention_2"
        assert not supports_packing(model)
    finally:
        model.config._attn_implementation = impl


def test_pair_logps_split_chosen_and_rejected_in_both_layouts(setup):
    model, tok, pairs, _ = setup
    with torch.no_grad():
        a = pair_logps(model, collate(pairs[:3], tok.pad_token_id))
        b = pair_logps(model, collate(pairs[:3], tok.pad_token_id, packing=True))
    torch.testing.assert_close(b.chosen, a.chosen, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.rejected, a.rejected, rtol=1e-5, atol=1e-5)
    assert b.chosen_tokens.tolist() == [len(p.chosen_ids) for p in pairs[:3]]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("which", ["arith", "odd"])
def test_flat_layout_equals_padded_values_and_gradients(setup, attn, which):
    """One row of 2B sequences, position ids restarting, no mask: transformers separates the sequences (the
    variable-length path flash-attention takes on a GPU), and the log-probs and gradients equal the padded ones."""
    _, tok, pairs, odd = setup
    model = load_model(ModelSpec(**{**SPEC, "attn_implementation": attn}), vocab_size=len(tok))
    micro = {"arith": pairs[:5], "odd": odd}[which]
    padded, flat = collate(micro, tok.pad_token_id), collate(micro, tok.pad_token_id, packing="flat")
    lengths = [len(p.prompt_ids) + len(p.chosen_ids) for p in micro] + [
        len(p.prompt_ids) + len(p.rejected_ids) for p in micro
    ]
    assert flat.input_ids.shape == (1, sum(lengths)) and flat.packed.mask is None  # no padding at all
    assert flat.num_tokens == padded.num_tokens
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    assert all(flat.packed.position_ids[0, s].item() == 0 for s in starts)
    assert_same_logps_and_grads(model, padded, flat)


def test_packing_setting_picks_the_layout_the_attention_takes(setup):
    from prefopt.errors import ConfigError
    from prefopt.logprobs import packing_layout

    model, *_ = setup
    impl = model.config._attn_implementation
    assert packing_layout(True, model) == "shared_prefix" and packing_layout(False, model) is None
    assert packing_layout("flat", model) == "flat"
    try:
        model.config._attn_implementation = "flash_attention_2"  # takes no 4D mask: its varlen kernel instead
        assert packing_layout(True, model) == "flat"
        with pytest.raises(ConfigError, match="shared_prefix needs attention that takes a 4D mask"):
            packing_layout("shared_prefix", model)
    finally:
        model.config._attn_implementation = impl
    with pytest.raises(ConfigError, match="train.packing must be"):
        packing_layout("zigzag", model)


@pytest.mark.parametrize("layout", ["shared_prefix", "flat"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_reward_model_reads_the_same_rewards_from_packed_rows(setup, tmp_path, layout, attention):
    """The reward stage's pair model: the classifier's score at each sequence's last token, equal (values and
    gradients) whether the pairs come as padded rows (the model's own forward) or packed ones."""
    from prefopt.mathloop.reward.bradley_terry import PairRewardsModel, packs, reward_model_from

    causal, tok, pairs, odd = setup
    causal.save_pretrained(tmp_path)
    model = reward_model_from(tmp_path, tok.pad_token_id, seed=0)
    model.config._attn_implementation = attention
    assert type(model).__name__.endswith("ForSequenceClassification") and packs(model)
    torch.nn.init.normal_(model.score.weight, std=0.5)  # a head that tells the sequences apart
    micro = pairs[:5] + odd
    weights = torch.linspace(-1.0, 2.0, len(micro))

    def run(batch):
        model.zero_grad()
        out = PairRewardsModel(model)(batch)
        ((out.chosen - out.rejected) * weights).sum().backward()
        assert out.chosen_tokens.tolist() == [1.0] * len(micro)
        return out.chosen.detach(), out.rejected.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    c_exp, r_exp, g_exp = run(collate(micro, tok.pad_token_id))
    c_act, r_act, g_act = run(collate(micro, tok.pad_token_id, packing=layout))
    assert len(set(c_exp.tolist()) | set(r_exp.tolist())) > len(micro)  # not a constant
    torch.testing.assert_close(c_act, c_exp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r_act, r_exp, rtol=1e-5, atol=1e-5)
    # "same": identical answers read identical rewards; "prefix": the chosen answer ends inside the rejected one's row
    same = [p.pair_id for p in micro].index("same")
    torch.testing.assert_close(c_act[same], r_act[same])
    for n in g_exp:  # float32 sums in another order: 1e-4 of the largest gradient
        scale = 1e-4 * float(g_exp[n].abs().max())
        torch.testing.assert_close(g_act[n], g_exp[n], rtol=1e-4, atol=scale, msg=lambda m, n=n: f"{n}: {m}")


def test_reward_model_runs_under_the_hardware_autocast(setup, tmp_path):
    """hardware.mixed_precision=bf16 reaches the reward stage's pair model: its forward runs under bf16 autocast
    (rewards a bf16 rounding away from float32's, returned as float32)."""
    from prefopt.mathloop.reward.bradley_terry import PairRewardsModel, reward_model_from

    causal, tok, pairs, _ = setup
    causal.save_pretrained(tmp_path)
    model = reward_model_from(tmp_path, tok.pad_token_id, seed=0)
    torch.nn.init.normal_(model.score.weight, std=0.5)
    batch = collate(pairs[:6], tok.pad_token_id, packing=True)
    with torch.no_grad():
        full, half = PairRewardsModel(model)(batch), PairRewardsModel(model, autocast=torch.bfloat16)(batch)
    assert half.chosen.dtype == torch.float32 and not torch.equal(half.chosen, full.chosen)
    torch.testing.assert_close(half.chosen, full.chosen, rtol=0.05, atol=0.05)
    torch.testing.assert_close(half.rejected, full.rejected, rtol=0.05, atol=0.05)
