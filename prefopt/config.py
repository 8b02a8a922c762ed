"""Where the configs live, and the OmegaConf resolvers they use."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from prefopt.errors import ConfigError
from prefopt.ranks import run_stamp


def conf_dir() -> Path:
    """The `conf/` tree: inside the package when installed from a wheel, beside it in a checkout."""
    packaged = Path(__file__).parent / "conf"
    return packaged if packaged.is_dir() else Path(__file__).resolve().parent.parent / "conf"


def _top_or(key: str, default, *, _root_):
    # `${top_or:beta,2.0}`: the top-level value when the run sets it, else this yaml's own default.
    # oc.select cannot do this: it returns a null top-level value instead of the default.
    value = OmegaConf.select(_root_, key, default=None)
    return default if value is None else value


def _required(key: str, what: str, when: bool = True):
    # `${required:pairs.path,"the training problems",${mathloop.pairs}}`: a value a recipe cannot know; resolving
    # it says what to set (null when `when` is false: the stage that needs it is off). A yaml's `???` cannot do
    # this: merged over a default, OmegaConf keeps the default.
    if not when:
        return None
    raise ConfigError(f"{key} is required: set {key}=... ({what})")


def _not(value) -> bool:
    # `${not:${mathloop.pairs}}`: a switch's opposite (the pair file is required when on-policy pairs are off)
    return not value


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("top_or"):
        OmegaConf.register_new_resolver("top_or", _top_or)
    if not OmegaConf.has_resolver("required"):
        OmegaConf.register_new_resolver("required", _required)
    if not OmegaConf.has_resolver("not"):
        OmegaConf.register_new_resolver("not", _not)
    if not OmegaConf.has_resolver("run_stamp"):
        OmegaConf.register_new_resolver("run_stamp", run_stamp, use_cache=True)
