"""α-DPO's running statistics: updates by hand, eval mode, checkpoint round-trip, and the global batch under DDP."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from prefopt.losses import PairLogps, get_loss

# (ℓ_w, ℓ_l, ℓʳ_w, ℓʳ_l, n_w, n_l)
BATCH1 = [
    (-12.0, -15.0, -13.0, -13.0, 4, 6),
    (-20.0, -18.0, -19.0, -21.0, 8, 6),
    (-7.5, -9.0, -6.0, -12.5, 5, 10),
    (-30.0, -24.0, -33.0, -22.0, 10, 12),
    (-4.0, -11.0, -5.0, -9.5, 2, 7),
]
BATCH2 = [
    (-9.0, -14.0, -8.0, -16.0, 3, 7),
    (-16.0, -10.0, -15.5, -12.0, 8, 4),
    (-21.0, -27.0, -22.5, -25.0, 7, 9),
    (-6.0, -5.0, -6.5, -3.0, 6, 5),
    (-13.0, -19.0, -11.0, -20.0, 13, 19),
]


def batch(pairs, grad=False):
    col = list(zip(*pairs))
    t = lambda i: torch.tensor(col[i], dtype=torch.float64)  # noqa: E731
    policy = PairLogps(t(0).requires_grad_(grad), t(1).requires_grad_(grad), torch.tensor(col[4]), torch.tensor(col[5]))
    return policy, PairLogps(t(2), t(3), torch.tensor(col[4]), torch.tensor(col[5]))


def nls(z):  # −log σ(z) = log(1 + e^{−z}), written so a huge −z does not overflow
    return math.log1p(math.exp(-z)) if z > -30 else -z + math.log1p(math.exp(z))


def hand_step(pairs, mu, s, train, beta=2.5, gamma=1.5, alpha=0.2, m=0.9):
    """The spec's α-DPO step in plain Python: returns (per-pair losses, μ, s, mean margin)."""
    deltas = [(lw / nw - ll / nl) - (Lw / nw - Ll / nl) for lw, ll, Lw, Ll, nw, nl in pairs]
    if train:
        mu = m * mu + (1 - m) * statistics.mean(deltas)
        s = m * s + (1 - m) * (statistics.stdev(deltas) if len(deltas) > 1 else 0.0)
    margins = [alpha * (d - mu) / max(s, 1e-8) for d in deltas]
    losses = [nls(beta * (lw / nw - ll / nl - M) - gamma) for (lw, ll, _, _, nw, nl), M in zip(pairs, margins)]
    return losses, mu, s, statistics.mean(margins)


def test_state_update_over_two_batches_by_hand():
    loss = get_loss("alpha_dpo")
    mu = s = 0.0
    for pairs in (BATCH1, BATCH2):
        expected, mu, s, margin = hand_step(pairs, mu, s, train=True)
        out = loss(*batch(pairs))
        assert out.loss.tolist() == pytest.approx(expected, rel=1e-10)
        assert out.metrics["alpha_dpo/mu"].item() == pytest.approx(mu, rel=1e-6)
        assert out.metrics["alpha_dpo/std"].item() == pytest.approx(s, rel=1e-6)
        assert out.metrics["alpha_dpo/margin"].item() == pytest.approx(margin, rel=1e-5, abs=1e-7)
        state = loss.state_dict()
        assert state["mu"] == pytest.approx(mu, rel=1e-12) and state["std"] == pytest.approx(s, rel=1e-12)
    assert loss.state_dict()["steps"] == 2


def test_first_batch_numbers():
    # Batch 1's Δ = r̂_w/n_w − r̂_l/n_l, worked out: 1/4 + 2/6, −1/8 − 3/6, −1.5/5 − 3.5/10, 3/10 + 2/12, 1/2 + 1.5/7.
    d = [7 / 12, -5 / 8, -13 / 20, 0.3 + 1 / 6, 0.5 + 3 / 14]
    mean = sum(d) / 5
    std = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)  # unbiased
    loss = get_loss("alpha_dpo")
    loss(*batch(BATCH1))
    assert loss.state_dict()["mu"] == pytest.approx(0.1 * mean, rel=1e-12)
    assert loss.state_dict()["std"] == pytest.approx(0.1 * std, rel=1e-12)


