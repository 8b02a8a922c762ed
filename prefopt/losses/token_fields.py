"""Losses that read more than the four sums: LD-DPO (a prefix sum) and WPO (the LM head's Σ p²).

Their yamls declare `needs:`, so the engine and the reference cache compute the optional `PairLogps`
fields (see `prefopt.losses.base.FIELD_GROUPS`) for them and for no other loss.
"""

from __future__ import annotations

import torch

from prefopt.errors import ConfigError
from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_number,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
    require_reference,
    scalar,
)


def ld_dpo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, ld_alpha: float = 0.5) -> LossOutput:
    """LD-DPO: DPO on length-desensitised log-probs ℓ′ = ℓ_{≤m} + a·(ℓ − ℓ_{≤m}), m = min(n_w, n_l).

    Liu et al. 2024, arXiv 2409.06411, Eq. 12: the tokens beyond the shorter completion's length count
    with weight a ∈ [0, 1], for policy and reference alike; a = 1 is DPO. ℓ_{≤m} comes from the
    `prefix_logps` fields. Rewards are β·r̂ on the plain summed log-ratios (TRL 1.16 reports them on ℓ′).
    Metric `ld_dpo/tail_tokens`: mean of |n_w − n_l|, the tokens down-weighted per pair.
    """
    check_positive("beta", beta)
    if not 0 <= check_number("ld_alpha", ld_alpha) <= 1:
        raise ConfigError(f"loss.ld_alpha must be in [0, 1] (got {ld_alpha!r})")
    rw, rl = log_ratios(policy, reference, "ld_dpo")
    ref = require_reference(reference, "ld_dpo")

    def desensitised(p: PairLogps) -> tuple[torch.Tensor, torch.Tensor]:
        cw, cl = p.require("prefix_logps", "ld_dpo")
        return cw + ld_alpha * (p.chosen - cw), cl + ld_alpha * (p.rejected - cl)

    (pw, pl), (qw, ql) = desensitised(policy), desensitised(ref)
    loss = neg_log_sigmoid(beta * ((pw - qw) - (pl - ql)))
    tail = (policy.chosen_tokens - policy.rejected_tokens).abs().to(loss.dtype)
    return reference_output(loss, beta, rw, rl, **{"ld_dpo/tail_tokens": scalar(tail)})


def wpo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """WPO: −w_w·w_l·log σ(βh), w = exp(mean over completion tokens of (log p_t − log Σ_v p_v²)), detached.

    Zhou et al. 2024, arXiv 2406.11827, Eq. 2 with the aligned weights of §3.2 (as TRL's
    `use_weighting`): the policy's own per-token probability, normalised by the policy's Σ_v p_v², so an
    on-policy-looking pair weighs more. The sums come from the `head_logps` fields (policy's, no gradient).
    Metric `wpo/weight`: mean of w_w·w_l.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "wpo")
    hw, hl = policy.require("head_logps", "wpo")
    weight = (torch.exp(hw / policy.chosen_tokens) * torch.exp(hl / policy.rejected_tokens)).detach()
    loss = weight * neg_log_sigmoid(beta * (rw - rl))
    return reference_output(loss, beta, rw, rl, **{"wpo/weight": scalar(weight)})
