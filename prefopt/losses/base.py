"""Containers every loss speaks (PairLogps in, LossOutput out) and the numeric helpers they share."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError


@dataclass
class PairLogps:
    """Log-probabilities of a batch of preference pairs under one model, all of shape (B,).

    `chosen` / `rejected` are summed over completion tokens only (prompt and padding masked out);
    `chosen_tokens` / `rejected_tokens` are the completion token counts (int or float tensors).
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor

    @property
    def chosen_mean(self) -> Tensor:
        """ℓ̄_w = ℓ_w / n_w, the per-token average log-prob of the chosen completion."""
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> Tensor:
        """ℓ̄_l = ℓ_l / n_l."""
        return self.rejected / self.rejected_tokens

    def detach(self) -> PairLogps:
        return PairLogps(
            self.chosen.detach(),
            self.rejected.detach(),
            self.chosen_tokens.detach(),
            self.rejected_tokens.detach(),
        )


@dataclass
class LossOutput:
    """What a loss returns: the (B,) per-pair loss, detached (B,) rewards, and its own scalar metrics."""

    loss: Tensor
    chosen_reward: Tensor
    rejected_reward: Tensor
    metrics: dict[str, Tensor] = field(default_factory=dict)


class MissingReference(ConfigError):
    """A loss that needs reference log-probs got `reference=None`."""


# ----------------------------------------------------------------------------- numerics


def neg_log_sigmoid(z: Tensor) -> Tensor:
    """−log σ(z), computed as softplus(−z) so it neither overflows nor loses precision."""
    return F.softplus(-z)


_LOG_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, stable at both ends (Mächler 2012, "Accurately computing log(1 − exp(−|a|))").

    Near 0, 1 − eˣ cancels catastrophically, so use log(−expm1(x)); far below, eˣ underflows harmlessly
    and log1p(−eˣ) is exact. x = 0 (a log-prob of exactly 0, e.g. in low precision) is clamped to the
    largest negative float so the result stays finite.
    """
    x = x.clamp(max=-torch.finfo(x.dtype).tiny)
    near = x > _LOG_HALF
    # Each branch gets a harmless stand-in where it is not selected, so its gradient cannot be NaN.
    stand_in = torch.full_like(x, -1.0)
    near_val = torch.log(-torch.expm1(torch.where(near, x, stand_in)))
    far_val = torch.log1p(-torch.exp(torch.where(near, stand_in, x)))
    return torch.where(near, near_val, far_val)


def scalar(x: Tensor) -> Tensor:
    """A metric value: the batch mean as a detached 0-dim tensor."""
    return x.detach().float().mean()


# ----------------------------------------------------------------------------- building blocks


def require_reference(reference: PairLogps | None, key: str) -> PairLogps:
    if reference is None:
        raise MissingReference(
            f"loss '{key}' needs reference log-probs (its yaml says reference: true) but got reference=None"
        )
    return reference


def log_ratios(policy: PairLogps, reference: PairLogps | None, key: str) -> tuple[Tensor, Tensor]:
    """(r̂_w, r̂_l) = (ℓ_w − ℓʳ_w, ℓ_l − ℓʳ_l), the summed policy/reference log-ratios."""
    ref = require_reference(reference, key)
    return policy.chosen - ref.chosen, policy.rejected - ref.rejected


def reference_output(
    loss: Tensor, beta: float, chosen_ratio: Tensor, rejected_ratio: Tensor, **metrics: Tensor
) -> LossOutput:
    """LossOutput with the rewards every reference loss reports: β·r̂_w and β·r̂_l (summed, detached)."""
    return LossOutput(
        loss=loss,
        chosen_reward=(beta * chosen_ratio).detach(),
        rejected_reward=(beta * rejected_ratio).detach(),
        metrics=metrics,
    )


def reference_free_output(loss: Tensor, beta: float, policy: PairLogps, **metrics: Tensor) -> LossOutput:
    """LossOutput with the rewards a reference-free loss reports: β·ℓ̄_w and β·ℓ̄_l (detached)."""
    return LossOutput(
        loss=loss,
        chosen_reward=(beta * policy.chosen_mean).detach(),
        rejected_reward=(beta * policy.rejected_mean).detach(),
        metrics=metrics,
    )


# ----------------------------------------------------------------------------- hyper-parameter checks
# Each loss checks its own hyper-parameters; the Loss wrapper runs the loss once on a dummy pair at
# construction, so a bad value fails before any model is loaded. Messages name the config key.


def check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ConfigError(f"loss.{name} must be a finite number (got {value!r})")
    return value


def check_positive(name: str, value) -> None:
    if check_number(name, value) <= 0:
        raise ConfigError(f"loss.{name} must be > 0 (got {value!r})")


def check_nonnegative(name: str, value) -> None:
    if check_number(name, value) < 0:
        raise ConfigError(f"loss.{name} must be >= 0 (got {value!r})")


def check_label_smoothing(name: str, value) -> None:
    # ε = 0.5 makes the robust loss divide by zero and the cDPO loss ignore the labels.
    if not 0 <= check_number(name, value) < 0.5:
        raise ConfigError(f"loss.{name} must be in [0, 0.5) (got {value!r})")


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(f"loss.{name} must be true or false (got {value!r})")