def test_eval_mode_uses_but_does_not_update_the_statistics():
    loss = get_loss("alpha_dpo")
    _, mu, s, _ = hand_step(BATCH1, 0.0, 0.0, train=True)
    loss(*batch(BATCH1))
    before = loss.state_dict()
    loss.eval()
    out = loss(*batch(BATCH2))
    assert loss.state_dict() == before
    expected, _, _, _ = hand_step(BATCH2, mu, s, train=False)
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-10)
    loss.train()
    loss(*batch(BATCH2))
    assert loss.state_dict()["steps"] == 2 and loss.state_dict() != before


def test_construction_does_not_touch_the_statistics():
    assert get_loss("alpha_dpo").state_dict() == {"mu": 0.0, "std": 0.0, "steps": 0}


def test_state_dict_round_trip():
    a = get_loss("alpha_dpo", momentum=0.5)
    a(*batch(BATCH1))
    b = get_loss("alpha_dpo", momentum=0.5)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    torch.testing.assert_close(b(*batch(BATCH2)).loss, a(*batch(BATCH2)).loss, rtol=0, atol=0)
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError, match="mu, std"):
        b.load_state_dict({"mean": 1.0})


def test_margin_carries_no_gradient():
    # With M a constant, ∂loss/∂ℓ_w = −β σ(−x)/n_w and ∂loss/∂ℓ_l = +β σ(−x)/n_l, x = β(ℓ̄_w − ℓ̄_l − M) − γ.
    loss = get_loss("alpha_dpo")
    policy, reference = batch(BATCH1, grad=True)
    out = loss(policy, reference)
    out.loss.sum().backward()
    _, mu, s, _ = hand_step(BATCH1, 0.0, 0.0, train=True)
    for i, (lw, ll, Lw, Ll, nw, nl) in enumerate(BATCH1):
        d = (lw / nw - ll / nl) - (Lw / nw - Ll / nl)
        x = 2.5 * (lw / nw - ll / nl - 0.2 * (d - mu) / s) - 1.5
        sig = 1 / (1 + math.exp(x))
        assert policy.chosen.grad[i].item() == pytest.approx(-2.5 * sig / nw, rel=1e-9)
        assert policy.rejected.grad[i].item() == pytest.approx(2.5 * sig / nl, rel=1e-9)


def test_single_pair_batch_has_zero_std_and_stays_finite():
    # The unbiased std of one value is undefined; it counts as 0 and the epsilon guard keeps M finite.
    loss = get_loss("alpha_dpo")
    out = loss(*batch(BATCH1[:1]))
    assert loss.state_dict()["std"] == 0.0
    assert torch.isfinite(out.loss).all()
    expected, _, _, _ = hand_step(BATCH1[:1], 0.0, 0.0, train=True)
    assert out.loss.tolist() == pytest.approx(expected)
    assert out.loss.item() > 1e6  # M = α·Δ·0.9/1e-8: the guard keeps it finite, not small


# ------------------------------------------------------------------ data parallel: the global batch


def _ddp_worker(rank, world_size, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loss = get_loss("alpha_dpo")
        losses, margins = [], []
        for pairs in (BATCH1, BATCH2):
            part = pairs[:3] if rank == 0 else pairs[3:]  # unequal halves: 3 and 2 pairs
            out = loss(*batch(part))
            losses.append(out.loss.tolist())
            margins.append(out.metrics["alpha_dpo/margin"].item())
        torch.save({"state": loss.state_dict(), "losses": losses}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(180)
def test_two_process_gloo_statistics_use_the_global_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = get_loss("alpha_dpo")
    for step, pairs in enumerate((BATCH1, BATCH2)):
        whole = single(*batch(pairs)).loss.tolist()
        assert r0["losses"][step] + r1["losses"][step] == pytest.approx(whole, rel=1e-12)
    assert r0["state"] == r1["state"]
    assert r0["state"]["mu"] == pytest.approx(single.state_dict()["mu"], rel=1e-12)
    assert r0["state"]["std"] == pytest.approx(single.state_dict()["std"], rel=1e-12)
    assert r0["state"]["steps"] == 2
