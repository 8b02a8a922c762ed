"""The Loss callable a loss yaml instantiates, and `get_loss` to build one by key outside a Hydra run."""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable

import torch
from omegaconf import OmegaConf

from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from prefopt.losses.base import LossOutput, MissingReference, PairLogps

# Keys of a loss yaml that configure the wrapper rather than the loss function.
_WRAPPER_KEYS = ("_target_", "key", "fn", "reference")


def _hyperparameters(target: Callable) -> dict[str, object]:
    """Names and defaults of a loss's hyper-parameters: a function's keyword-only arguments, a class's
    constructor arguments."""
    params = inspect.signature(target).parameters.values()
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
    policy = PairLogps(one([-4.0]), one([-6.0]), one([4.0]), one([5.0]))
    reference = PairLogps(one([-5.0]), one([-5.0]), one([4.0]), one([5.0]))
    return policy, reference


class Loss:
    """A preference loss bound to its hyper-parameters: `loss(policy, reference) -> LossOutput`.

    `fn` is the dotted path (or the object) of a pure loss function, or of a class for a stateful loss,
    which is instantiated once with the hyper-parameters. `reference` says whether the loss needs
    reference log-probs; when false, no reference model is loaded or run. Hyper-parameters are checked
    here, by a dry call on a one-pair dummy batch, so a bad value fails before any model is loaded.
    """

    def __init__(self, key: str, fn: str | Callable, reference: bool = True, **hparams):
        self.key = key
        if not isinstance(reference, bool):
            raise ConfigError(f"loss.reference must be true or false (got {reference!r}) in loss '{key}'")
        self.reference = reference
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
            self._dry_run()
        except MissingReference:
            raise ConfigError(
                f"loss.reference is false but loss '{key}' needs reference log-probs; set loss.reference=true"
            ) from None
        except ConfigError as err:
            raise ConfigError(f"{err} in loss '{key}'") from None

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
        return f"Loss({self.key!r}, reference={self.reference}, {args})"


def available_losses() -> list[str]:
    """Keys of all losses: the stems of conf/loss/*.yaml (adding a loss touches no list in code)."""
    return sorted(p.stem for p in (conf_dir() / "loss").glob("*.yaml"))


def get_loss(key: str, **hparams) -> Loss:
    """Build the loss of conf/loss/<key>.yaml; `hparams` override that yaml's defaults."""
    keys = available_losses()
    if key not in keys:
        raise ConfigError(f"unknown loss {key!r}; available: {', '.join(keys)}")
    node = OmegaConf.load(conf_dir() / "loss" / f"{key}.yaml")
    valid = [k for k in node if k not in _WRAPPER_KEYS]
    unknown = sorted(set(hparams) - set(valid))
    if unknown:
        raise ConfigError(
            f"loss '{key}' has no hyper-parameter {', '.join(unknown)}; valid: {', '.join(valid) or 'none'}"
        )
    # Under a root, as in a Hydra run, so `${top_or:beta,...}` finds no top-level beta and takes the default.
    root = OmegaConf.create({"loss": node})
    for name, value in hparams.items():
        root.loss[name] = value
    spec = OmegaConf.to_container(root.loss, resolve=True)
    return import_object(spec.pop("_target_"))(**spec)
