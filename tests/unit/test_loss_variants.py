"""The second batch of losses (docs/losses.md, §6): worked numbers, limits, sorting, mixtures, sweeps."""

from __future__ import annotations

import math

import hydra.utils
import pytest
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser

from prefopt.errors import ConfigError
from prefopt.losses import PairLogps, get_loss
from tests.helpers.config import compose_cfg
from tests.unit.test_loss_values import EXTRA, PAIRS, batch, hand, nls, run, sig

# ------------------------------------------------------------------ f-DPO divergences


def test_divergence_worked_numbers():
    # Pair 0: r̂_w = 1, r̂_l = −2, β = 0.1.
    pair = PAIRS[:1]
    want = {
        "forward_kl": nls(0.1 * ((1 - math.exp(-1)) - (1 - math.exp(2)))),  # s = 1 − e^{−r̂}
        "js": nls(0.1 * (math.log(sig(1)) - math.log(sig(-2)))),  # the log 2 cancels
        "alpha": nls(0.1 * ((math.exp(-0.5) - 1) / -0.5 - (math.exp(1.0) - 1) / -0.5)),  # a = 0.5
        "reverse_kl": nls(0.1 * 3),
    }
    for divergence, value in want.items():
        out, _ = run("dpo", pair, divergence=divergence)
        assert out.loss.item() == pytest.approx(value, rel=1e-12), divergence


@pytest.mark.parametrize(
    "divergence, a", [("forward_kl", 0.5), ("js", 0.5), ("alpha", 0.5), ("alpha", 2.0), ("alpha", -1.0)]
)
def test_divergence_values_on_all_pairs(divergence, a):
    hp = {"beta": 0.3, "divergence": divergence, "divergence_alpha": a}
    out, _ = run("dpo", **hp)
    assert out.loss.tolist() == pytest.approx([hand("dpo", p, **hp) for p in PAIRS], rel=1e-10)
    # rewards stay β·r̂ whatever the score
    assert out.chosen_reward.tolist() == pytest.approx([0.3 * (p[0] - p[2]) for p in PAIRS])


def test_alpha_divergence_tends_to_reverse_kl():
    ref, _ = run("dpo")
    exact, _ = run("dpo", divergence="alpha", divergence_alpha=1.0)
    torch.testing.assert_close(exact.loss, ref.loss, rtol=0, atol=0)  # a = 1 falls back to reverse_kl
    for eps in (1e-3, 1e-6, -1e-6):
        near, _ = run("dpo", divergence="alpha", divergence_alpha=1.0 + eps)
        torch.testing.assert_close(near.loss, ref.loss, rtol=10 * abs(eps), atol=10 * abs(eps))
    far, _ = run("dpo", divergence="alpha", divergence_alpha=0.5)
    assert not torch.allclose(far.loss, ref.loss)


def test_bad_divergence_names_the_key():
    with pytest.raises(
        ConfigError,
        match=r"loss.divergence must be one of reverse_kl, forward_kl, js, alpha "
        r"\(got 'kl'\) in loss 'dpo'",
    ):
        get_loss("dpo", divergence="kl")
    with pytest.raises(ConfigError, match=r"loss.divergence_alpha='x': must be a number"):
        get_loss("dpo", divergence="alpha", divergence_alpha="x")


# ------------------------------------------------------------------ other hyper-parameters, limits


@pytest.mark.parametrize(
    "key, hp",
    [
        ("exo", {"beta": 0.5, "label_smoothing": 0.1}),
        ("discopop", {"beta": 0.5, "tau": 0.5}),
        ("discopop", {"beta": 0.2, "tau": 2.0}),
        ("cpo", {"beta": 0.5, "nll_weight": 0.3}),
        ("ld_dpo", {"beta": 0.3, "ld_alpha": 0.2}),
        ("ld_dpo", {"beta": 0.3, "ld_alpha": 0.0}),
        ("wpo", {"beta": 0.7}),
        ("sppo", {"beta": 0.25}),
        ("bco_pair", {"beta": 0.7}),
        ("dpo_norm", {"beta": 0.7}),
    ],
)
def test_values_with_other_hyperparameters(key, hp):
    out, _ = run(key, **hp)
    assert out.loss.tolist() == pytest.approx([hand(key, p, **hp) for p in PAIRS], rel=1e-10, abs=1e-12)


