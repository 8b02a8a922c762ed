"""Bradley–Terry (logistic) preference losses: DPO and the variants that only reshape its logit or labels."""

from __future__ import annotations

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
)


def dpo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Direct Preference Optimization: −log σ(β·h), h = r̂_w − r̂_l.

    Rafailov et al. 2023, arXiv 2305.18290, Eq. 7.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "dpo")
    return reference_output(neg_log_sigmoid(beta * (rw - rl)), beta, rw, rl)


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
