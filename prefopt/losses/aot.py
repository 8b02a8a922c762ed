"""Alignment via Optimal Transport: DPO's logistic loss on sorted margins, a distributional constraint."""

from __future__ import annotations

import torch
from torch import Tensor

from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_label_smoothing,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
    require_reference,
)


def _smoothed_logistic(delta: Tensor, beta: float, label_smoothing: float) -> Tensor:
    z = beta * delta
    return (1 - label_smoothing) * neg_log_sigmoid(z) + label_smoothing * neg_log_sigmoid(-z)


def aot(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> LossOutput:
    """Paired AOT: −(1−ε)·log σ(βδ) − ε·log σ(−βδ), δ = sort(ℓ_w − ℓ_l) − sort(ℓʳ_w − ℓʳ_l).

    Melnyk et al. 2024, arXiv 2406.05882 (AOT paired): the policy's margin distribution must dominate
    the reference's, compared quantile by quantile. The sort runs over the pairs of one loss call, i.e.
    one micro-batch (under data parallelism one rank's micro-batch, as TRL sorts per device), so the
    result depends on `micro_batch_size`. The i-th loss entry belongs to the i-th quantile, not to pair
    i; the rewards are the pairs' own β·r̂ (unsorted), like every loss's.
    """
    check_positive("beta", beta)
    check_label_smoothing("label_smoothing", label_smoothing)
    rw, rl = log_ratios(policy, reference, "aot")
    ref = require_reference(reference, "aot")
    delta = torch.sort(policy.chosen - policy.rejected).values - torch.sort(ref.chosen - ref.rejected).values
    return reference_output(_smoothed_logistic(delta, beta, label_smoothing), beta, rw, rl)


def aot_unpaired(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, label_smoothing: float = 0.0
) -> LossOutput:
    """Unpaired AOT: as `aot` with δ = sort(r̂_w) − sort(r̂_l), the chosen log-ratios' distribution against
    the rejected ones'. Melnyk et al. 2024, arXiv 2406.05882. Sorted over one micro-batch, like `aot`.
    """
    check_positive("beta", beta)
    check_label_smoothing("label_smoothing", label_smoothing)
    rw, rl = log_ratios(policy, reference, "aot_unpaired")
    delta = torch.sort(rw).values - torch.sort(rl).values
    return reference_output(_smoothed_logistic(delta, beta, label_smoothing), beta, rw, rl)
