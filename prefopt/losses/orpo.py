"""ORPO: supervised fine-tuning plus an odds-ratio preference term, with no reference model."""

from __future__ import annotations

from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_positive,
    log1mexp,
    neg_log_sigmoid,
    reference_free_output,
    scalar,
)


def orpo(policy: PairLogps, reference: PairLogps | None = None, *, beta: float = 0.1) -> LossOutput:
    """Odds Ratio Preference Optimization: −ℓ̄_w − β·log σ(z), β = λ.

    Hong et al. 2024, arXiv 2403.07691, Eqs. 6–7: z = log odds(ℓ̄_w) − log odds(ℓ̄_l)
    = (ℓ̄_w − ℓ̄_l) − [log(1 − e^{ℓ̄_w}) − log(1 − e^{ℓ̄_l})], with a stable log(1 − eˣ).
    `reference` is ignored (the yaml says reference: false). Metrics: `orpo/log_odds` (mean z) and
    `orpo/nll` (mean −ℓ̄_w).
    """
    check_positive("beta", beta)
    lw, ll = policy.chosen_mean, policy.rejected_mean
    log_odds = (lw - ll) - (log1mexp(lw) - log1mexp(ll))
    nll = -lw
    loss = nll + beta * neg_log_sigmoid(log_odds)
    return reference_free_output(loss, beta, policy, **{"orpo/log_odds": scalar(log_odds), "orpo/nll": scalar(nll)})
