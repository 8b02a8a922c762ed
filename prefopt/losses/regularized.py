"""A Bradley–Terry term plus a likelihood anchor on the responses: DPOP, RPO, TYPO."""

from __future__ import annotations

from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_nonnegative,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
    scalar,
)


def dpop(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, dpop_lambda: float = 50) -> LossOutput:
    """DPO-Positive: −log σ(β·(h − λ·max(0, ℓʳ_w − ℓ_w))).

    Pal et al. 2024 (Smaug), arXiv 2402.13228, Eq. 3: the penalty switches on as soon as the chosen
    likelihood drops below the reference's. Metric `dpop/penalty` is the mean of max(0, ℓʳ_w − ℓ_w).
    """
    check_positive("beta", beta)
    check_nonnegative("dpop_lambda", dpop_lambda)
    rw, rl = log_ratios(policy, reference, "dpop")
    penalty = (-rw).clamp(min=0)  # ℓʳ_w − ℓ_w = −r̂_w
    loss = neg_log_sigmoid(beta * (rw - rl - dpop_lambda * penalty))
    return reference_output(loss, beta, rw, rl, **{"dpop/penalty": scalar(penalty)})


def rpo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, nll_weight: float = 1.0) -> LossOutput:
    """Iterative RPO: −log σ(β·h) + w·(−ℓ_w / n_w), DPO plus the length-normalized NLL of the chosen.

    Pang et al. 2024, arXiv 2404.19733, Eq. 3 (the NLL is divided by the chosen length, as there).
    Metric `rpo/nll` is the mean of −ℓ_w / n_w.
    """
    check_positive("beta", beta)
    check_nonnegative("nll_weight", nll_weight)
    rw, rl = log_ratios(policy, reference, "rpo")
    nll = -policy.chosen_mean
    loss = neg_log_sigmoid(beta * (rw - rl)) + nll_weight * nll
    return reference_output(loss, beta, rw, rl, **{"rpo/nll": scalar(nll)})


def typo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, kl_weight: float = 1.0) -> LossOutput:
    """TYPO, in this project's reading: −log σ(β·(ℓ_w − ℓ_l)) + λ·½·[(ℓʳ_w − ℓ_w) + (ℓʳ_l − ℓ_l)].

    Hu, He, Wipf 2024, arXiv 2407.09072. The published form could not be checked against the paper's
    text, so this implements the reading in docs/losses.md: a reference-free Bradley–Terry term on the
    policy's summed log-probs plus a forward-KL anchor KL(π_ref ‖ π_θ), estimated on the pair's two
    responses as if they were reference samples (true for on-policy pairs). Metric `typo/kl` is the mean
    of that estimate, ½·[(ℓʳ_w − ℓ_w) + (ℓʳ_l − ℓ_l)].
    """
    check_positive("beta", beta)
    check_nonnegative("kl_weight", kl_weight)
    rw, rl = log_ratios(policy, reference, "typo")
    kl = -0.5 * (rw + rl)
    loss = neg_log_sigmoid(beta * (policy.chosen - policy.rejected)) + kl_weight * kl
    return reference_output(loss, beta, rw, rl, **{"typo/kl": scalar(kl)})