def test_worked_numbers_by_hand():
    # Pair 0 (r̂_w = 1, r̂_l = −2, h = 3, n_w = 4, n_l = 6), β = 0.1, written out once without the helper.
    out, _ = run("bco_pair", PAIRS[:1])
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-0.1)) + math.log(1 + math.exp(-0.2)), rel=1e-12)
    out, _ = run("sppo", PAIRS[:1])
    assert out.loss.item() == pytest.approx((1 - 5) ** 2 + (-2 + 5) ** 2)  # 25
    out, _ = run("dpo_norm", PAIRS[:1])  # h per token: 1/4 + 2/6
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-0.1 * (0.25 + 1 / 3))), rel=1e-12)
    out, _ = run("cpo", PAIRS[:1])  # ℓ_w − ℓ_l = 3, −ℓ_w/n_w = 3
    assert out.loss.item() == pytest.approx(math.log(1 + math.exp(-0.3)) + 3.0, rel=1e-12)
    out, _ = run("exo", PAIRS[:1], label_smoothing=0.25)
    q = 1 / (1 + math.exp(-0.3))
    assert out.loss.item() == pytest.approx(q * math.log(q / 0.75) + (1 - q) * math.log((1 - q) / 0.25), rel=1e-12)
    out, _ = run("wpo", PAIRS[:1])  # weights e^{−2/4}·e^{−3/6} = e^{−1}
    assert out.loss.item() == pytest.approx(math.exp(-1) * math.log(1 + math.exp(-0.3)), rel=1e-12)
    assert out.metrics["wpo/weight"].item() == pytest.approx(math.exp(-1))


def test_exo_minimum_is_at_the_smoothed_label():
    # σ(βh) = 1 − ε ⇒ KL = 0; the label-smoothing bound is open at both ends.
    eps = 0.2
    h = math.log((1 - eps) / eps) / 0.1
    out, _ = run("exo", [(-10.0 + h, -10.0, -10.0, -10.0, 3, 3)], label_smoothing=eps)
    assert out.loss.item() == pytest.approx(0.0, abs=1e-12)
    for bad in (0.0, 0.5):
        with pytest.raises(ConfigError, match=r"loss.label_smoothing must be in \(0, 0.5\)"):
            get_loss("exo", label_smoothing=bad)


def test_discopop_is_finite_far_from_zero():
    pairs = [(-10.0, -10.0 + 9000.0, -10.0, -10.0, 3, 3), (-10.0 + 9000.0, -10.0, -10.0, -10.0, 3, 3)]
    out, policy = run("discopop", pairs, grad=True)
    assert torch.isfinite(out.loss).all()
    # βh = −900: m ≈ 0, the logistic branch ≈ 900; βh = 900: both branches ≈ 0
    assert out.loss.tolist() == pytest.approx([900.0, 0.0], abs=1e-6)
    out.loss.sum().backward()
    assert torch.isfinite(policy.chosen.grad).all()


def test_ld_dpo_alpha_one_equals_dpo_and_zero_uses_prefixes_only():
    one, _ = run("ld_dpo", beta=0.3, ld_alpha=1.0)
    dpo, _ = run("dpo", beta=0.3)
    torch.testing.assert_close(one.loss, dpo.loss, rtol=1e-12, atol=1e-12)
    zero, _ = run("ld_dpo", beta=0.3, ld_alpha=0.0)  # DPO on ℓ_{≤m} alone
    want = [nls(0.3 * ((cw - Cw) - (cl - Cl))) for cw, cl, Cw, Cl, _, _ in EXTRA]
    assert zero.loss.tolist() == pytest.approx(want, rel=1e-12)
    # rewards on the plain sums, metric = |n_w − n_l|
    assert zero.chosen_reward.tolist() == pytest.approx([0.3 * (p[0] - p[2]) for p in PAIRS])
    assert zero.metrics["ld_dpo/tail_tokens"].item() == pytest.approx((2 + 2 + 5) / 3)


