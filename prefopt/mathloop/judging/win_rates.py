"""Statistics of a judged (pairwise) evaluation: win rate, length-controlled win rate, lengths, 95% intervals.

Each prompt i gives a preference p_i ∈ [0, 1] for the policy's answer over the baseline's (1 win, ½ tie, 0
loss; a judge asked in both orders gives the mean of the two) and the two answers' lengths (characters).

- win rate = mean p_i (ties count ½).
- length-controlled win rate (the idea of AlpacaEval 2's, Dubois et al. 2024, for one policy against one
  baseline): fit the logistic model  logit P(policy preferred) = a + b · tanh(Δ_i / σ),  Δ_i = len(policy_i) −
  len(baseline_i), σ = the standard deviation of the Δ_i (population; the term is dropped when σ = 0), by
  maximum likelihood (Newton's method) with the p_i as fractional targets (binomial log-likelihood, plus a ridge of
  1e-4·(a² + b²) so that a policy that wins every prompt keeps finite estimates), and report the fitted
  preference at zero length difference, sigmoid(a). AlpacaEval 2 fits the same length term jointly over many
  models with an instruction-difficulty term; with one pair of models that term is not identifiable, so it is
  not fitted here.
- 95% intervals: percentile bootstrap over prompts (`resamples` draws of n prompts with replacement, seeded).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import numpy.typing as npt
from scipy.special import expit, log_expit

from prefopt.errors import DataError

RIDGE = 1e-4


def win_rate(prefs: Sequence[float]) -> float:
    """Mean preference for the policy: wins 1, ties ½, losses 0."""
    p = np.asarray(prefs, dtype=float)
    if p.size == 0:
        raise DataError("win rate of no prompts")
    return float(p.mean())


def length_feature(policy_lengths: npt.ArrayLike, baseline_lengths: npt.ArrayLike) -> np.ndarray:
    """tanh(Δ / σ) per prompt; zeros when the length differences do not vary (σ = 0)."""
    diff = np.asarray(policy_lengths, dtype=float) - np.asarray(baseline_lengths, dtype=float)
    sigma = diff.std()
    return np.tanh(diff / sigma) if sigma > 0 else np.zeros_like(diff)


def _penalised_nll(theta: np.ndarray, p: np.ndarray, x: np.ndarray) -> float:
    z = theta[0] + theta[1] * x
    return float(-(p * log_expit(z) + (1 - p) * log_expit(-z)).sum() + RIDGE * (theta @ theta))


def fit_length_model(prefs: npt.ArrayLike, feature: np.ndarray) -> tuple[float, float]:
    """(a, b) of logit P = a + b·x by ridge-penalised binomial maximum likelihood with fractional targets.

    Newton's method with step halving on the (strictly convex) penalised negative log-likelihood.
    """
    p, x = np.asarray(prefs, dtype=float), np.asarray(feature, dtype=float)
    design = np.stack([np.ones_like(x), x], axis=1)
    theta, current = np.zeros(2), _penalised_nll(np.zeros(2), p, x)
    for _ in range(100):
        mu = expit(design @ theta)
        grad = design.T @ (mu - p) + 2 * RIDGE * theta
        hess = (design * (mu * (1 - mu))[:, None]).T @ design + 2 * RIDGE * np.eye(2)
        step = np.linalg.solve(hess, grad)
        scale = 1.0
        while scale > 1e-8 and _penalised_nll(theta - scale * step, p, x) > current:
            scale /= 2
        theta = theta - scale * step
        new = _penalised_nll(theta, p, x)
        if abs(current - new) < 1e-12 and np.abs(grad).max() < 1e-8:
            break
        current = new
    return float(theta[0]), float(theta[1])


def length_controlled_win_rate(
    prefs: npt.ArrayLike, policy_lengths: npt.ArrayLike, baseline_lengths: npt.ArrayLike
) -> float:
    """sigmoid(a) of the fitted length model: the preference at zero length difference."""
    a, _ = fit_length_model(prefs, length_feature(policy_lengths, baseline_lengths))
    return float(expit(a))


@dataclass
class JudgedStats:
    """What a judged evaluation reports (fractions in [0, 1]; lengths in characters)."""

    prompts: int
    win_rate: float
    win_rate_low: float
    win_rate_high: float
    lc_win_rate: float
    lc_win_rate_low: float
    lc_win_rate_high: float
    wins: int
    ties: int
    losses: int
    policy_length: float
    baseline_length: float
    length_slope: float  # b of the length model: how much the judge's preference follows length

    def metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}/{k}": float(v) for k, v in asdict(self).items()}


def judged_stats(
    prefs: Sequence[float],
    policy_lengths: Sequence[float],
    baseline_lengths: Sequence[float],
    resamples: int = 1000,
    seed: int = 0,
) -> JudgedStats:
    """Win rate, length-controlled win rate, their percentile-bootstrap 95% intervals over prompts, and lengths."""
    p = np.asarray(prefs, dtype=float)
    lp, lb = np.asarray(policy_lengths, dtype=float), np.asarray(baseline_lengths, dtype=float)
    if not (p.size == lp.size == lb.size) or p.size == 0:
        raise DataError(
            f"judged statistics need as many preferences, policy lengths and baseline lengths "
            f"(> 0), got {p.size}, {lp.size}, {lb.size}"
        )
    if ((p < 0) | (p > 1)).any():
        raise DataError("judged statistics: preferences must lie in [0, 1]")
    a, b = fit_length_model(p, length_feature(lp, lb))
    rng = np.random.default_rng(seed)
    wr, lc = [], []
    for _ in range(resamples):
        idx = rng.integers(0, p.size, p.size)
        wr.append(p[idx].mean())
        lc.append(length_controlled_win_rate(p[idx], lp[idx], lb[idx]))
    wr_lo, wr_hi = np.percentile(wr, [2.5, 97.5]) if resamples else (np.nan, np.nan)
    lc_lo, lc_hi = np.percentile(lc, [2.5, 97.5]) if resamples else (np.nan, np.nan)
    return JudgedStats(
        prompts=int(p.size),
        win_rate=float(p.mean()),
        win_rate_low=float(wr_lo),
        win_rate_high=float(wr_hi),
        lc_win_rate=float(expit(a)),
        lc_win_rate_low=float(lc_lo),
        lc_win_rate_high=float(lc_hi),
        wins=int((p > 0.5).sum()),
        ties=int((p == 0.5).sum()),
        losses=int((p < 0.5).sum()),
        policy_length=float(lp.mean()),
        baseline_length=float(lb.mean()),
        length_slope=b,
    )


def preference_from_scores(policy_score: float, baseline_score: float) -> float:
    """A reward-model judge's preference: 1 when the policy's answer scores higher, ½ on equal scores, else 0. The
    same rule scores whether a reward model orders a (correct, wrong) pair as the answer checker does."""
    return 1.0 if policy_score > baseline_score else 0.5 if policy_score == baseline_score else 0.0
