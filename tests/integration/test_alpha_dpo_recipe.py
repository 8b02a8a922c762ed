"""`model=llama3_8b experiment=alpha_dpo_ultrafeedback` composes to the table of the α-DPO recipe in docs/recipes.md."""

from __future__ import annotations

from prefopt.compose import build
from prefopt.mathloop.judging.judges import RewardModelJudge
from prefopt.mathloop.labelers import RewardModelLabeler
from tests.helpers.config import compose_cfg

RECIPE = ["model=llama3_8b", "experiment=alpha_dpo_ultrafeedback", "evaluation.judge.prompts=/data/alpaca_eval.jsonl"]


def test_recipe_composes_to_its_table():
    plan = build(compose_cfg(RECIPE, tiny=False), check_inputs=False)
    assert plan.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct" and plan.model.dtype == "bfloat16"
    assert plan.loss.key == "alpha_dpo" and plan.loss.hparams == {
        "beta": 10.0,
        "gamma": 4.0,
        "alpha": 0.2,
        "momentum": 0.9,
    }
    assert (plan.train.batch_size, plan.train.micro_batch_size, plan.train.steps) == (128, 2, 468)
    assert plan.optimizer_factory.keywords["lr"] == 1e-6 and plan.schedule.name == "cosine"
    assert plan.schedule.warmup_steps == 47 and plan.seed == 42
    assert plan.tokenize["max_length"] == 2048 and plan.tokenize["max_prompt_length"] == 1800
    assert plan.hardware.strategy == "fsdp"
    loop = plan.loop
    assert (loop.switches.warmup, loop.switches.pairs, loop.switches.evaluate) == (False, True, True)
    pairs = loop.pairs
    assert (pairs.path, pairs.split, pairs.problem_field) == (
        "HuggingFaceH4/ultrafeedback_binarized",
        "train_prefs",
        "prompt",
    )
    assert (pairs.k, pairs.temperature, pairs.max_pairs_per_prompt) == (5, 0.8, 1)
    assert (loop.generation.top_p, loop.generation.max_new_tokens) == (0.95, 4096)
    assert isinstance(pairs.labeler, RewardModelLabeler)
    assert pairs.labeler.name_or_path == "RLHFlow/ArmoRM-Llama3-8B-v0.1" and pairs.labeler.trust_remote_code
    judge = loop.evaluation.judge
    assert isinstance(judge, RewardModelJudge) and judge.name_or_path == "RLHFlow/ArmoRM-Llama3-8B-v0.1"
    assert (judge.prompts, judge.prompt_field, judge.baseline) == ("/data/alpaca_eval.jsonl", "instruction", None)
    assert loop.evaluation.benchmarks == []


def test_recipe_judges_alpaca_eval_prompts_by_default():
    judge = build(compose_cfg(RECIPE[:2], tiny=False), check_inputs=False).loop.evaluation.judge
    assert (judge.prompts, judge.split, judge.prompt_field) == ("tatsu-lab/alpaca_eval", "eval", "instruction")


def test_default_run_keeps_the_verifier():
    plan = build(compose_cfg([], tiny=False), check_inputs=False)
    assert type(plan.loop.pairs.labeler).__name__ == "VerifierLabeler" and plan.loop.evaluation.judge is None


def test_rm_arith_takes_another_labeller_or_no_judge():
    """The checker's labels as a control (pairs/labeler=verifier) and no judge compose on experiment=rm_arith; a key
    left over from another member of a group is named in one line."""
    import pytest

    from prefopt.errors import ConfigError

    plan = build(compose_cfg(["experiment=rm_arith"], tiny=False), check_inputs=False)
    assert isinstance(plan.loop.pairs.labeler, RewardModelLabeler) and plan.loop.pairs.labeler.name_or_path is None
    assert isinstance(plan.loop.evaluation.judge, RewardModelJudge) and plan.loop.evaluation.judge.prompts is None
    assert (plan.loop.reward.source, plan.loop.reward.steps, plan.loop.reward.lr, plan.loop.reward.ema) == (
        "contrasts",
        1600,
        1e-3,
        0.995,
    )
    plan = build(
        compose_cfg(["experiment=rm_arith", "pairs/labeler=verifier", "~evaluation/judge"], tiny=False),
        check_inputs=False,
    )
    assert type(plan.loop.pairs.labeler).__name__ == "VerifierLabeler" and plan.loop.evaluation.judge is None
    with pytest.raises(
        ConfigError,
        match=r"^pairs: VerifierLabeler has no setting 'min_gap' \(remove it, or choose the group "
        r"member that has it\)$",
    ):
        build(
            compose_cfg(["experiment=rm_arith", "pairs/labeler=verifier", "+pairs.labeler.min_gap=0.5"], tiny=False),
            check_inputs=False,
        )
