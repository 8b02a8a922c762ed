"""The Loss callable a loss yaml instantiates, and `get_loss` to build one by key outside a Hydra run."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable
from typing import cast

import torch
from omegaconf import OmegaConf

from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from prefopt.losses.base import FIELD_GROUPS, LossOutput, MissingReference, PairLogps

# Keys of a loss yaml that configure the wrapper rather than the loss function.
_WRAPPER_KEYS = ("_target_", "key", "fn", "reference", "needs")


def _hyperparameters(target: Callable) -> dict[str, object]:
    """Names and defaults of a loss's hyper-parameters: a function's keyword-only arguments, a class's
    constructor arguments."""
    params = inspect.signature(target).parameters.values()
    wanted: tuple[inspect._ParameterKind, ...]
    if isinstance(target, type):
        wanted = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    else:
        wanted = (inspect.Parameter.KEYWORD_ONLY,)
    return {p.name: p.default for p in params if p.kind in wanted}


def import_object(path: str) -> Callable:
    """The object a dotted path names (`prefopt.losses.sigmoid.dpo`)."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"cannot import {path!r} ({err})") from None


def _expected_kind(default: object, value: object) -> str | None:
    """What `value` must be, judged by the type of the hyper-parameter's default; None when it fits."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(default, bool):
        return None if isinstance(value, bool) else "true or false"
    if isinstance(default, (int, float)):
        return None if is_number else "a number"
    if isinstance(default, str):
        return None if isinstance(value, str) else "a string"
    return None


def _dummy_pair() -> tuple[PairLogps, PairLogps]:
    one = functools.partial(torch.tensor, dtype=torch.float32)
    # with every optional field, so a loss that needs one can be dry-run too (ℓ_{≤4} and the head sums)
    policy = PairLogps(
        one([-4.0]),
        one([-6.0]),
        one([4.0]),
        one([5.0]),
        chosen_prefix=one([-4.0]),
        rejected_prefix=one([-5.0]),
        chosen_head=one([-1.0]),
        rejected_head=one([-2.0]),
    )
    reference = PairLogps(
        one([-5.0]),
        one([-5.0]),
        one([4.0]),
        one([5.0]),
        chosen_prefix=one([-5.0]),
        rejected_prefix=one([-4.5]),
        chosen_head=one([-1.5]),
        rejected_head=one([-1.5]),
    )
    return policy, reference


class Loss:
    """A preference loss bound to its hyper-parameters: `loss(policy, reference) -> LossOutput`.

    `fn` is the dotted path (or the object) of a pure loss function, or of a class for a stateful loss,
    which is instantiated once with the hyper-parameters. `reference` says whether the loss needs
    reference log-probs; when false, no reference model is loaded or run; when null, the instantiated
    loss says (its `reference` attribute: a mixture needs one when any component does). `needs` lists the
    optional `PairLogps` field groups the loss reads (`prefix_logps`, `head_logps`; see
    `prefopt.losses.base.FIELD_GROUPS`): the engine and the reference cache compute those only then; null
    likewise defers to the instantiated loss's `needs`. Hyper-parameters are checked here, by a dry call
    on a one-pair dummy batch, so a bad value fails before any model is loaded.
    """

    def __init__(self, key: str, fn: str | Callable, reference: bool | None = True, needs=(), **hparams):
        self.key = key
        if reference is not None and not isinstance(reference, bool):
            raise ConfigError(f"loss.reference must be true or false (got {reference!r}) in loss '{key}'")
        self.reference = reference
        self.needs = self._check_needs(needs)
        try:
            target = import_object(fn) if isinstance(fn, str) else fn
        except ConfigError as err:
            raise ConfigError(f"loss.fn: {err} for loss '{key}'") from None
        self.fn = target
        valid = _hyperparameters(target)
        unknown = sorted(set(hparams) - set(valid))
        if unknown:
            raise ConfigError(
                f"loss '{key}' has no hyper-parameter {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
            )
        # plain values (a mixture's components arrive as OmegaConf lists): run summaries store them as JSON
        hparams = {
            k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v for k, v in hparams.items()
        }
        for name, value in hparams.items():
            must = _expected_kind(valid[name], value)
            if must:
                raise ConfigError(f"loss.{name}={value!r}: must be {must} (loss '{key}')")
        self.hparams = {**valid, **hparams}
        self.training = True
        try:
            if isinstance(target, type):
                self._impl = target(**self.hparams)
            else:
                self._impl = functools.partial(target, **self.hparams)
            if self.reference is None:
                self.reference = bool(getattr(self._impl, "reference", True))
            if self.needs is None:
                self.needs = self._check_needs(getattr(self._impl, "needs", ()))
            self._dry_run()
        except MissingReference:
            raise ConfigError(
                f"loss.reference is false but loss '{key}' needs reference log-probs; set loss.reference=true"
            ) from None
        except ConfigError as err:
            raise ConfigError(f"{err} in loss '{key}'") from None

    def _check_needs(self, needs) -> tuple[str, ...] | None:
        if needs is None:
            return None
        if isinstance(needs, str) or not all(isinstance(n, str) for n in needs):
            raise ConfigError(f"loss.needs must be a list of field groups (got {needs!r}) in loss '{self.key}'")
        unknown = sorted(set(needs) - set(FIELD_GROUPS))
        if unknown:
            raise ConfigError(
                f"loss.needs: unknown field group {', '.join(unknown)} in loss '{self.key}'; "
                f"known: {', '.join(FIELD_GROUPS)}"
            )
        return tuple(sorted(set(needs)))

    def _dry_run(self) -> None:
        policy, reference = _dummy_pair()
        was_training = self.training
        self.eval()  # a stateful loss must not count the dummy batch in its statistics
        try:
            with torch.no_grad():
                self._impl(policy, reference if self.reference else None)
        finally:
            self.train(was_training)

    def __call__(self, policy: PairLogps, reference: PairLogps | None = None) -> LossOutput:
        if self.reference and reference is None:
            raise MissingReference(
                f"loss '{self.key}' needs reference log-probs (loss.reference is true) but got reference=None"
            )
        return self._impl(policy, reference)

    def train(self, mode: bool = True) -> Loss:
        """Training mode: a stateful loss updates its running statistics on every call."""
        self.training = mode
        if hasattr(self._impl, "train"):
            self._impl.train(mode)
        return self

    def eval(self) -> Loss:
        """Eval mode: a stateful loss uses its current statistics and leaves them unchanged."""
        return self.train(False)

    def state_dict(self) -> dict:
        return self._impl.state_dict() if hasattr(self._impl, "state_dict") else {}

    def load_state_dict(self, state: dict) -> None:
        if hasattr(self._impl, "load_state_dict"):
            self._impl.load_state_dict(state)
        elif state:
            raise ValueError(f"loss '{self.key}' is stateless but got state with keys {sorted(state)}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        needs = f", needs={list(self.needs)}" if self.needs else ""
        return f"Loss({self.key!r}, reference={self.reference}{needs}{', ' + args if args else ''})"


def available_losses() -> list[str]:
    """Keys of all losses: the stems of conf/loss/*.yaml (adding a loss touches no list in code)."""
    return sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml"))


def hyperparameters(key: str) -> list[str]:
    """The hyper-parameter names of conf/loss/<key>.yaml."""
    return [str(k) for k in OmegaConf.load(conf_dir() / "loss" / f"{key}.yaml") if k not in _WRAPPER_KEYS]


def get_loss(key: str, **hparams) -> Loss:
    """Build the loss of conf/loss/<key>.yaml; `hparams` override that yaml's defaults."""
    keys = available_losses()
    if key not in keys:
        raise ConfigError(f"unknown loss {key!r}; available: {', '.join(keys)}")
    node = OmegaConf.load(conf_dir() / "loss" / f"{key}.yaml")
    valid = cast(list[str], [k for k in node if k not in _WRAPPER_KEYS])
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ConfigError(
            f"loss '{key}' has no hyper-parameter {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    # Under a root, as in a Hydra run, so `${top_or:beta,...}` finds no top-level beta and takes the default.
    root = OmegaConf.create({"loss": node})
    for name, value in hparams.items():
        root.loss[name] = value
    spec = cast(dict, OmegaConf.to_container(root.loss, resolve=True))
    return import_object(spec.pop("_target_"))(**spec)