def test_field_losses_name_the_missing_fields():
    policy, reference = batch(extra=[])
    with pytest.raises(ConfigError, match=r"loss 'ld_dpo' needs the PairLogps fields chosen_prefix, rejected_prefix"):
        get_loss("ld_dpo")(policy, reference)
    with pytest.raises(ConfigError, match=r"needs: \[head_logps\]"):
        get_loss("wpo")(policy, reference)


def test_wpo_weights_are_detached():
    policy, reference = batch(grad=True)
    policy.chosen_head.requires_grad_(True)
    out = get_loss("wpo")(policy, reference)
    out.loss.sum().backward()
    assert policy.chosen_head.grad is None
    w = [math.exp(x[4] / p[4] + x[5] / p[5]) for p, x in zip(PAIRS, EXTRA)]
    dpo_grad = [-0.1 * sig(-0.1 * (p[0] - p[2] - p[1] + p[3])) for p in PAIRS]
    assert policy.chosen.grad.tolist() == pytest.approx([a * g for a, g in zip(w, dpo_grad)], rel=1e-10)


# Expected sign of ∂loss/∂ℓ_w and ∂loss/∂ℓ_l on every pair of PAIRS.
GRAD_SIGNS = {
    ("dpo", "forward_kl"): (-1, 1),
    ("dpo", "js"): (-1, 1),
    ("dpo", "alpha"): (-1, 1),
    "exo": (-1, 1),
    "bco_pair": (-1, 1),
    "sppo": (-1, 1),  # r̂_w < 1/(2β) = 5 and r̂_l > −5 everywhere
    "aot": (-1, 1),
    "aot_unpaired": (-1, 1),
    "discopop": (-1, 1),
    "dpo_norm": (-1, 1),
    "cpo": (-1, 1),
    "ld_dpo": (-1, 1),
    "wpo": (-1, 1),
    "mpo": (-1, 1),
}


@pytest.mark.parametrize("name", sorted(GRAD_SIGNS, key=str))
def test_gradient_signs(name):
    key, hp = (name[0], {"divergence": name[1]}) if isinstance(name, tuple) else (name, {})
    out, policy = run(key, grad=True, **hp)
    out.loss.sum().backward()
    want_w, want_l = GRAD_SIGNS[name]
    assert all(math.copysign(1, g) == want_w and g != 0 for g in policy.chosen.grad.tolist()), policy.chosen.grad
    assert all(math.copysign(1, g) == want_l and g != 0 for g in policy.rejected.grad.tolist()), policy.rejected.grad


# ------------------------------------------------------------------ AOT: sorted over the call's pairs


def test_aot_by_hand():
    # policy margins ℓ_w − ℓ_l = 3, −2, 1.5 → sorted −2, 1.5, 3; reference 0, 2, 6.5 (already sorted)
    out, _ = run("aot")
    assert out.loss.tolist() == pytest.approx([nls(0.1 * d) for d in (-2.0, -0.5, -3.5)], rel=1e-12)
    out, _ = run("aot", beta=0.5, label_smoothing=0.2)
    assert out.loss.tolist() == pytest.approx([0.8 * nls(0.5 * d) + 0.2 * nls(-0.5 * d) for d in (-2.0, -0.5, -3.5)])
    # unpaired: r̂_w = 1, −1, −1.5 → −1.5, −1, 1; r̂_l = −2, 3, 3.5 → −2, 3, 3.5
    out, _ = run("aot_unpaired")
    assert out.loss.tolist() == pytest.approx([nls(0.1 * d) for d in (0.5, -4.0, -2.5)], rel=1e-12)
    # rewards are the pairs' own (unsorted)
    assert out.chosen_reward.tolist() == pytest.approx([0.1, -0.1, -0.15])


