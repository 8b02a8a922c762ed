"""BPO: balanced preference optimization, a loss on the weaker of the chosen gain and the rejected drop."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_number,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
)

# f(u) for each `form`: all decreasing in u, so the loss rewards a larger min(r̂_w, −α·r̂_l).
FORMS: dict[str, Callable[[Tensor], Tensor]] = {
    "logistic": lambda u: neg_log_sigmoid(u),
    "hinge": lambda u: F.relu(1 - u),
    "square": lambda u: (u - 1) ** 2,
    "exponential": lambda u: torch.exp(-u),
    "truncated_quadratic": lambda u: F.relu(1 - u) ** 2,
    "savage": lambda u: torch.sigmoid(-u) ** 2,  # 1 / (1 + eᵘ)², without overflow
}


def bpo(
    policy: PairLogps,
    reference: PairLogps | None,
    *,
    beta: float = 0.1,
    alpha: float = 0.3,
    form: str = "hinge",
) -> LossOutput:
    """Balanced Preference Optimization: f(u), u = β·min(r̂_w, −α·r̂_l), f chosen by `form`.

    Sun et al. 2025, arXiv 2506.03557 (balanced reward margin with gap adaptor α ∈ (0, 1]; α = 1 is the
    plain balanced variant). Only the active branch of the min gets a gradient (torch.minimum), so a pair
    either raises the chosen likelihood or lowers the rejected one, never trades one for the other.
    Metric `bpo/chosen_branch_frac`: share of pairs whose chosen branch is the min; ties count ½, as
    torch.minimum splits the gradient evenly there.
    """
    check_positive("beta", beta)
    if not 0 < check_number("alpha", alpha) <= 1:
        raise ConfigError(f"loss.alpha must be in (0, 1] (got {alpha!r})")
    if form not in FORMS:
        raise ConfigError(f"loss.form must be one of {', '.join(FORMS)} (got {form!r})")
    rw, rl = log_ratios(policy, reference, "bpo")
    chosen_branch, rejected_branch = rw, -alpha * rl
    u = beta * torch.minimum(chosen_branch, rejected_branch)
    active = (chosen_branch < rejected_branch).float() + 0.5 * (chosen_branch == rejected_branch).float()
    return reference_output(FORMS[form](u), beta, rw, rl, **{"bpo/chosen_branch_frac": active.detach().mean()})
