"""The composition root: a composed Hydra config in, a `RunPlan` of plain objects out.

Every entry point (`python -m prefopt.run`, `.sft`, `.pairs`, `.evaluate`, `.reference`) calls `build` and
hands the plan to a stage; nothing below this module sees a `DictConfig`. Each config node is instantiated
once, with `_convert_="all"` (nested lists and dicts arrive as plain Python), and every problem found on the
way (a bad value, a missing file, a typo'd `+key`) is collected in the same pass, so one run of
`validate=true` (or any run's start) names them all before a model or data row is loaded.
"""

from __future__ import annotations

import copy
import difflib
import functools
import logging
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate as hydra_instantiate
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig

from prefopt import ranks
from prefopt.ches_scores import ches_filter
from prefopt.config import conf_dir
from prefopt.data.batching import TRUNCATION
from prefopt.errors import ConfigError, PrefoptError
from prefopt.mathloop.loop import MathLoop
from prefopt.refcache import cache_dir as reference_cache_dir
from prefopt.training import HydraInfo, RunPlan, Schedule

log = logging.getLogger("prefopt")

# Top-level knobs: (what a value must be, the check). Checked before anything is instantiated.
_NUMBER = (int, float)
TOP_LEVEL = {
    "beta": ("a number > 0, or null", lambda v: v is None or (_is_number(v) and v > 0)),
    "lr": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "seed": ("an integer", lambda v: _is_int(v)),
    "steps": ("an integer >= 1 (or null with epochs)", lambda v: v is None or (_is_int(v) and v >= 1)),
    "epochs": ("a number > 0, or null", lambda v: v is None or (_is_number(v) and v > 0)),
    "batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "micro_batch_size": ("an integer >= 1", lambda v: _is_int(v) and v >= 1),
    "eval_every": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "save_every": ("an integer >= 0", lambda v: _is_int(v) and v >= 0),
    "validate": ("true or false", lambda v: isinstance(v, bool)),
}


def _is_number(v: Any) -> bool:
    return isinstance(v, _NUMBER) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def hydra_info() -> HydraInfo:
    """This job's `HydraInfo` (empty when called outside a Hydra app, e.g. from a test)."""
    if not HydraConfig.initialized():
        return HydraInfo()
    hc = HydraConfig.get()
    multirun = hc.mode is not None and hc.mode.name == "MULTIRUN"
    overrides = list(hc.overrides.task)
    return HydraInfo(
        run_dir=Path(hc.runtime.output_dir),
        choices=dict(hc.runtime.choices),
        group=sweep_group(Path(hc.sweep.dir).name, overrides) if multirun else Path(hc.runtime.output_dir).name,
        overrides=overrides,
    )


def sweep_group(sweep: str, overrides: list[str]) -> str:
    """The W&B group of a sweep's run: the sweep's name, and in a sweep over `seed` also the run's other
    overrides, so the seeds of one setting are one group (`07-00-00 loss=dpo`), as the report groups them."""
    pairs = [str(o).lstrip("+") for o in overrides]
    if not any(p.split("=", 1)[0] == "seed" for p in pairs):
        return sweep
    setting = " ".join(p for p in pairs if p.split("=", 1)[0] != "seed")
    return f"{sweep} {setting}".strip()[:128]  # W&B's limit on a group name


def own_error(exc: BaseException) -> PrefoptError | None:
    """Our own error behind `exc`, even when Hydra or OmegaConf wrapped it (instantiation, an interpolation)."""
    cause: BaseException | None = exc
    while cause is not None and not isinstance(cause, PrefoptError):
        cause = cause.__cause__ or cause.__context__
    return cause


def _first_line(exc: BaseException) -> str:
    """`Type: first line` of the innermost error another library raised."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    text = str(exc).strip()
    unknown = re.match(r"(\w+)\.__init__\(\) got an unexpected keyword argument '(\w+)'", text)
    if isinstance(exc, TypeError) and unknown:  # a key set for another choice of the same config group
        return f"{unknown[1]} has no setting {unknown[2]!r} (remove it, or choose the group member that has it)"
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def instantiate(node, *args, **kwargs):
    """`hydra.utils.instantiate` with plain containers; our own errors come out as themselves, not wrapped."""
    try:
        return hydra_instantiate(node, *args, _convert_="all", **kwargs)
    except Exception as exc:
        own = own_error(exc)
        if own is not None:
            raise own from None
        if isinstance(exc, InstantiationException):
            raise ConfigError(_first_line(exc)) from None
        raise


def _attempt(found: list[str], what: str, fn: Callable[[], Any]) -> Any:
    """fn(), or None with the problem it raised appended to `found` (named by `what`)."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - a validation report lists whatever went wrong, one line each
        own = own_error(exc)
        found.append(f"{what}: {own}" if own is not None else f"{what}: {_first_line(exc)}")
    return None