def test_aot_on_a_sorted_batch_is_dpo():
    # Policy and reference margins in the same order: δ_i = h_i, so aot = dpo pair by pair; likewise
    # aot_unpaired when r̂_w and r̂_l are both increasing.
    pairs = [(-10.0, -9.0, -10.0, -10.0, 3, 4), (-8.0, -9.0, -9.0, -10.5, 2, 3), (-5.0, -9.5, -6.0, -9.0, 4, 4)]
    aot, _ = run("aot", pairs, beta=0.4)
    dpo, _ = run("dpo", pairs, beta=0.4)
    torch.testing.assert_close(aot.loss, dpo.loss, rtol=1e-12, atol=1e-12)
    unpaired, _ = run("aot_unpaired", pairs, beta=0.4)  # r̂_w = 0, 1, 1; r̂_l = 1, 1.5, −0.5: not sorted
    shuffled = [pairs[2], pairs[0], pairs[1]]  # reorder so r̂_l is sorted too: r̂_l = −0.5, 1, 1.5 with r̂_w 1, 0, 1
    assert unpaired.loss.tolist() == pytest.approx([nls(0.4 * d) for d in (0 - -0.5, 1 - 1, 1 - 1.5)], rel=1e-12)
    u2, _ = run("aot_unpaired", shuffled, beta=0.4)
    torch.testing.assert_close(u2.loss, unpaired.loss, rtol=1e-12, atol=1e-12)  # a permutation changes nothing


# ------------------------------------------------------------------ sft, mix, mpo


def test_sft_is_the_chosen_nll():
    policy, _ = batch()
    out = get_loss("sft")(policy, None)
    assert out.loss.tolist() == pytest.approx([3.0, 2.5, 1.5])
    assert out.chosen_reward.tolist() == pytest.approx([-3.0, -2.5, -1.5])
    assert out.metrics["sft/nll"].item() == pytest.approx(7 / 3)


def test_mix_with_one_component_equals_it():
    for key, hp in [("dpo", {"beta": 0.3}), ("bpo", {"alpha": 1.0, "form": "savage"}), ("cpo", {})]:
        policy, reference = batch()
        mixed = get_loss("mix", components=[{"key": key, "weight": 1.0, **hp}])
        alone = get_loss(key, **hp)
        assert mixed.reference == alone.reference
        a, b = mixed(policy, reference), alone(policy, reference)
        torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
        torch.testing.assert_close(a.chosen_reward, b.chosen_reward)
        assert a.metrics[f"{key}/loss"].item() == pytest.approx(b.loss.mean().item())
        for name, value in b.metrics.items():  # each component's metrics under its key
            assert a.metrics[name] == value


def test_mpo_by_hand_and_its_metrics():
    out, _ = run("mpo")
    want = [0.8 * hand("dpo", p) + 0.2 * hand("bco_pair", p) + 1.0 * hand("sft", p) for p in PAIRS]
    assert out.loss.tolist() == pytest.approx(want, rel=1e-12)
    assert set(out.metrics) == {"dpo/loss", "bco_pair/loss", "sft/loss", "sft/nll"}
    assert out.metrics["bco_pair/loss"].item() == pytest.approx(sum(hand("bco_pair", p) for p in PAIRS) / 3)
    assert out.chosen_reward.tolist() == pytest.approx([0.1 * (p[0] - p[2]) for p in PAIRS])  # dpo's β·r̂
    loss = get_loss("mpo")
    assert loss.reference is True and loss.needs == ()
    assert get_loss("mix", components=[{"key": "sft", "weight": 1.0}, {"key": "cpo", "weight": 0.5}]).reference is False
    both = get_loss("mix", components=[{"key": "wpo", "weight": 1.0}, {"key": "ld_dpo", "weight": 1.0}])
    assert both.needs == ("head_logps", "prefix_logps")


