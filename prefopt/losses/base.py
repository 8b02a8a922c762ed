"""Containers every loss speaks (PairLogps in, LossOutput out) and the numeric helpers they share."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field, fields, replace
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor

from prefopt.errors import ConfigError

# Optional per-sequence fields of PairLogps, by the name a loss yaml's `needs:` lists. The engine, the packed
# layouts and the reference cache compute a group only when the loss asks for it (see prefopt.logprobs).
FIELD_GROUPS: dict[str, tuple[str, str]] = {
    # ℓ_{≤m}: the log-prob summed over the first m = min(n_w, n_l) completion tokens (LD-DPO)
    "prefix_logps": ("chosen_prefix", "rejected_prefix"),
    # Σ_t (log p_t − log Σ_v p_v²) over the completion tokens (WPO's aligned log-prob), no gradient
    "head_logps": ("chosen_head", "rejected_head"),
}


@dataclass
class PairLogps:
    """Log-probabilities of a batch of preference pairs under one model, all of shape (B,).

    `chosen` / `rejected` are summed over completion tokens only (prompt and padding masked out);
    `chosen_tokens` / `rejected_tokens` are the completion token counts (int or float tensors).
    The optional fields (None unless a loss's yaml `needs:` their group, see `FIELD_GROUPS`):
    `chosen_prefix` / `rejected_prefix` = ℓ_{≤m}, m = min(n_w, n_l); `chosen_head` / `rejected_head` =
    Σ_t (log p_t − log Σ_v p_v²); and the diagnostics `chosen_entropy` / `rejected_entropy` (summed
    per-token entropy of the model's next-token distribution) and `chosen_top1` (how many chosen tokens
    are the model's argmax), which the engine turns into the `entropy` and `mean_token_accuracy` metrics.
    `chosen_token_logps` / `rejected_token_logps` (B, T), asked for by the evaluation only: each completion
    token's log-prob in completion order, zeros past the completion's token count.
    """

    chosen: Tensor
    rejected: Tensor
    chosen_tokens: Tensor
    rejected_tokens: Tensor
    chosen_prefix: Tensor | None = None
    rejected_prefix: Tensor | None = None
    chosen_head: Tensor | None = None
    rejected_head: Tensor | None = None
    chosen_entropy: Tensor | None = None
    rejected_entropy: Tensor | None = None
    chosen_top1: Tensor | None = None
    chosen_token_logps: Tensor | None = None
    rejected_token_logps: Tensor | None = None

    @property
    def chosen_mean(self) -> Tensor:
        """ℓ̄_w = ℓ_w / n_w, the per-token average log-prob of the chosen completion."""
        return self.chosen / self.chosen_tokens

    @property
    def rejected_mean(self) -> Tensor:
        """ℓ̄_l = ℓ_l / n_l."""
        return self.rejected / self.rejected_tokens

    def detach(self) -> PairLogps:
        return replace(
            self, **{f.name: getattr(self, f.name).detach() for f in fields(self) if getattr(self, f.name) is not None}
        )

    def require(self, group: str, key: str) -> tuple[Tensor, Tensor]:
        """The (chosen, rejected) tensors of an optional field group; a clear error when they were not computed."""
        names = FIELD_GROUPS[group]
        values = tuple(getattr(self, n) for n in names)
        if any(v is None for v in values):
            raise ConfigError(
                f"loss '{key}' needs the PairLogps fields {', '.join(names)} (its yaml says "
                f"needs: [{group}]) but they were not computed"
            )
        return values


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
    return cast(float, value)


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