def max_positions(spec) -> int | None:
    """The model's context length from its config alone (no weights)."""
    if spec.arch is not None:
        return spec.config.get("max_position_embeddings")
    if spec.name_or_path and Path(spec.name_or_path).is_dir():
        return getattr(AutoConfig.from_pretrained(spec.name_or_path), "max_position_embeddings", None)
    return None


def known_keys() -> list[str]:
    """Top-level keys some part of prefopt reads: the base configs' keys and the config groups."""
    keys = {"hydra"}
    for name in ("config.yaml", "mathloop.yaml"):
        keys |= set(OmegaConf.load(conf_dir() / name).keys()) - {"defaults"}
    keys |= {p.name for p in conf_dir().iterdir() if p.is_dir()}
    return sorted(keys)


def unknown_additions(overrides: list[str]) -> list[str]:
    """`+key=value` overrides that add a top-level key nothing reads (`+los=ipo` for `loss=ipo`)."""
    known, found = known_keys(), []
    for item in overrides:
        if not item.startswith("+") or item.startswith("++"):
            continue
        key = item[1:].split("=", 1)[0]
        top = key.split(".", 1)[0].split("@", 1)[0]
        if top not in known:
            close = difflib.get_close_matches(top, known, n=3, cutoff=0.5)
            hint = f"; did you mean {' or '.join(close)}?" if close else f"; valid keys: {', '.join(known)}"
            found.append(f"{item}: no part of prefopt reads {top!r}{hint}")
    return found


# The config nodes each top-level knob flows into: a bad knob's garbled echo there is not reported twice.
FEEDS = {
    "beta": ("loss",),
    "lr": ("optimizer",),
    "steps": ("train",),
    "epochs": ("train",),
    "batch_size": ("train",),
    "micro_batch_size": ("train",),
    "eval_every": ("train",),
    "save_every": ("train",),
}


def check_top_level(cfg: DictConfig) -> list[str]:
    """Wrong types and out-of-range values of the top-level knobs, each naming key, value and what it must be."""
    return [
        f"{key}={cfg[key]!r}: must be {must}"
        for key, (must, ok) in TOP_LEVEL.items()
        if key in cfg and not ok(cfg[key])
    ]


def fed_by_bad_knobs(cfg: DictConfig) -> set[str]:
    """The nodes a wrong top-level knob flows into (checked once that knob is fixed)."""
    return {
        node for key, (_, ok) in TOP_LEVEL.items() if key in cfg and not ok(cfg[key]) for node in FEEDS.get(key, ())
    }


STAGES = ("mathloop", "warmup", "reward", "pairs", "evaluation", "generation", "verify")


def _instantiate_nodes(cfg: DictConfig, found: list[str]) -> dict:
    """Each config node instantiated once (None where it failed, the failure appended to `found`; None, and not
    reported again, where a wrong top-level knob flows in)."""
    nodes = {
        "hardware": cfg.hardware,
        "loss": cfg.loss,
        "train": cfg.train,
        "model": cfg.model,
        "data": cfg.data.source,
        "optimizer": cfg.optimizer.factory,
        "logger": cfg.logger.get("wandb"),
        **{key: cfg[key] for key in STAGES},
    }
    skip = fed_by_bad_knobs(cfg)
    objects = {
        key: None if node is None or key in skip else _attempt(found, key, functools.partial(instantiate, node))
        for key, node in nodes.items()
    }
    if objects["pairs"] is None:  # e.g. a recipe's required pairs.path not set (reported): check the other settings
        objects["pairs_without_path"] = _attempt(
            found, "pairs", lambda: instantiate(_relaxed(cfg, "pairs.path", None).pairs)
        )
    return objects


