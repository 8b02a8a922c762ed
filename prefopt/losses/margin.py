"""Losses that pull the log-ratio margin toward a target instead of pushing it to infinity: IPO, SLiC, Cal-DPO."""

from __future__ import annotations

from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_bool,
    check_nonnegative,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
    scalar,
)


def ipo(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, length_normalize: bool = True
) -> LossOutput:
    """Identity Preference Optimization: (h − 1/(2β))², β = τ.

    Azar et al. 2023, arXiv 2310.12036, Eq. 17. With `length_normalize` h is built from per-token average
    log-ratios, r̂_w/n_w − r̂_l/n_l (as the public implementations do), else from the summed ones.
    Rewards are β·r̂ on summed log-ratios either way, like every other loss.
    """
    check_positive("beta", beta)
    check_bool("length_normalize", length_normalize)
    rw, rl = log_ratios(policy, reference, "ipo")
    if length_normalize:
        h = rw / policy.chosen_tokens - rl / policy.rejected_tokens
    else:
        h = rw - rl
    return reference_output((h - 1 / (2 * beta)) ** 2, beta, rw, rl)


def slic(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """SLiC hinge on the log-ratio margin: max(0, 1 − β·h).

    Zhao et al. 2023 (SLiC-HF), arXiv 2305.10425, Eq. 2, in the reference-ratio form the BPO paper
    (arXiv 2506.03557) uses as its SLiC baseline.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "slic")
    return reference_output((1 - beta * (rw - rl)).clamp(min=0), beta, rw, rl)


def caldpo(
    policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1, calibration_weight: float = 0.5
) -> LossOutput:
    """Cal-DPO: −log σ(r̂_w − r̂_l) + c·[(r̂_w − 1/(2β))² + (r̂_l + 1/(2β))²].

    Xiao et al. 2024, arXiv 2412.14516, Eq. 9. The Bradley–Terry term has no β (as in the paper); the
    calibration term pins the chosen log-ratio at +1/(2β) and the rejected at −1/(2β), so the chosen
    likelihood cannot drift down. Metric `caldpo/calibration` is the unweighted calibration term's mean.
    """
    check_positive("beta", beta)
    check_nonnegative("calibration_weight", calibration_weight)
    rw, rl = log_ratios(policy, reference, "caldpo")
    target = 1 / (2 * beta)
    calibration = (rw - target) ** 2 + (rl + target) ** 2
    loss = neg_log_sigmoid(rw - rl) + calibration_weight * calibration
    return reference_output(loss, beta, rw, rl, **{"caldpo/calibration": scalar(calibration)})


def sppo(policy: PairLogps, reference: PairLogps | None, *, beta: float = 0.1) -> LossOutput:
    """Hard-label SPPO: (r̂_w − 1/(2β))² + (r̂_l + 1/(2β))².

    Wu et al. 2024, arXiv 2405.00675, Eq. 4.7 with the win probability set to 1 for the chosen and 0 for
    the rejected response (TRL's `sppo_hard`): each log-ratio is regressed onto ±1/(2β) on its own.
    """
    check_positive("beta", beta)
    rw, rl = log_ratios(policy, reference, "sppo")
    target = 1 / (2 * beta)
    return reference_output((rw - target) ** 2 + (rl + target) ** 2, beta, rw, rl)
