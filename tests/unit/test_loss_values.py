"""Loss values against hand computations in plain `math`, gradient signs, limiting cases, reference handling."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.losses import LOSS_KEYS, LossOutput, PairLogps, get_loss
from prefopt.losses.base import log1mexp

# Three pairs with distinct numbers: (ℓ_w, ℓ_l, ℓʳ_w, ℓʳ_l, n_w, n_l).
#   pair 0: r̂_w = 1,    r̂_l = -2,  h = 3     ℓ̄_w = -3,   ℓ̄_l = -2.5
#   pair 1: r̂_w = -1,   r̂_l = 3,   h = -4    ℓ̄_w = -2.5, ℓ̄_l = -3
#   pair 2: r̂_w = -1.5, r̂_l = 3.5, h = -5    ℓ̄_w = -1.5, ℓ̄_l = -0.9
PAIRS = [
    (-12.0, -15.0, -13.0, -13.0, 4, 6),
    (-20.0, -18.0, -19.0, -21.0, 8, 6),
    (-7.5, -9.0, -6.0, -12.5, 5, 10),
]
# The optional fields, per pair: ℓ_{≤m} of policy (w, l) and reference (w, l), m = min(n_w, n_l), and the
# policy's head sums Σ_t (log p_t − log Σ_v p_v²) (w, l). The shorter completion's prefix is its whole sum.
#   pair 0: m = 4 (n_w),  pair 1: m = 6 (n_l),  pair 2: m = 5 (n_w)
EXTRA = [
    (-12.0, -10.0, -13.0, -9.0, -2.0, -3.0),
    (-14.0, -18.0, -15.0, -21.0, -1.0, -4.5),
    (-7.5, -4.0, -6.0, -7.0, 0.5, -2.0),
]
REFERENCE_FREE = {"simpo", "orpo", "cpo", "sft"}
# The keys of the spec's first table; the second batch has its own file (test_losses_second.py).
FIRST_BATCH = [
    "dpo",
    "cdpo",
    "robust",
    "ipo",
    "slic",
    "caldpo",
    "simpo",
    "alpha_dpo",
    "bpo",
    "dpop",
    "rdpo",
    "orpo",
    "nca",
    "apo_zero",
    "apo_down",
    "rpo",
    "typo",
]


def batch(pairs=PAIRS, grad=False, dtype=torch.float64, extra=None):
    col = list(zip(*pairs))
    t = lambda i: torch.tensor(col[i], dtype=dtype)  # noqa: E731
    ext = list(zip(*(extra if extra is not None else EXTRA[: len(pairs)])))
    e = lambda i: torch.tensor(ext[i], dtype=dtype) if ext else None  # noqa: E731
    policy = PairLogps(
        t(0).requires_grad_(grad),
        t(1).requires_grad_(grad),
        torch.tensor(col[4]),
        torch.tensor(col[5]),
        chosen_prefix=e(0),
        rejected_prefix=e(1),
        chosen_head=e(4),
        rejected_head=e(5),
    )
    reference = PairLogps(
        t(2), t(3), torch.tensor(col[4]), torch.tensor(col[5]), chosen_prefix=e(2), rejected_prefix=e(3)
    )
    return policy, reference


# ------------------------------------------------------------------ plain-math versions of the spec's formulas


def sig(z):
    return 1 / (1 + math.exp(-z))


def nls(z):  # −log σ(z)
    return -math.log(sig(z))


def parts(p):
    lw, ll, Lw, Ll, nw, nl = p
    return lw - Lw, ll - Ll, lw / nw, ll / nl, nw, nl


def f_score(r, divergence="reverse_kl", a=0.5):
    if divergence == "forward_kl":
        return 1 - math.exp(-r)
    if divergence == "js":
        return math.log(2) + math.log(sig(r))
    if divergence == "alpha" and a != 1:
        return (math.exp((a - 1) * r) - 1) / (a - 1)
    return r


def hand(key, p, **hp):
    rw, rl, aw, al, nw, nl = parts(p)
    h = rw - rl
    b = hp.get("beta", 2.0 if key == "simpo" else 0.1)
    cw, cl, Cw, Cl, hw, hl = dict(zip(PAIRS, EXTRA)).get(tuple(p), (math.nan,) * 6)
    if key == "dpo":
        d, a = hp.get("divergence", "reverse_kl"), hp.get("divergence_alpha", 0.5)
        return nls(b * (f_score(rw, d, a) - f_score(rl, d, a)))
    if key == "dpo_norm":
        return nls(b * (rw / nw - rl / nl))
    if key == "cpo":
        return nls(b * (p[0] - p[1])) + hp.get("nll_weight", 1.0) * (-aw)
    if key == "sft":
        return -aw
    if key == "exo":
        e = hp.get("label_smoothing", 1e-3)
        qw, ql = sig(b * h), sig(-b * h)
        return qw * (math.log(qw) - math.log(1 - e)) + ql * (math.log(ql) - math.log(e))
    if key == "bco_pair":
        return nls(b * rw) + nls(-b * rl)
    if key == "sppo":
        return (rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2
    if key == "discopop":
        m = sig(b * h / hp.get("tau", 0.05))
        return (1 - m) * nls(b * h) + m * math.exp(-b * h)
    if key == "ld_dpo":
        a = hp.get("ld_alpha", 0.5)
        lw, ll, Lw, Ll = p[:4]
        pw, pl = cw + a * (lw - cw), cl + a * (ll - cl)
        qw, ql = Cw + a * (Lw - Cw), Cl + a * (Ll - Cl)
        return nls(b * ((pw - qw) - (pl - ql)))
    if key == "wpo":
        return math.exp(hw / nw) * math.exp(hl / nl) * nls(b * h)
    if key == "cdpo":
        e = hp.get("label_smoothing", 0.1)
        return (1 - e) * nls(b * h) + e * nls(-b * h)
    if key == "robust":
        e = hp.get("label_smoothing", 0.1)
        return ((1 - e) * nls(b * h) - e * nls(-b * h)) / (1 - 2 * e)
    if key == "ipo":
        hh = rw / nw - rl / nl if hp.get("length_normalize", True) else h
        return (hh - 1 / (2 * b)) ** 2
    if key == "slic":
        return max(0.0, 1 - b * h)
    if key == "caldpo":
        c = hp.get("calibration_weight", 0.5)
        return nls(h) + c * ((rw - 1 / (2 * b)) ** 2 + (rl + 1 / (2 * b)) ** 2)
    if key == "simpo":
        return nls(b * (aw - al) - hp.get("gamma", 1.0))
    if key == "dpop":
        lam = hp.get("dpop_lambda", 50)
        return nls(b * (h - lam * max(0.0, -rw)))
    if key == "rdpo":
        return nls(b * h - hp.get("length_alpha", 0.05) * (nw - nl))
    if key == "orpo":
        z = (aw - al) - (math.log(1 - math.exp(aw)) - math.log(1 - math.exp(al)))
        return -aw + b * nls(z)
    if key == "nca":
        return nls(b * rw) + 0.5 * nls(-b * rw) + 0.5 * nls(-b * rl)
    if key == "apo_zero":
        return (1 - sig(b * rw)) + sig(b * rl)
    if key == "apo_down":
        return sig(b * rw) + (1 - sig(b * rw - b * rl))
    if key == "rpo":
        return nls(b * h) + hp.get("nll_weight", 1.0) * (-p[0] / nw)
    if key == "typo":
        lw, ll, Lw, Ll = p[:4]
        return nls(b * (lw - ll)) + hp.get("kl_weight", 1.0) * 0.5 * ((Lw - lw) + (Ll - ll))
    if key == "bpo":
        a, form = hp.get("alpha", 0.3), hp.get("form", "hinge")
        u = b * min(rw, -a * rl)
        return {
            "logistic": nls(u),
            "hinge": max(0.0, 1 - u),
            "square": (u - 1) ** 2,
            "exponential": math.exp(-u),
            "truncated_quadratic": max(0.0, 1 - u) ** 2,
            "savage": 1 / (1 + math.exp(u)) ** 2,
        }[form]
    raise KeyError(key)


# alpha_dpo has its own file; aot sorts the batch and mix / mpo combine losses: test_losses_second.py
STATELESS = [k for k in LOSS_KEYS if k not in ("alpha_dpo", "aot", "aot_unpaired", "mix", "mpo")]


def run(key, pairs=PAIRS, grad=False, **hp) -> tuple[LossOutput, PairLogps]:
    policy, reference = batch(pairs, grad)
    return get_loss(key, **hp)(policy, reference), policy


# ------------------------------------------------------------------ values


@pytest.mark.parametrize("key", STATELESS)
def test_default_values_match_hand_computation(key):
    out, _ = run(key)
    assert out.loss.shape == (3,)
    assert out.loss.tolist() == pytest.approx([hand(key, p) for p in PAIRS], rel=1e-10, abs=1e-12)


@pytest.mark.parametrize(
    "key, hp",
    [
        ("dpo", {"beta": 0.5}),
        ("cdpo", {"beta": 0.3, "label_smoothing": 0.25}),
        ("robust", {"beta": 0.3, "label_smoothing": 0.25}),
        ("ipo", {"beta": 0.2, "length_normalize": False}),
        ("ipo", {"beta": 0.5, "length_normalize": True}),
        ("slic", {"beta": 0.5}),  # pair 0 has β·h = 1.5 > 1: the hinge is flat there
        ("caldpo", {"beta": 0.25, "calibration_weight": 0.5}),
        ("simpo", {"beta": 1.5, "gamma": 0.3}),
        ("dpop", {"beta": 0.2, "dpop_lambda": 5}),
        ("rdpo", {"beta": 0.2, "length_alpha": 0.1}),
        ("orpo", {"beta": 0.5}),
        ("nca", {"beta": 0.7}),
        ("apo_zero", {"beta": 0.7}),
        ("apo_down", {"beta": 0.7}),
        ("rpo", {"beta": 0.2, "nll_weight": 0.5}),
        ("typo", {"beta": 0.2, "kl_weight": 0.3}),
    ],
)
def test_values_with_other_hyperparameters(key, hp):
    out, _ = run(key, **hp)
    assert out.loss.tolist() == pytest.approx([hand(key, p, **hp) for p in PAIRS], rel=1e-10, abs=1e-12)


def test_dpo_worked_numbers():
    # β = 0.1: β·h = 0.3, −0.4, −0.5 → −log σ = log(1 + e^{−βh}).
    out, _ = run("dpo")
    expected = [math.log(1 + math.exp(-0.3)), math.log(1 + math.exp(0.4)), math.log(1 + math.exp(0.5))]
    assert out.loss.tolist() == pytest.approx([0.5543552, 0.9130153, 0.9740770], abs=1e-6)
    assert out.loss.tolist() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("form", ["logistic", "hinge", "square", "exponential", "truncated_quadratic", "savage"])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_bpo_every_form_by_hand(form, alpha):
    # β = 2 puts pair 0 beyond the hinge (u = 2·min(1, 0.6) = 1.2 > 1 at α = 0.3) so the flat part is covered.
    hp = {"beta": 2.0, "alpha": alpha, "form": form}
    out, _ = run("bpo", **hp)
    assert out.loss.tolist() == pytest.approx([hand("bpo", p, **hp) for p in PAIRS], rel=1e-10, abs=1e-12)


def test_bpo_form_values_at_one_point():
    # One pair, r̂_w = 2, r̂_l = -10, α = 0.5, β = 0.25: u = 0.25·min(2, 5) = 0.5.
    pair = [(-8.0, -20.0, -10.0, -10.0, 4, 4)]
    u = 0.5
    expected = {
        "logistic": math.log(1 + math.exp(-u)),
        "hinge": 0.5,
        "square": 0.25,
        "exponential": math.exp(-0.5),
        "truncated_quadratic": 0.25,
        "savage": 1 / (1 + math.exp(0.5)) ** 2,
    }
    for form, value in expected.items():
        out, _ = run("bpo", pair, beta=0.25, alpha=0.5, form=form)
        assert out.loss.item() == pytest.approx(value, rel=1e-12), form


def test_bpo_chosen_branch_frac():
    # α = 0.3: pair 0 min(1, 0.6) → rejected branch; pairs 1, 2 → chosen branch.
    out, _ = run("bpo", alpha=0.3)
    assert out.metrics["bpo/chosen_branch_frac"].item() == pytest.approx(2 / 3)
    # α = 1: pair 0 min(1, 2) → chosen; pairs 1, 2: min(-1, -3), min(-1.5, -3.5) → rejected.
    out, _ = run("bpo", alpha=1.0)
    assert out.metrics["bpo/chosen_branch_frac"].item() == pytest.approx(1 / 3)
    # At policy == reference both branches are 0: a tie counts half.
    out, _ = run("bpo", [(-5.0, -6.0, -5.0, -6.0, 2, 3)])
    assert out.metrics["bpo/chosen_branch_frac"].item() == 0.5


def test_bpo_only_the_active_branch_gets_gradient():
    out, policy = run("bpo", grad=True, beta=0.1, alpha=0.3, form="hinge")
    out.loss.sum().backward()
    # pair 0: rejected branch active, u = 0.1·(-0.3·r̂_l) → ∂/∂ℓ_l = 0.1·0.3 = 0.03 (hinge slope −1 times −0.03).
    # pairs 1, 2: chosen branch active → ∂/∂ℓ_w = −0.1, nothing on the rejected.
    assert policy.chosen.grad.tolist() == pytest.approx([0.0, -0.1, -0.1])
    assert policy.rejected.grad.tolist() == pytest.approx([0.03, 0.0, 0.0])


def test_bpo_alpha_one_logistic_equals_logsigmoid_of_chosen_ratio():
    # Pair 0 with α = 1: min(r̂_w, −r̂_l) = min(1, 2) = r̂_w, so the loss is −log σ(β r̂_w).
    out, _ = run("bpo", PAIRS[:1], beta=0.1, alpha=1.0, form="logistic")
    assert out.metrics["bpo/chosen_branch_frac"].item() == 1.0
    assert out.loss.item() == pytest.approx(nls(0.1 * 1.0), rel=1e-12)


@pytest.mark.parametrize(
    "key, hp", [("cdpo", {"label_smoothing": 0.0}), ("robust", {"label_smoothing": 0.0}), ("rpo", {"nll_weight": 0.0})]
)
def test_limits_equal_dpo(key, hp):
    out, _ = run(key, beta=0.3, **hp)
    ref, _ = run("dpo", beta=0.3)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ gradients

# Expected sign of ∂loss/∂ℓ_w and ∂loss/∂ℓ_l on every pair of PAIRS (−1: raising that log-prob lowers the loss).
GRAD_SIGNS = {
    "dpo": (-1, 1),
    "cdpo": (-1, 1),  # β·h < log((1−ε)/ε) on all pairs, so the true label still dominates
    "robust": (-1, 1),
    "ipo": (-1, 1),  # length-normalized h < 1/(2β) = 5 everywhere: push the margin up
    "slic": (-1, 1),  # β·h < 1 everywhere: inside the hinge
    "caldpo": (-1, 1),  # r̂_w < 1/(2β), r̂_l > −1/(2β): the calibration targets agree with the BT term
    "simpo": (-1, 1),
    "dpop": (-1, 1),
    "rdpo": (-1, 1),
    "orpo": (-1, 1),
    "nca": (-1, 1),  # β r̂_w < log 2: the anchor still pulls the chosen up
    "apo_zero": (-1, 1),
    "apo_down": (1, 1),  # APO-down lowers both likelihoods (|β r̂_w| < |β h| on every pair)
    "rpo": (-1, 1),
    "typo": (-1, -1),  # the KL anchor (−λ/2) outweighs the BT push on the rejected (β σ(·) ≤ β < λ/2)
}


@pytest.mark.parametrize("key", sorted(GRAD_SIGNS))
def test_gradient_signs(key):
    out, policy = run(key, grad=True)
    out.loss.sum().backward()
    want_w, want_l = GRAD_SIGNS[key]
    assert all(math.copysign(1, g) == want_w and g != 0 for g in policy.chosen.grad.tolist()), policy.chosen.grad
    assert all(math.copysign(1, g) == want_l and g != 0 for g in policy.rejected.grad.tolist()), policy.rejected.grad


def test_typo_gradient_values():
    # ∂/∂ℓ_w = −β σ(−β(ℓ_w − ℓ_l)) − λ/2, ∂/∂ℓ_l = β σ(−β(ℓ_w − ℓ_l)) − λ/2.
    out, policy = run("typo", grad=True, beta=0.1, kl_weight=1.0)
    out.loss.sum().backward()
    s = [sig(-0.1 * (p[0] - p[1])) for p in PAIRS]
    assert policy.chosen.grad.tolist() == pytest.approx([-0.1 * x - 0.5 for x in s])
    assert policy.rejected.grad.tolist() == pytest.approx([0.1 * x - 0.5 for x in s])
    out, policy = run("typo", grad=True, kl_weight=0.0)
    out.loss.sum().backward()
    assert (policy.rejected.grad > 0).all()


def test_dpop_penalty_steepens_the_chosen_gradient():
    # Pairs 1, 2 have ℓ_w < ℓʳ_w: the penalty's λ multiplies the chosen gradient by (1 + λ).
    out, policy = run("dpop", grad=True, beta=0.1, dpop_lambda=50)
    out.loss.sum().backward()
    for p, g in zip(PAIRS, policy.chosen.grad.tolist()):
        rw, rl = p[0] - p[2], p[1] - p[3]
        z = 0.1 * (rw - rl - 50 * max(0.0, -rw))
        factor = 1 + 50 if rw < 0 else 1
        assert g == pytest.approx(-0.1 * factor * sig(-z))
    assert out.metrics["dpop/penalty"].item() == pytest.approx((0 + 1 + 1.5) / 3)


# ------------------------------------------------------------------ rewards and metrics


@pytest.mark.parametrize("key", [k for k in STATELESS if k != "sft"])  # sft has no β
def test_rewards_and_metric_conventions(key):
    out, policy = run(key, grad=True, beta=0.5)
    assert not out.chosen_reward.requires_grad and not out.rejected_reward.requires_grad
    if key in REFERENCE_FREE:  # β·ℓ̄
        expected_w = [0.5 * p[0] / p[4] for p in PAIRS]
        expected_l = [0.5 * p[1] / p[5] for p in PAIRS]
    else:  # β·r̂ on summed log-ratios, whatever the loss uses itself
        expected_w = [0.5 * (p[0] - p[2]) for p in PAIRS]
        expected_l = [0.5 * (p[1] - p[3]) for p in PAIRS]
    assert out.chosen_reward.tolist() == pytest.approx(expected_w)
    assert out.rejected_reward.tolist() == pytest.approx(expected_l)
    for name, value in out.metrics.items():
        assert name.startswith(f"{key}/")
        assert value.dim() == 0 and not value.requires_grad


def test_loss_specific_metrics_by_hand():
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    out, _ = run("orpo")
    aw, al = [p[0] / p[4] for p in PAIRS], [p[1] / p[5] for p in PAIRS]
    zs = [(w - r) - (math.log(1 - math.exp(w)) - math.log(1 - math.exp(r))) for w, r in zip(aw, al)]
    assert out.metrics["orpo/log_odds"].item() == pytest.approx(mean(zs), rel=1e-6)
    assert out.metrics["orpo/nll"].item() == pytest.approx(mean([-p[0] / p[4] for p in PAIRS]), rel=1e-6)
    out, _ = run("rpo")
    assert out.metrics["rpo/nll"].item() == pytest.approx(mean([-p[0] / p[4] for p in PAIRS]), rel=1e-6)
    out, _ = run("typo")
    kl = [0.5 * ((p[2] - p[0]) + (p[3] - p[1])) for p in PAIRS]
    assert out.metrics["typo/kl"].item() == pytest.approx(mean(kl), rel=1e-6)
    out, _ = run("caldpo", beta=0.25)
    cal = [(p[0] - p[2] - 2) ** 2 + (p[1] - p[3] + 2) ** 2 for p in PAIRS]
    assert out.metrics["caldpo/calibration"].item() == pytest.approx(mean(cal), rel=1e-6)


# ------------------------------------------------------------------ ORPO's log(1 − eˣ)


def test_log1mexp_is_stable_at_both_ends():
    xs = [-1e-30, -1e-10, -1e-4, -0.5, -0.7, -1.0, -30.0, -800.0]
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    y = log1mexp(x)
    # Reference in plain math: log(−expm1(x)) is exact near 0, log1p(−eˣ) far below (where 1 − eˣ rounds).
    expected = [math.log(-math.expm1(v)) if v > -math.log(2) else math.log1p(-math.exp(v)) for v in xs]
    assert y.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-300)
    assert y[0].item() == pytest.approx(math.log(1e-30)) and y[-1].item() == 0.0
    y.sum().backward()
    assert torch.isfinite(x.grad).all()
    # float32 and x = 0 exactly (a saturated low-precision log-prob) stay finite too.
    x32 = torch.tensor([0.0, -1e-7, -1e-3, -200.0], requires_grad=True)
    y32 = log1mexp(x32)
    assert torch.isfinite(y32).all()
    y32.sum().backward()
    assert torch.isfinite(x32.grad).all()
    assert y32[1].item() == pytest.approx(math.log(1e-7), rel=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_orpo_finite_for_extreme_log_probs(dtype):
    # ℓ̄ near 0 (a near-certain completion) and very negative.
    pairs = [(-1e-9, -2000.0, 0.0, 0.0, 10, 4), (-3000.0, -1e-8, 0.0, 0.0, 3, 7)]
    policy, _ = batch(pairs, grad=True, dtype=dtype)
    out = get_loss("orpo")(policy, None)
    assert torch.isfinite(out.loss).all()
    out.loss.sum().backward()
    assert torch.isfinite(policy.chosen.grad).all() and torch.isfinite(policy.rejected.grad).all()


# ------------------------------------------------------------------ reference handling


@pytest.mark.parametrize("key", sorted(REFERENCE_FREE))
def test_reference_free_losses_work_without_reference(key):
    policy, reference = batch()
    loss = get_loss(key)
    assert loss.reference is False
    without = loss(policy, None)
    assert without.loss.tolist() == pytest.approx([hand(key, p) for p in PAIRS], rel=1e-10)
    torch.testing.assert_close(loss(policy, reference).loss, without.loss)


@pytest.mark.parametrize("key", [k for k in LOSS_KEYS if k not in REFERENCE_FREE])
def test_reference_losses_refuse_missing_reference(key):
    policy, _ = batch()
    loss = get_loss(key)
    assert loss.reference is True
    with pytest.raises(ConfigError, match=rf"loss '{key}' needs reference log-probs.*reference=None"):
        loss(policy, None)


def test_float32_inputs_and_integer_token_counts():
    policy, reference = batch(dtype=torch.float32)
    assert policy.chosen_tokens.dtype == torch.int64
    for key in LOSS_KEYS:
        out = get_loss(key)(policy, reference)
        assert out.loss.dtype == torch.float32 and torch.isfinite(out.loss).all(), key


def test_pair_logps_helpers():
    policy, _ = batch(grad=True)
    assert policy.chosen_mean.tolist() == pytest.approx([-3.0, -2.5, -1.5])
    assert policy.rejected_mean.tolist() == pytest.approx([-2.5, -3.0, -0.9])
    detached = policy.detach()
    assert not detached.chosen.requires_grad and detached.chosen.tolist() == policy.chosen.tolist()
    assert LossOutput(torch.zeros(1), torch.zeros(1), torch.zeros(1)).metrics == {}
