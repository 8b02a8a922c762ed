"""The engine's arithmetic: log-probs, masking, accumulation, DPO at step 0, determinism."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import PairBatcher, collate, tokenize_pairs
from prefopt.logprobs import pair_logps, plain_sequence_logps, sequence_logps
from prefopt.losses import get_loss
from prefopt.models import ModelSpec, load_model, load_tokenizer
from tests.helpers.config import TINY_SPEC

SPEC = TINY_SPEC


@pytest.fixture(scope="module")
def setup():
    spec = ModelSpec(**SPEC)
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    train, _, _ = ArithmeticData(n_train=12, n_eval=2).load()
    pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
    return model, tok, pairs


def manual_logps(model, prompt, completion):
    """Log-prob of `completion` after `prompt`, one unpadded sequence, by the textbook formula."""
    ids = torch.tensor([list(prompt) + list(completion)])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    n = len(prompt)
    return sum(float(logp[n - 1 + i, tok]) for i, tok in enumerate(completion))


def test_concatenated_forward_equals_separate_unpadded_forwards(setup):
    model, tok, pairs = setup
    batch = collate(pairs[:4], tok.pad_token_id)
    assert batch.input_ids.shape[0] == 8  # chosen rows then rejected rows, one forward
    with torch.no_grad():
        lp = pair_logps(model, batch)
    for i, p in enumerate(pairs[:4]):
        assert lp.chosen[i].item() == pytest.approx(manual_logps(model, p.prompt_ids, p.chosen_ids), abs=1e-4)
        assert lp.rejected[i].item() == pytest.approx(manual_logps(model, p.prompt_ids, p.rejected_ids), abs=1e-4)
        assert lp.chosen_tokens[i].item() == len(p.chosen_ids)
        assert lp.rejected_tokens[i].item() == len(p.rejected_ids)


def test_prompt_and_padding_never_count(setup):
    model, tok, pairs = setup
    batch = collate(pairs[:3], tok.pad_token_id)
    for r, row in enumerate(batch.completion_mask):
        p = pairs[r % 3]
        n_prompt = len(p.prompt_ids)
        completion = p.chosen_ids if r < 3 else p.rejected_ids
        assert not row[:n_prompt].any()
        assert row.sum() == len(completion)
        assert not row[n_prompt + len(completion) :].any()  # padding
    # Changing the padding token changes nothing.
    other = collate(pairs[:3], pad_id=7)
    with torch.no_grad():
        a, _ = sequence_logps(model, batch)
        b, _ = sequence_logps(model, other)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("chunk_elements", [128, 1000, 1 << 25])
def test_chunked_logps_equal_plain_values_and_gradients(setup, chunk_elements):
    model, tok, pairs = setup
    batch = collate(pairs[:4], tok.pad_token_id)
    model.zero_grad()
    plain, _ = plain_sequence_logps(model, batch)
    plain.sum().backward()
    g_plain = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    chunked, _ = sequence_logps(model, batch, chunk_elements=chunk_elements)
    chunked.sum().backward()
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, g_plain[n], atol=1e-5, rtol=1e-4, msg=n)


def test_dpo_loss_at_step_zero_is_ln2(setup):
    model, tok, pairs = setup
    import copy

    reference = copy.deepcopy(model).eval()
    batch = collate(pairs[:4], tok.pad_token_id)
    out = get_loss("dpo")(pair_logps(model, batch), pair_logps(reference, batch))
    torch.testing.assert_close(out.loss, torch.full((4,), math.log(2)))


def _grads_after(model, micro, pairs, tok, cfg_overrides=None):
    import copy

    from prefopt.engine import TrainConfig, Trainer, TrainerParts
    from prefopt.hardware import Hardware
    from prefopt.reference_providers import FrozenReference

    policy = copy.deepcopy(model)
    reference = copy.deepcopy(model).eval()
    cfg = TrainConfig(steps=1, batch_size=8, micro_batch_size=micro, progress=False)
    parts = TrainerParts(
        policy=policy,
        reference=FrozenReference(reference),
        loss=get_loss("dpo", beta=0.5),
        optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.0),
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        train_pairs=pairs,
        eval_pairs=[],
        pad_id=tok.pad_token_id,
        seed=0,
        max_grad_norm=None,
    )
    t = Trainer(parts, cfg, Hardware(device="cpu"), "/nonexistent").setup()
    # one pass of step 0 without the optimizer: make the reference differ so gradients are not trivial
    with torch.no_grad():
        for p in reference.parameters():
            p.add_(0.01 * torch.randn_like(p, generator=torch.Generator().manual_seed(p.numel())))
    sums, _ = t.accumulate(t.batcher.batch(0), 0)
    return {n: p.grad.clone() for n, p in policy.named_parameters()}, sums.means("train")


def test_gradient_accumulation_equals_full_batch(setup):
    model, tok, pairs = setup
    full, m_full = _grads_after(model, 8, pairs, tok)
    acc, m_acc = _grads_after(model, 2, pairs, tok)
    for n in full:
        torch.testing.assert_close(acc[n], full[n], atol=1e-6, rtol=1e-5, msg=n)
    for k in m_full:
        assert m_acc[k] == pytest.approx(m_full[k], rel=1e-6, abs=1e-5), k  # float32: sums of ~40 log-probs


def test_batch_order_is_a_pure_function_of_seed_and_step(setup):
    _, _, pairs = setup
    a, b = PairBatcher(pairs, 4, seed=3), PairBatcher(pairs, 4, seed=3)
    assert [a.batch_ids(s) for s in range(6)] == [b.batch_ids(s) for s in range(6)]
    epoch = sum((a.batch_ids(s) for s in range(3)), [])  # 12 pairs = one epoch
    assert sorted(epoch) == sorted(p.pair_id for p in pairs)  # no pair twice within an epoch
    assert [a.batch_ids(s) for s in range(3)] != [PairBatcher(pairs, 4, seed=4).batch_ids(s) for s in range(3)]
    # data-parallel shards of a step are disjoint and together give the global batch
    r0, r1 = PairBatcher(pairs, 4, 3, rank=0, world_size=2), PairBatcher(pairs, 4, 3, rank=1, world_size=2)
    assert r0.batch_ids(1) + r1.batch_ids(1) == a.batch_ids(1)