def _check_values(cfg: DictConfig, objects: dict, found: list[str]) -> None:
    """Values that are wrong together: batch sizes for the world size, lengths, TR-DPO's partners."""
    hardware, train, model, loss = (objects[k] for k in ("hardware", "train", "model", "loss"))
    if OmegaConf.select(cfg, "recipe.none") is not None:  # a real model's preset with no recipe (conf/recipe/)
        name = hydra_info().choices.get("model") or cfg.model.get("name_or_path")
        found.append(f"model={name} has no recipe: {cfg.recipe.none}")
    if train is not None:
        _attempt(found, "train", lambda: train.validate(hardware.world_size if hardware else 1))
    if model is not None:
        length = _attempt(found, "model", lambda: max_positions(model))
        if length and cfg.data.max_length > length:
            found.append(
                f"data.max_length ({cfg.data.max_length}) exceeds the model's context "
                f"({length} positions): lower data.max_length"
            )
    every = cfg.get("reference_sync", {}).get("every")
    if every and cfg.get("reference_cache"):
        found.append(
            f"reference_sync.every={every} cannot be combined with reference_cache: the cache holds the "
            f"initial reference's log-probs, which TR-DPO changes; set reference_cache=null"
        )
    if every and model is not None and model.uses_lora:
        found.append(
            f"reference_sync.every={every} is not supported with LoRA (the reference is the base model, "
            f"adapters off, which cannot move); set reference_sync.every=null or train without LoRA"
        )
    if cfg.data.get("truncation", "keep_end") not in TRUNCATION:
        found.append(f"data.truncation={cfg.data.truncation!r}: must be one of {', '.join(TRUNCATION)}")
    if cfg.data.max_prompt_length >= cfg.data.max_length:
        found.append(
            f"data.max_prompt_length ({cfg.data.max_prompt_length}) must be < data.max_length ({cfg.data.max_length})"
        )
    try:  # data.drop_top_ches / data.ches_score: the CHES filter (None when off)
        objects["ches_filter"] = ches_filter(cfg.data)
    except ConfigError as exc:
        found.append(str(exc))
    if loss is not None:
        objects["reference_cache"] = _attempt(
            found, "reference_cache", lambda: reference_cache_dir(cfg.get("reference_cache"), loss)
        )


def _relaxed(cfg: DictConfig, key: str, value: Any):
    """A copy of `cfg` with `key` set to `value`: to check the rest of a node one problem already stopped."""
    copy_ = copy.deepcopy(cfg)
    OmegaConf.update(copy_, key, value)
    return copy_


def _check_model_available(cfg: DictConfig, objects: dict, found: list[str]) -> None:
    """The weights are on this machine (a 4-bit base refused for want of CUDA is still looked for)."""
    model = objects["model"]
    if model is None and cfg.model.get("lora", {}).get("load_in_4bit"):
        model = _attempt([], "model", lambda: instantiate(_relaxed(cfg, "model.lora.load_in_4bit", False).model))
    if model is not None:
        _attempt(found, "model", model.check_available)


def _check_stage_inputs(cfg: DictConfig, objects: dict, found: list[str]) -> None:
    """The files the verified-math loop will read: the pair-sampling problems and the benchmarks."""
    switches, pairs, evaluation = objects["mathloop"], objects["pairs"], objects["evaluation"]
    if switches is not None and switches.pairs and pairs is not None and pairs.problems() is not None:
        missing = pairs.problems().missing_file()
        found += [missing] if missing else []
    if switches is not None and switches.evaluate and evaluation is not None:
        found += _attempt(found, "evaluation", evaluation.problems) or []


def _check_inputs(cfg: DictConfig, source, found: list[str], read_data: bool) -> None:
    """Files and directories the run will read: missing ones, and (`read_data`) bad data rows."""
    if cfg.get("resume") not in (None, "auto") and not Path(str(cfg.resume)).is_dir():
        found.append(f"resume={cfg.resume}: not a directory of checkpoints")
    if source is not None:
        for key in ("path", "eval_path"):
            value = getattr(source, key, None)
            if (
                value
                and Path(value).suffix in (".jsonl", ".json", ".parquet")
                and not Path(value).expanduser().is_file()
            ):
                found.append(f"data.source.{key}={value}: no such file")
        if read_data:
            _attempt(found, "data", source.load)


def without_required_inputs(cfg: DictConfig) -> DictConfig:
    """`cfg` with a recipe's `${required:...}` input file (pairs.path) set to null, to compose a plan to look at
    (`cfg` itself when pairs.path resolves: `build` and `collect` both call this, and the second call copies
    nothing)."""
    unresolved: list[str] = []
    if "pairs" in cfg:
        _attempt(unresolved, "pairs", lambda: cfg.pairs.path)
    return _relaxed(cfg, "pairs.path", None) if unresolved else cfg


def collect(
    cfg: DictConfig, read_data: bool = False, check_inputs: bool = True, overrides: list[str] | None = None
) -> tuple[dict, list[str]]:
    """(the instantiated nodes by key, every problem found): one pass over the whole config.

    `check_inputs=False` skips what is outside the config (model availability, files, data rows): for
    composing a plan to look at, e.g. a 7B recipe on a machine that does not hold the weights.
    """
    info = hydra_info()
    found = unknown_additions(info.overrides if overrides is None else overrides) + check_top_level(cfg)
    cfg = cfg if check_inputs else without_required_inputs(cfg)
    objects = _instantiate_nodes(cfg, found)
    _check_values(cfg, objects, found)
    if check_inputs:
        _check_model_available(cfg, objects, found)
        _check_inputs(cfg, objects["data"], found, read_data)
        _check_stage_inputs(cfg, objects, found)
    return objects, list(dict.fromkeys(found))


