"""Check a composed config before any work: every problem at once, no model loaded.

`python -m prefopt.run ... validate=true` prints the report and exits (0 when clean, 2 otherwise); every
run also calls `problems()` first, so a typo or a missing file stops it in seconds, not after loading a model.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from prefopt.config import conf_dir
from prefopt.errors import PrefoptError


def _check(problems: list[str], what: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a validation report lists whatever went wrong, one line each
        cause = exc  # our own error, even when Hydra or OmegaConf wrapped it (instantiation, an interpolation)
        while cause is not None and not isinstance(cause, PrefoptError):
            cause = cause.__cause__ or cause.__context__
        if cause is not None:
            problems.append(f"{what}: {cause}")
            return None
        inner = exc  # another library's error: the innermost one says what went wrong
        while inner.__cause__ is not None:
            inner = inner.__cause__
        text = str(inner).strip()
        problems.append(f"{what}: {type(inner).__name__}: {text.splitlines()[0] if text else ''}")
    return None


def max_positions(spec) -> int | None:
    """The model's context length from its config alone (no weights)."""
    if spec.arch is not None:
        return spec.config.get("max_position_embeddings")
    if spec.name_or_path and Path(spec.name_or_path).is_dir():
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(spec.name_or_path), "max_position_embeddings", None)
    return None


def problems(cfg: DictConfig, read_data: bool = False) -> list[str]:
    """Everything wrong with `cfg`, each naming its key; `read_data` also reads and validates the data rows."""
    from hydra.utils import instantiate

    found: list[str] = []
    if cfg.get("beta") is not None and not cfg.beta > 0:
        found.append(f"beta must be > 0 (got {cfg.beta})")
    hardware = _check(found, "hardware", lambda: instantiate(cfg.hardware))
    loss = _check(found, "loss", lambda: instantiate(cfg.loss))
    train = _check(found, "train", lambda: instantiate(cfg.train))
    if train is not None:
        _check(found, "train", lambda: train.validate(hardware.world_size if hardware else 1))
    model = _check(found, "model", lambda: instantiate(cfg.model))
    if model is None and cfg.model.get("lora", {}).get("load_in_4bit"):  # refused for want of CUDA: still look
        unquantized = copy.deepcopy(cfg)  # for the checkpoint, so a missing one is reported too
        OmegaConf.update(unquantized, "model.lora.load_in_4bit", False)
        model = _check([], "model", lambda: instantiate(unquantized.model))
    if model is not None:
        _check(found, "model", model.check_available)
        length = _check(found, "model", lambda: max_positions(model))
        if length and cfg.data.max_length > length:
            found.append(f"data.max_length ({cfg.data.max_length}) exceeds the model's context "
                         f"({length} positions): lower data.max_length")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        found.append(f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be < data.max_length "
                     f"({cfg.data.max_length})")
    if loss is not None and not loss.reference and cfg.get("reference_cache"):
        found.append(f"reference_cache={cfg.reference_cache}: loss {loss.key!r} is reference-free and uses no "
                     f"reference log-probs; drop reference_cache")
    if cfg.get("resume") not in (None, "auto") and not Path(str(cfg.resume)).is_dir():
        found.append(f"resume={cfg.resume}: not a directory of checkpoints")
    source = _check(found, "data", lambda: instantiate(cfg.data.source))
    if source is not None:
        for key in ("path", "eval_path"):
            value = getattr(source, key, None)
            if value and (Path(value).suffix in (".jsonl", ".json", ".parquet")) and not Path(value).expanduser().is_file():
                found.append(f"data.source.{key}={value}: no such file")
        if read_data:
            _check(found, "data", source.load)
    if cfg.logger.get("wandb"):
        _check(found, "logger", lambda: instantiate(cfg.logger.wandb))
    found += _stage_problems(cfg, instantiate)
    return found


def _stage_problems(cfg: DictConfig, instantiate) -> list[str]:
    """The verified-math loop's settings (pairs, evaluation, generation) and the files they name, read from no file."""
    found: list[str] = []
    if "pairs" in cfg and _check(found, "pairs", lambda: [cfg.pairs.path]) is None:  # a required path not set:
        cfg = copy.deepcopy(cfg)  # reported; the other pairs settings are still checked
        OmegaConf.update(cfg, "pairs.path", None)
    stages = {name: _check(found, name, lambda n=name: instantiate(cfg[n]))
              for name in ("pipeline", "pairs", "evaluation", "generation") if name in cfg}
    pipeline, pairs, evaluation = stages.get("pipeline"), stages.get("pairs"), stages.get("evaluation")
    if pipeline is not None and pipeline.pairs and pairs is not None and pairs.problems() is not None:
        missing = pairs.problems().missing_file()
        found += [missing] if missing else []
    if pipeline is not None and pipeline.evaluate and evaluation is not None:
        found += _check(found, "evaluation", evaluation.problems) or []
    return found


def _recipe() -> str | None:
    """The recipe the model choice brought in (conf/recipe/<model>.yaml), when called inside a Hydra app."""
    recipe = HydraConfig.get().runtime.choices.get("recipe") if HydraConfig.initialized() else None
    return recipe if recipe and (conf_dir() / "recipe" / f"{recipe}.yaml").is_file() else None  # optional: may be none


def report(found: list[str]) -> str:
    recipe = _recipe()
    where = f" (recipe {recipe}: conf/recipe/{recipe}.yaml)" if recipe else ""
    if not found:
        return f"prefopt: config OK{where}"
    return "prefopt: {} problem{}{}:\n".format(len(found), "s" * (len(found) != 1), where) + "\n".join(
        f"  - {p}" for p in found)
