"""Bradley–Terry (logistic) preference losses: DPO and the variants that only reshape its logit or labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_label_smoothing,
    check_nonnegative,
    check_number,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_free_output,
    reference_output,
    scalar,
)

DIVERGENCES = ("reverse_kl", "forward_kl", "js", "alpha")


def f_score(ratio: Tensor, divergence: str, alpha: float) -> Tensor:
    """The f′-score s of a log-ratio r̂ for f-DPO (Wang et al. 2023, arXiv 2309.16240, Table 1).

    reverse_kl: s = r̂ (plain DPO); forward_kl: s = 1 − e^{−r̂}; js: s = log 2 + log σ(r̂);
    alpha: s = (e^{(a−1)r̂} − 1)/(a − 1), computed with expm1 (exact near a = 1); a = 1 is reverse_kl.
    """
    if divergence == "reverse_kl" or (divergence == "alpha" and alpha == 1):
        return ratio
    if divergence == "forward_kl":
        return -torch.expm1(-ratio)
    if divergence == "js":
        return math.log(2.0) + F.logsigmoid(ratio)
    return torch.expm1((alpha - 1) * ratio) / (alpha - 1)


def check_divergence(divergence, alpha) -> None:
    if divergence not in DIVERGENCES:
        raise ConfigError(f"loss.divergence must be one of {', '.join(DIVERGENCES)} (got {divergence!r})")
    check_number("divergence_alpha", alpha)


def dpo(
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    divergence_alpha: float = 0.5,
) -> LossOutput:
    """Direct Preference Optimization: −log σ(β·(s_w − s_l)), s the f′-score of r̂ (`f_score`).

    Rafailov et al. 2023, arXiv 2305.18290, Eq. 7 with the default `divergence=reverse_kl` (s = r̂, so
    −log σ(β·h)); the other divergences are f-DPO's (Wang et al. 2023, arXiv 2309.16240): forward_kl,
    js, alpha (with `divergence_alpha` a; a = 1 falls back to reverse_kl). TRL 1.16 clamps the alpha
    exponent at 80 in float32; here it is not clamped (float64 inputs keep the exact value). Rewards are
    β·r̂ whatever the divergence.
    """
    check_positive("beta", beta)
    check_divergence(divergence, divergence_alpha)
    rw, rl = log_ratios(policy, reference, "dpo")
    logits = beta * (f_score(rw, divergence, divergence_alpha) - f_score(rl, divergence, divergence_alpha))
    return reference_output(neg_log_sigmoid(logits), beta, rw, rl)


def dpo_norm(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Length-normalised DPO: −log σ(β·(r̂_w/n_w − r̂_l/n_l)); keeps the reference (TRL's `sigmoid_norm`).

    Rewards stay β·r̂ on the summed log-ratios, as for every loss.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "dpo_norm")
    logits = beta * (rw / policy.chosen_tokens - rl / policy.rejected_tokens)
    return reference_output(neg_log_sigmoid(logits), beta, rw, rl)


def exo(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 1e-3
) -> LossOutput:
    """Pairwise EXO: KL(q ‖ p) = q_w·(log q_w − log(1−ε)) + q_l·(log q_l − log ε), q_w = σ(βh), q_l = σ(−βh).

    Ji et al. 2024, arXiv 2402.00856, Eq. 16 with K = 2: the reverse KL from the model's pair
    distribution q to the smoothed label distribution p = (1−ε, ε); ε must be in (0, 0.5) (ε = 0 would
    make log ε infinite). Its minimum, at σ(βh) = 1−ε, is 0.
    """
    check_positive("beta", beta)
    if not 0 < check_number("label_smoothing", label_smoothing) < 0.5:
        raise ConfigError(f"loss.label_smoothing must be in (0, 0.5) (got {label_smoothing!r})")
    rw, rl = log_ratios(policy, reference, "exo")
    z = beta * (rw - rl)
    log_qw, log_ql = F.logsigmoid(z), F.logsigmoid(-z)
    loss = log_qw.exp() * (log_qw - math.log1p(-label_smoothing)) + log_ql.exp() * (log_ql - math.log(label_smoothing))
    return reference_output(loss, beta, rw, rl)


def discopop(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, tau: float = 0.05) -> LossOutput:
    """DiscoPOP (log-ratio modulated loss): (1 − m)·(−log σ(βh)) + m·e^{−βh}, m = σ(βh/τ).

    Lu et al. 2024, arXiv 2406.08414, Eq. 5. m·e^{−βh} is computed as exp(log σ(βh/τ) − βh), finite for
    very negative βh when τ < 1 (where e^{−βh} alone overflows and m underflows to 0).
    Metric `discopop/mix` is the mean of m.
    """
    check_positive("beta", beta)
    check_positive("tau", tau)
    rw, rl = log_ratios(policy, reference, "discopop")
    z = beta * (rw - rl)
    m = torch.sigmoid(z / tau)
    loss = (1 - m) * neg_log_sigmoid(z) + torch.exp(F.logsigmoid(z / tau) - z)
    return reference_output(loss, beta, rw, rl, **{"discopop/mix": scalar(m)})


def cdpo(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> LossOutput:
    """Conservative DPO: −(1−ε)·log σ(βh) − ε·log σ(−βh), DPO with labels flipped with probability ε.

    Mitchell 2023, "A note on DPO with noisy preferences & relationship to IPO" (cDPO).
    """
    check_positive("beta", beta)
    check_label_smoothing("label_smoothing", label_smoothing)
    rw, rl = log_ratios(policy, reference, "cdpo")
    logits = beta * (rw - rl)
    loss = (1 - label_smoothing) * neg_log_sigmoid(logits) + label_smoothing * neg_log_sigmoid(-logits)
    return reference_output(loss, beta, rw, rl)


def robust(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.1
) -> LossOutput:
    """Robust DPO: [(1−ε)·(−log σ(βh)) − ε·(−log σ(−βh))] / (1−2ε), unbiased under label-flip noise ε.

    Chowdhury et al. 2024, arXiv 2403.00409, Eq. 8.
    """
    check_positive("beta", beta)
    check_label_smoothing("label_smoothing", label_smoothing)
    rw, rl = log_ratios(policy, reference, "robust")
    logits = beta * (rw - rl)
    loss = (1 - label_smoothing) * neg_log_sigmoid(logits) - label_smoothing * neg_log_sigmoid(-logits)
    return reference_output(loss / (1 - 2 * label_smoothing), beta, rw, rl)


def rdpo(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, length_alpha: float = 0.05
) -> LossOutput:
    """Length-regularized DPO (R-DPO): −log σ(β·h − a·(n_w − n_l)).

    Park et al. 2024, arXiv 2403.19159, Eq. 9; the length term removes the reward for being longer.
    """
    check_positive("beta", beta)
    check_nonnegative("length_alpha", length_alpha)
    rw, rl = log_ratios(policy, reference, "rdpo")
    length_gap = (policy.chosen_tokens - policy.rejected_tokens).to(rw.dtype)
    loss = neg_log_sigmoid(beta * (rw - rl) - length_alpha * length_gap)
    return reference_output(loss, beta, rw, rl)


def simpo(
    policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 2.0, gamma: float = 1.0
) -> LossOutput:
    """SimPO: −log σ(β·(ℓ̄_w − ℓ̄_l) − γ), reference-free with per-token averages and a margin γ.

    Meng et al. 2024, arXiv 2405.14734, Eq. 6. `reference` is ignored (the yaml says reference: false).
    """
    check_positive("beta", beta)
    check_number("gamma", gamma)
    loss = neg_log_sigmoid(beta * (policy.chosen_mean - policy.rejected_mean) - gamma)
    return reference_free_output(loss, beta, policy)


def cpo(
    policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1, nll_weight: float = 1.0
) -> LossOutput:
    """Contrastive Preference Optimization: −log σ(β·(ℓ_w − ℓ_l)) + w·(−ℓ_w/n_w); reference-free.

    Xu et al. 2024, arXiv 2401.08417, Eq. 3 with the NLL term of Eq. 4 (per token, as in TRL's
    CPOTrainer). `reference` is ignored (the yaml says reference: false). Rewards β·ℓ̄_w, β·ℓ̄_l like every
    reference-free loss. Metric `cpo/nll` is the mean of −ℓ_w/n_w.
    """
    check_positive("beta", beta)
    check_nonnegative("nll_weight", nll_weight)
    nll = -policy.chosen_mean
    loss = neg_log_sigmoid(beta * (policy.chosen - policy.rejected)) + nll_weight * nll
    return reference_free_output(loss, beta, policy, **{"cpo/nll": scalar(nll)})
