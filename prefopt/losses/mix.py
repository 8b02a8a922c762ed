"""Weighted sums of losses (TRL's `loss_type` lists, MPO), and `sft`, the chosen completion's NLL."""

from __future__ import annotations

import collections
from collections.abc import Mapping

from omegaconf import DictConfig, ListConfig, OmegaConf
from torch import Tensor

from prefopt.errors import ConfigError
from prefopt.losses.base import LossOutput, PairLogps, check_number, scalar
from prefopt.losses.registry import available_losses, get_loss, hyperparameters


def sft(policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
    """The chosen completion's per-token NLL, −ℓ_w / n_w; reference-free, the `sft` term of MPO.

    Rewards: ℓ̄_w and ℓ̄_l (the reference-free convention with β = 1; there is no β). Per pair: TRL's `sft`
    term averages over all chosen tokens of the batch instead (equal when the lengths are equal).
    """
    nll = -policy.chosen_mean
    return LossOutput(
        loss=nll,
        chosen_reward=policy.chosen_mean.detach(),
        rejected_reward=policy.rejected_mean.detach(),
        metrics={"sft/nll": scalar(nll)},
    )


class Mix:
    """Σ_k weight_k · L_k over `components`, each {key, weight, …hyper-parameters of that key}.

    Wang et al. 2024, arXiv 2411.10442 (MPO = 0.8·dpo + 0.2·bco_pair + 1.0·sft, `conf/loss/mpo.yaml`).
    Each component is built by `get_loss(key, **hyper-parameters)`, so it takes that key's yaml defaults.
    A component with a β takes its own entry's, else the mixture's `beta` (the run's top-level `beta`,
    `${top_or:beta,null}` in the yamls) when set, else its yaml's default. The mixture needs the reference when any
    component does, and the union of
    their `needs`. Metrics: each component's mean loss as `<key>/loss` and its own metrics under `<key>/`
    (a key used twice gets its position appended: `dpo`, `dpo_1`). Rewards: those of the first component
    with a reference (β·r̂), else of the first component. Stateful components keep their state (checkpointed
    under their label) and follow train/eval.
    """

    def __init__(self, *, components=(), beta: float | None = None):
        if isinstance(components, (DictConfig, ListConfig)):
            components = OmegaConf.to_container(components, resolve=True)
        if isinstance(components, Mapping) or not components:
            raise ConfigError("loss.components must be a non-empty list of {key, weight, ...} entries")
        self.labels: list[str] = []
        self.weights: list[float] = []
        self.losses = []
        seen: collections.Counter = collections.Counter()
        for i, entry in enumerate(components):
            if not isinstance(entry, Mapping) or "key" not in entry or "weight" not in entry:
                raise ConfigError(f"loss.components.{i} must have a key and a weight (got {entry!r})")
            entry = dict(entry)
            key, weight = entry.pop("key"), entry.pop("weight")
            check_number(f"components.{i}.weight", weight)
            if key == "mix":
                raise ConfigError(f"loss.components.{i}: a mixture cannot contain a mixture")
            if (
                beta is not None
                and "beta" not in entry
                and key in available_losses()
                and "beta" in hyperparameters(key)
            ):
                entry["beta"] = beta
            try:
                self.losses.append(get_loss(key, **entry))
            except ConfigError as err:
                raise ConfigError(f"loss.components.{i}: {err}") from None
            self.labels.append(key if not seen[key] else f"{key}_{seen[key]}")
            seen[key] += 1
            self.weights.append(float(weight))
        self.reference = any(loss.reference for loss in self.losses)
        self.needs = tuple(sorted({n for loss in self.losses for n in loss.needs or ()}))
        self.reward_index = next((i for i, loss in enumerate(self.losses) if loss.reference), 0)

    def __call__(self, policy: PairLogps, reference: PairLogps | None) -> LossOutput:
        total: Tensor | None = None
        metrics: dict[str, Tensor] = {}
        rewards: LossOutput | None = None
        for label, weight, loss in zip(self.labels, self.weights, self.losses):
            out = loss(policy, reference if loss.reference else None)
            total = weight * out.loss if total is None else total + weight * out.loss
            metrics[f"{label}/loss"] = scalar(out.loss)
            for name, value in out.metrics.items():
                metrics[f"{label}/{name.split('/', 1)[1] if name.startswith(loss.key + '/') else name}"] = value
            if loss is self.losses[self.reward_index]:
                rewards = out
        assert total is not None and rewards is not None  # a mixture has components (checked in __init__)
        return LossOutput(
            loss=total, chosen_reward=rewards.chosen_reward, rejected_reward=rewards.rejected_reward, metrics=metrics
        )

    def train(self, mode: bool = True) -> Mix:
        for loss in self.losses:
            loss.train(mode)
        return self

    def state_dict(self) -> dict:
        return {label: state for label, loss in zip(self.labels, self.losses) if (state := loss.state_dict())}

    def load_state_dict(self, state: dict) -> None:
        unknown = set(state) - set(self.labels)
        if unknown:
            raise ValueError(f"mix state has unknown components {sorted(unknown)} (have {self.labels})")
        for label, loss in zip(self.labels, self.losses):
            loss.load_state_dict(state.get(label, {}))
