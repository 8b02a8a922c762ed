"""Where a loss's reference log-probs come from: one interface, `ReferenceProvider`, in four forms.

- `FrozenReference`: a frozen copy of the initial policy, run beside it;
- `AdapterOffReference`: LoRA, the policy's own base with its adapters switched off (no second copy);
- `prefopt.refcache.ReferenceCache`: the initial policy's log-probs, computed once and read from disk;
- `MovingReference`: TR-DPO's reference, a frozen copy moved toward the policy every few steps.

The engine's `Trainer` calls `attach` once in its set-up (after the policy is wrapped for DDP/FSDP), `logps`
for every micro-batch, `after_step` after every optimizer step, and `state_dict` / `load_state_dict` with its
checkpoints. `choose_reference` picks the form for a loss and refuses TR-DPO where the reference cannot move.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.distributed.fsdp import FSDPModule

from prefopt.data.batching import PreferenceBatch, TokenizedPair
from prefopt.errors import ConfigError
from prefopt.losses import PairLogps


class ReferenceProvider:
    """The reference `PairLogps` of a micro-batch; the hooks a moving reference needs default to nothing."""

    def attach(self, *, policy: torch.nn.Module, policy_logps: Callable, wrap: Callable, hardware: Any) -> None:
        """Called once by the Trainer's set-up. `policy`: the unwrapped policy; `policy_logps`: its wrapped
        log-prob module; `wrap(model)`: a frozen model as a wrapped log-prob module of the same arithmetic."""

    def logps(self, batch: PreferenceBatch, pairs: Sequence[TokenizedPair], per_token: bool = False) -> PairLogps:
        """The reference log-probs of `batch` (collated from `pairs`, on the device); called without gradients.
        `per_token` (the evaluation's held-out pairs): with each completion token's log-prob too."""
        raise NotImplementedError

    def after_step(self, step: int) -> None:
        """After optimizer step `step` (counted from 1), before that step's evaluation and checkpoint."""

    def state_dict(self) -> dict:
        """What a checkpoint must keep of the reference (collective under FSDP); {} for a fixed reference."""
        return {}

    def load_state_dict(self, state: dict, path) -> None:
        """Restore what `state_dict` kept, from the trainer state of the checkpoint at `path`."""


class FrozenReference(ReferenceProvider):
    """A frozen copy of the initial policy (`prefopt.models.freeze`), wrapped as the policy is."""

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.model_logps: Any = None  # the wrapped log-prob module, set by `attach`

    def attach(self, *, policy, policy_logps, wrap, hardware) -> None:
        self.model_logps = wrap(self.model)

    def logps(self, batch, pairs, per_token: bool = False) -> PairLogps:
        return self.model_logps(batch, per_token=True) if per_token else self.model_logps(batch)


class AdapterOffReference(ReferenceProvider):
    """LoRA: the policy's own base, its adapters switched off by `context()` (`prefopt.models.reference_context`)."""

    def __init__(self, context: Callable):
        self.context = context
        self.policy_logps: Any = None  # set by `attach`

    def attach(self, *, policy, policy_logps, wrap, hardware) -> None:
        self.policy_logps = policy_logps

    def logps(self, batch, pairs, per_token: bool = False) -> PairLogps:
        with self.context():
            return self.policy_logps(batch, per_token=True) if per_token else self.policy_logps(batch)


class MovingReference(FrozenReference):
    """TR-DPO (Gorbatovski et al. 2024, arXiv 2404.09656): θ_ref ← α·θ + (1 − α)·θ_ref every `every` steps."""

    def __init__(self, model: torch.nn.Module, every: int, alpha: float):
        super().__init__(model)
        self.every, self.alpha = every, alpha
        self.policy: Any = None  # these three are set by `attach`
        self.policy_logps: Any = None
        self.hardware: Any = None

    def attach(self, *, policy, policy_logps, wrap, hardware) -> None:
        super().attach(policy=policy, policy_logps=policy_logps, wrap=wrap, hardware=hardware)
        self.policy, self.policy_logps, self.hardware = policy, policy_logps, hardware

    def after_step(self, step: int) -> None:
        if step % self.every == 0:
            self.sync()

    @torch.no_grad()
    def sync(self) -> None:
        """θ_ref ← α·θ + (1 − α)·θ_ref (α = 1: a copy).

        Parameter by parameter on the unwrapped modules, so under FSDP each rank updates its own shard of
        the reference from the same shard of the policy (both are sharded alike), and under DDP every rank
        holds the same policy after the step: the reference stays identical on every rank.
        """
        alpha = float(self.alpha)
        for wrapped in (self.policy_logps, self.model_logps):  # FSDP2 keeps the root unsharded after a forward
            for module in wrapped.modules():
                if isinstance(module, FSDPModule):
                    module.reshard()
        ref = dict(self.model.named_parameters())
        for name, p in self.policy.named_parameters():
            if alpha == 1.0:
                ref[name].copy_(p)
            else:
                ref[name].lerp_(p.to(ref[name].dtype), alpha)

    def state_dict(self) -> dict:
        return {"reference": self.hardware.full_state_dict(self.model)}

    def load_state_dict(self, state: dict, path) -> None:
        """The reference as it was at the checkpoint's step, not the initial policy."""
        if "reference" not in state:
            raise ConfigError(f"{path} has no reference weights: it was written without reference_sync.every")
        self.hardware.load_full_state_dict(self.model, state["reference"])


def choose_reference(
    loss,
    config,
    *,
    model: torch.nn.Module | None = None,
    context: Callable | None = None,
    cache: ReferenceProvider | None = None,
) -> ReferenceProvider | None:
    """The provider for `loss` under `config` (a `prefopt.engine.TrainConfig`) from what the run set up: the
    `cache`, else the LoRA `context`, else the frozen `model` (moving when `reference_sync_every` is set); None
    for a reference-free loss. TR-DPO is refused where the reference cannot move, naming the setting."""
    every = config.reference_sync_every or 0
    if every:
        config.validate_reference_sync()
        _check_reference_sync(loss, every, cache is not None, model is None)
    if not loss.reference:
        return None
    if cache is not None:
        return cache
    if context is not None and model is None:
        return AdapterOffReference(context)
    if model is None:
        return None
    return MovingReference(model, every, config.reference_sync_alpha) if every else FrozenReference(model)


def _check_reference_sync(loss, every: int, cached: bool, no_model: bool) -> None:
    setting = f"reference_sync.every={every}"
    if not loss.reference:
        raise ConfigError(
            f"{setting}: loss {loss.key!r} is reference-free, there is no reference to update; "
            f"set reference_sync.every=null"
        )
    if cached:
        raise ConfigError(
            f"{setting} cannot be combined with reference_cache: the cache holds the initial "
            f"reference's log-probs, which TR-DPO changes; set reference_cache=null"
        )
    if no_model:  # LoRA: the reference is the policy with its adapters off
        raise ConfigError(
            f"{setting} is not supported with LoRA (the reference is the base model, adapters off, "
            f"which cannot move); set reference_sync.every=null or train without LoRA"
        )
