"""α-DPO: SimPO's reference-free logit with an adaptive, standardized reference margin (stateful)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.losses.base import (
    LossOutput,
    PairLogps,
    check_nonnegative,
    check_number,
    check_positive,
    log_ratios,
    neg_log_sigmoid,
    reference_output,
    scalar,
)


def global_mean_std(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and unbiased std of x over the global batch (all ranks when data-parallel), in float64.

    Two all-reduces (sum and count, then the sum of squared deviations) rather than gathering, so ranks
    may hold different numbers of pairs, and the variance is not a difference of large sums. With a
    single pair in the global batch the unbiased std is undefined; it comes out as 0 here (the sum of
    squared deviations is 0 and the divisor is clamped to 1), and the caller's epsilon guard takes over.
    """
    x = x.detach().double().reshape(-1)
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    stats = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=x.dtype, device=x.device)])
    if distributed:
        dist.all_reduce(stats)
    total, count = stats[0], stats[1]
    mean = total / count
    squares = ((x - mean) ** 2).sum()
    if distributed:
        dist.all_reduce(squares)
    std = torch.sqrt(squares / (count - 1).clamp(min=1))
    return mean, std


class AlphaDPO:
    """α-DPO: −log σ(β·(ℓ̄_w − ℓ̄_l − M) − γ), M = sg(α·(Δ − μ)/s), Δ = (ℓ̄_w − ℓ̄_l) − (ℓ̄ʳ_w − ℓ̄ʳ_l).

    Wu et al. 2024, arXiv 2410.10148, Eq. 11, with the running statistics of docs/losses.md: in training
    mode, before use and without gradient, μ ← m·μ + (1−m)·mean(Δ) and s ← m·s + (1−m)·std(Δ) (unbiased std,
    both start at 0, no bias correction; mean and std over the global batch under data parallelism, so
    every rank computes the same margin). In eval mode the current μ, s are used and not updated. s is
    guarded by `EPS` (a batch of one pair has std 0). The reference averages use the policy's token counts:
    the completions are the same. Metrics: `alpha_dpo/mu`, `alpha_dpo/std`, `alpha_dpo/margin` (mean M).
    """

    EPS = 1e-8

    def __init__(self, *, beta: float = 2.5, gamma: float = 1.5, alpha: float = 0.2, momentum: float = 0.9):
        check_positive("beta", beta)
        check_number("gamma", gamma)
        check_nonnegative("alpha", alpha)
        if not 0 <= check_number("momentum", momentum) < 1:
            raise ConfigError(f"loss.momentum must be in [0, 1) (got {momentum!r})")
        self.beta, self.gamma, self.alpha, self.momentum = beta, gamma, alpha, momentum
        self.mu = torch.zeros((), dtype=torch.float64)
        self.std = torch.zeros((), dtype=torch.float64)
        self.steps = 0
        self.training = True

    def train(self, mode: bool = True) -> AlphaDPO:
        self.training = mode
        return self

    def eval(self) -> AlphaDPO:
        return self.train(False)

    def state_dict(self) -> dict:
        return {"mu": float(self.mu), "std": float(self.std), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - {"mu", "std", "steps"}
        if unknown or not {"mu", "std"} <= set(state):
            raise ValueError(f"alpha_dpo state must have keys mu, std[, steps] (got {sorted(state)})")
        self.mu = torch.as_tensor(float(state["mu"]), dtype=torch.float64)
        self.std = torch.as_tensor(float(state["std"]), dtype=torch.float64)
        self.steps = int(state.get("steps", 0))

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        rw, rl = log_ratios(policy, reference, "alpha_dpo")
        avg_margin = policy.chosen_mean - policy.rejected_mean
        delta = (rw / policy.chosen_tokens - rl / policy.rejected_tokens).detach()
        # State lives on the batch's device so the update needs no host sync.
        self.mu, self.std = self.mu.to(delta.device), self.std.to(delta.device)
        if self.training:
            mean, std = global_mean_std(delta)
            m = self.momentum
            self.mu = m * self.mu + (1 - m) * mean
            self.std = m * self.std + (1 - m) * std
            self.steps += 1
        # In float64, so the epsilon guard survives low-precision inputs.
        margin = (self.alpha * (delta.double() - self.mu) / self.std.clamp(min=self.EPS)).to(delta.dtype)
        loss = neg_log_sigmoid(self.beta * (avg_margin - margin) - self.gamma)
        return reference_output(
            loss,
            self.beta,
            rw,
            rl,
            **{"alpha_dpo/mu": scalar(self.mu), "alpha_dpo/std": scalar(self.std), "alpha_dpo/margin": scalar(margin)},
        )