def recipe_note() -> str:
    """' (recipe X: conf/recipe/X.yaml)' when the model choice brought a recipe in, else ''."""
    recipe = hydra_info().choices.get("recipe")
    return (
        f" (recipe {recipe}: conf/recipe/{recipe}.yaml)"
        if recipe and (conf_dir() / "recipe" / f"{recipe}.yaml").is_file()
        else ""
    )


def listing(found: list[str]) -> str:
    """'N problems (recipe ...):' and one indented line per problem."""
    head = "{} problem{}{}:\n".format(len(found), "s" * (len(found) != 1), recipe_note())
    return head + "\n".join(f"  - {p}" for p in found)


def report(found: list[str]) -> str:
    return f"prefopt: {listing(found)}" if found else f"prefopt: config OK{recipe_note()}"


def build(cfg: DictConfig, read_data: bool = False, job_type: str | None = None, check_inputs: bool = True) -> RunPlan:
    """The run's `RunPlan`; one ConfigError naming every problem when the config has any."""
    cfg = cfg if check_inputs else without_required_inputs(cfg)
    objects, found = collect(cfg, read_data, check_inputs)
    if found:
        raise ConfigError(f"{found[0]}{recipe_note()}" if len(found) == 1 else listing(found))
    if check_inputs:  # a GGUF file becomes an ordinary model directory (converted once) that every stage reads
        objects["model"] = objects["model"].converted()
    info, tokenize = hydra_info(), tokenize_settings(cfg)
    loop = MathLoop(
        switches=objects["mathloop"],
        warmup=objects["warmup"],
        pairs=objects["pairs"],
        evaluation=objects["evaluation"],
        generation=objects["generation"],
        verify=objects["verify"],
        tokenize=tokenize,
        optimizer_factory=objects["optimizer"],
        max_grad_norm=cfg.optimizer.max_grad_norm,
        chunk_elements=cfg.train.chunk_elements,
        policy=cfg.policy,
        reward=objects["reward"],
    )
    wandb = objects["logger"]
    if wandb is not None and job_type is not None:
        wandb.job_type = job_type
    return RunPlan(
        hardware=objects["hardware"],
        loss=objects["loss"],
        train=objects["train"],
        model=objects["model"],
        data=objects["data"],
        wandb=wandb,
        loop=loop,
        optimizer_factory=objects["optimizer"],
        schedule=Schedule(cfg.optimizer.scheduler, cfg.optimizer.warmup_steps, cfg.optimizer.get("warmup_ratio")),
        max_grad_norm=cfg.optimizer.max_grad_norm,
        tokenize=tokenize,
        seed=cfg.seed,
        resume=cfg.resume,
        reference_cache=objects.get("reference_cache"),
        ches_filter=objects.get("ches_filter"),
        resolved=cast(dict, OmegaConf.to_container(cfg, resolve=True)),
        info=info,
    )


def tokenize_settings(cfg: DictConfig) -> dict:
    """tokenize_pairs' settings; `truncation` and `user_suffix` only when set (so the tiny loop's cache keys
    stay what they were)."""
    settings = {k: cfg.data[k] for k in ("max_length", "max_prompt_length", "chat_template", "system_prompt")}
    if cfg.data.get("truncation", "keep_end") != "keep_end":
        settings["truncation"] = cfg.data.truncation
    if cfg.data.get("user_suffix"):
        settings["user_suffix"] = cfg.data.user_suffix
    return settings


def fail(exc: PrefoptError) -> None:
    """End an entry point on a PrefoptError: printed once on stderr, kept in the run's log file, exit status 2."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, "%s", (exc,), None)
    for handler in logging.getLogger().handlers:  # Hydra's run.log; its console handler would print it twice
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
    print(f"prefopt: error: {exc}", file=sys.stderr)
    sys.exit(2)


def entry(job: Callable[[DictConfig], Any]) -> Callable[[DictConfig], Any]:
    """Wrap an entry point's Hydra main: a PrefoptError becomes one line and exit status 2."""

    @functools.wraps(job)
    def wrapped(cfg: DictConfig):
        try:
            return job(cfg)
        except PrefoptError as exc:
            fail(exc)

    return wrapped


def quiet_other_ranks() -> None:
    """Under torchrun/SLURM only rank 0 writes: the other ranks keep Hydra's files and logs to themselves."""
    if ranks.rank() > 0 and "-m" not in sys.argv and "--multirun" not in sys.argv:
        sys.argv += ["hydra.output_subdir=null", "hydra/job_logging=disabled", "hydra/hydra_logging=disabled"]