def test_mix_same_key_twice_and_stateful_component():
    loss = get_loss(
        "mix",
        components=[
            {"key": "dpo", "weight": 0.5, "beta": 0.1},
            {"key": "dpo", "weight": 0.5, "beta": 0.3},
            {"key": "alpha_dpo", "weight": 1.0},
        ],
    )
    policy, reference = batch()
    out = loss(policy, reference)
    assert {"dpo/loss", "dpo_1/loss", "alpha_dpo/loss", "alpha_dpo/mu"} <= set(out.metrics)
    want = [0.5 * hand("dpo", p, beta=0.1) + 0.5 * hand("dpo", p, beta=0.3) for p in PAIRS]
    alpha = get_loss("alpha_dpo")
    alpha_out = alpha(policy, reference)
    torch.testing.assert_close(out.loss, torch.tensor(want, dtype=torch.float64) + alpha_out.loss)
    state = loss.state_dict()
    assert set(state) == {"alpha_dpo"} and state["alpha_dpo"] == alpha.state_dict()
    fresh = get_loss(
        "mix",
        components=[{"key": "dpo", "weight": 0.5}, {"key": "dpo", "weight": 0.5}, {"key": "alpha_dpo", "weight": 1.0}],
    )
    fresh.load_state_dict(state)
    assert fresh.state_dict() == state
    loss.eval()
    before = loss.state_dict()
    loss(policy, reference)
    assert loss.state_dict() == before  # eval mode reaches the components


@pytest.mark.parametrize(
    "components, message",
    [
        ([], "loss.components must be a non-empty list"),
        ([{"key": "dpo"}], "loss.components.0 must have a key and a weight"),
        ([{"key": "dpo", "weight": 1.0}, {"key": "kto", "weight": 1.0}], "loss.components.1: unknown loss 'kto'"),
        ([{"key": "dpo", "weight": 1.0, "gamma": 2.0}], "loss.components.0: loss 'dpo' has no hyper-parameter gamma"),
        ([{"key": "dpo", "weight": "heavy"}], "loss.components.0.weight must be a finite number"),
        ([{"key": "mix", "weight": 1.0}], "a mixture cannot contain a mixture"),
    ],
)
def test_bad_components_are_one_clear_line(components, message):
    with pytest.raises(ConfigError) as err:
        get_loss("mix", components=components)
    assert message in str(err.value) and "loss 'mix'" in str(err.value)


def test_mix_from_the_command_line_and_a_weight_sweep():
    cfg = compose_cfg(
        ["loss=mix", "loss.components=[{key: dpo, weight: 0.8, beta: 0.2}, {key: bco_pair, weight: 0.2}]"]
    )
    assert hydra.utils.instantiate(cfg.loss).hparams["components"][0] == {"key": "dpo", "weight": 0.8, "beta": 0.2}
    # A sweep over one component's weight, as `python -m prefopt.run -m loss=mpo loss.components.0.weight=0.5,0.8`
    # expands it: Hydra's own parser, then one composed config per value.
    sweep = OverridesParser.create().parse_overrides(["loss.components.0.weight=0.5,0.8"])[0]
    assert sweep.is_sweep_override()
    weights = []
    for value in sweep.sweep_string_iterator():
        loss = hydra.utils.instantiate(compose_cfg(["loss=mpo", f"loss.components.0.weight={value}"]).loss)
        weights.append(loss.hparams["components"][0]["weight"])
        assert [c["key"] for c in loss.hparams["components"]] == ["dpo", "bco_pair", "sft"]
    assert weights == [0.5, 0.8]
    # a hyper-parameter the yaml's entry does not list is added with `+` (Hydra's rule for new keys)
    loss = hydra.utils.instantiate(compose_cfg(["loss=mpo", "+loss.components.1.beta=0.05"]).loss)
    assert loss.hparams["components"][1] == {"key": "bco_pair", "weight": 0.2, "beta": 0.05}


def test_mix_with_field_losses_passes_the_fields():
    policy, reference = batch()
    mixed = get_loss(
        "mix", components=[{"key": "ld_dpo", "weight": 0.5, "ld_alpha": 0.3}, {"key": "wpo", "weight": 2.0}]
    )
    want = [0.5 * hand("ld_dpo", p, ld_alpha=0.3) + 2.0 * hand("wpo", p) for p in PAIRS]
    assert mixed(policy, reference).loss.tolist() == pytest.approx(want, rel=1e-12)
    assert isinstance(policy, PairLogps)
