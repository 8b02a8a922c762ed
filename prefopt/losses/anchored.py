"""Losses that score each response's log-ratio on its own (anchored at 0), not only their difference: NCA, APO."""

from __future__ import annotations

import torch

from prefopt.losses.base import LossOutput, PairLogps, check_positive, log_ratios, neg_log_sigmoid, reference_output


def nca(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Noise Contrastive Alignment (pairwise NCA): −log σ(β r̂_w) − ½·log σ(−β r̂_w) − ½·log σ(−β r̂_l).

    Chen et al. 2024, arXiv 2402.05369, Eq. 12 with K = 1 rejected response; the absolute terms keep the
    chosen likelihood from falling, unlike DPO's relative term.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "nca")
    zw, zl = beta * rw, beta * rl
    loss = neg_log_sigmoid(zw) + 0.5 * neg_log_sigmoid(-zw) + 0.5 * neg_log_sigmoid(-zl)
    return reference_output(loss, beta, rw, rl)


def apo_zero(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Anchored Preference Optimization, zero variant: (1 − σ(β r̂_w)) + σ(β r̂_l).

    D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 6: raises the chosen likelihood and lowers the
    rejected one (for when the chosen responses are better than the model's own).
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "apo_zero")
    loss = (1 - torch.sigmoid(beta * rw)) + torch.sigmoid(beta * rl)
    return reference_output(loss, beta, rw, rl)


def apo_down(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Anchored Preference Optimization, down variant: σ(β r̂_w) + (1 − σ(β r̂_w − β r̂_l)).

    D'Oosterlinck et al. 2024, arXiv 2408.06266, Eq. 7: lowers both likelihoods, the rejected one more
    (for when the model is already better than the chosen responses).
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "apo_down")
    loss = torch.sigmoid(beta * rw) + (1 - torch.sigmoid(beta * rw - beta * rl))
    return reference_output(loss, beta, rw, rl)


def bco_pair(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Paired BCO: −log σ(β r̂_w) − log σ(−β r̂_l), each response classified on its own log-ratio.

    Jung et al. 2024, arXiv 2404.04656, in the paired form TRL calls `bco_pair`: without BCO's running
    reward shift δ (docs/losses.md).
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "bco_pair")
    loss = neg_log_sigmoid(beta * rw) + neg_log_sigmoid(-beta * rl)
    return reference_output(loss, beta, rw, rl)
