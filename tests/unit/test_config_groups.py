"""Every yaml in conf/ composes with the real config and instantiates; presets show what they promise."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from prefopt.compose import build
from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from tests.helpers.config import compose_cfg

CONF = conf_dir()


def plan(cfg):
    """The composed plan, without checking that the (7-8B) weights or data files are on this machine."""
    return build(cfg, check_inputs=False)


MAIN_GROUPS = {"model", "loss", "data", "optimizer", "hardware", "logger", "experiment"}  # in config.yaml's defaults
# data=jsonl reads a file: the composition root refuses a missing one, so point it at a real one
PAIRS = Path(__file__).resolve().parents[1] / "data" / "pairs.jsonl"
REQUIRED = {
    "data/jsonl": [f"data.source.path={PAIRS}"],
    "data/hub": ["data.source.path=org/name"],
    "pairs/labeler/reward_model": ["pairs.labeler.name_or_path=org/reward-model"],
    "evaluation/judge/reward_model": ["evaluation.judge.name_or_path=org/reward-model"],
    "evaluation/judge/openai": ["evaluation.judge.base_url=http://localhost:8000/v1", "evaluation.judge.model=judge"],
}
# The paper recipes run on a CUDA GPU with a 4-bit base; planned here on CPU (tests/integration/test_recipes.py tests
# them as they are).
ON_CPU = ["hardware=cpu", "model.lora.load_in_4bit=false"]
for _name in ("qwen_math", "llama3_8b", "qwen_math_1_5b", "qwen_math_instruct"):
    REQUIRED[f"model/{_name}"] = REQUIRED[f"recipe/{_name}"] = ON_CPU
# llama3_8b_base has no recipe (refused: tests/integration/test_recipes.py); asked for by name, the shared protocol
REQUIRED["model/llama3_8b_base"] = REQUIRED["recipe/llama3_8b_base"] = [*ON_CPU, "recipe=bpo_paper"]
REQUIRED["recipe/bpo_paper"] = [*ON_CPU, "model=qwen_math"]  # the protocol every recipe includes


def options():
    for path in sorted(CONF.rglob("*.yaml")):
        rel = path.relative_to(CONF).with_suffix("")
        if rel.parts[0] in ("hydra",) or rel.parent == Path("."):
            # hydra/launcher presets: tests/cluster/test_launchers.py; config.yaml and the root files it includes: below
            continue
        yield str(rel.parent), rel.name


@pytest.mark.parametrize("group,option", list(options()), ids=lambda x: x)
def test_every_yaml_composes_and_instantiates(group, option):
    if group == "recipe":  # chosen by the model preset of the same name (config.yaml: optional recipe: ${model})
        override = f"model={option}" if (CONF / "model" / f"{option}.yaml").is_file() else f"recipe={option}"
    elif group == "benchmark":  # every benchmark is composed already (benchmark.<name>)
        override = f"evaluation.benchmarks=[{option}]"
    elif group in MAIN_GROUPS:
        override = f"{group}={option}"
    elif group in (
        "model/lora",
        "pairs/labeler",
        "evaluation/judge",
    ):  # groups with a default of their own: replaced, not appended
        override = f"{group}={option}"
    else:
        override = f"+{group}={option}"
    cfg = compose_cfg([override, *REQUIRED.get(f"{group}/{option}", [])], tiny=False)
    if group == "hardware" and option == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            plan(cfg)
        return
    run = plan(cfg)  # hardware, loss, train, model, data source, logger: all built, nothing loaded
    assert run.loss.key == cfg.loss.key and run.train.steps == cfg.steps
    node = cfg
    for part in ["benchmark", option] if group == "benchmark" else [] if group == "recipe" else group.split("/"):
        node = node.get(part) if node is not None else None  # an experiment overlay has no node of its own
    if node is not None and "_target_" in node:
        assert instantiate(node) is not None


def test_defaults_compose_to_the_embedded_run():
    """No arguments: the real SmolLM2 weights with their recipe (LoRA, no warm-up, on-policy pairs, every core);
    model=tiny_qwen: the tiny random-init model with the loop's own defaults (warm-up first, one thread)."""
    cfg = compose_cfg([], tiny=False)
    run = plan(cfg)
    assert run.model.gguf_file.endswith("SmolLM2-135M-Instruct.Q4_1.gguf") and run.model.uses_lora
    assert run.loss.key == "dpo" and run.loss.hparams["beta"] == 0.1 and run.train.steps == 12
    assert run.hardware.strategy == "none" and run.hardware.threads != 1 and run.wandb is None
    assert not cfg.mathloop.warmup and cfg.mathloop.pairs and cfg.mathloop.evaluate
    assert cfg.data.source.max_operand == 15 and cfg.evaluation.benchmarks == ["arith"]
    tiny_cfg = compose_cfg(["model=tiny_qwen"], tiny=False)
    tiny = plan(tiny_cfg)
    assert tiny.model.arch == "qwen2" and not tiny.model.uses_lora and tiny.hardware.threads == 1
    assert tiny.train.steps == 60 and tiny_cfg.mathloop.warmup and tiny_cfg.data.source.max_operand == 9


@pytest.mark.parametrize(
    "model,hub_id",
    [
        ("qwen_math", "Qwen/Qwen2.5-Math-7B"),
        ("qwen_math_instruct", "Qwen/Qwen2.5-Math-7B-Instruct"),
        ("qwen_math_1_5b", "Qwen/Qwen2.5-Math-1.5B"),
        ("llama3_8b", "meta-llama/Llama-3.1-8B-Instruct"),
        ("llama3_8b_base", "meta-llama/Llama-3.1-8B"),
    ],
)
def test_real_model_presets(model, hub_id):
    run = plan(compose_cfg([f"model={model}", "beta=0.1", "loss=bpo", *REQUIRED.get(f"model/{model}", [])], tiny=False))
    assert run.model.name_or_path == hub_id and run.model.dtype == "bfloat16"
    assert run.model.attn_implementation == "auto" and run.model.gradient_checkpointing
    assert run.loss.hparams == {"beta": 0.1, "alpha": 0.3, "form": "hinge"}


def test_cfg_job_shows_hub_id_dtype_and_attention(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "prefopt.run", "model=qwen_math", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "name_or_path: Qwen/Qwen2.5-Math-7B" in out.stdout
    assert "dtype: bfloat16" in out.stdout and "attn_implementation: auto" in out.stdout


def test_stop_words_enter_the_sampling_and_evaluation_keys_only_when_set():
    """A cached sample set or accuracy made with other stop words is not reused; keys made without any stay valid."""
    from prefopt import compose
    from prefopt.mathloop.stages.stage import EvalStage, PairsStage

    def keys(*overrides):
        plan = compose.build(compose_cfg(list(overrides)))
        return (
            EvalStage(plan.loop).key(plan.model, plan.data, "eval/verified_before"),
            PairsStage(plan.loop).key(plan.model, "problems"),
        )

    plain, empty, stops = keys(), keys("generation.stop_tokens=[]"), keys("generation.stop_tokens=['<|im_end|>']")
    assert plain == empty
    assert stops[0] != plain[0] and stops[1] != plain[1]
