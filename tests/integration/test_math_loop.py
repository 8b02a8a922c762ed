"""The verified-math loop: evaluation with a stub generator, SFT through the engine, the entry points, caching."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from prefopt.compose import build
from prefopt.errors import ConfigError, DataError
from prefopt.generate import Completions, GenerationConfig, HFGenerator
from prefopt.mathloop.benchmarks import BenchmarkSpec
from prefopt.mathloop.loop import MathLoop
from prefopt.mathloop.stages.verification import EvalConfig, benchmark_rows, evaluate_policy
from prefopt.tokenizer import char_tokenizer
from prefopt.verify import AnswerChecker
from tests.helpers.config import compose_cfg, tiny_model

QUESTION = re.compile(r"What is (\d+) ([+-]) (\d+)\?")


def arith_answer(prompt: str) -> int:
    a, op, b = QUESTION.search(prompt).groups()
    return int(a) + int(b) if op == "+" else int(a) - int(b)


class StubGenerator:
    """Known outputs: `rule(prompt, j)` is sample j's text; records every call."""

    def __init__(self, rule):
        self.rule, self.calls = rule, []

    def generate(self, prompts, n=1, temperature=0.0, seed=0):
        self.calls.append({"prompts": len(prompts), "n": n, "temperature": temperature})
        texts = [[self.rule(p, j) for j in range(n)] for p in prompts]
        return Completions(texts, [[True] * n for _ in prompts])


def half_right(prompt: str, j: int) -> str:
    """Sample j is right when answer + j is even: greedy (j = 0) is right on even answers, and with k = 2
    every prompt has one right and one wrong sample."""
    x = arith_answer(prompt)
    return f"The answer is \\boxed{{{x if (x + j) % 2 == 0 else x + 1}}}."


def even_share(n_eval: int = 8) -> float:
    from prefopt.data.arith import ArithmeticData

    rows = ArithmeticData(n_train=32, n_eval=n_eval).problem_rows("eval")
    return sum(int(r["answer"]) % 2 == 0 for r in rows) / len(rows)


@pytest.fixture(scope="module")
def checker():
    with AnswerChecker(timeout_s=5.0, workers=1) as c:
        yield c


# -- evaluation ---------------------------------------------------------------------------------------------


def test_evaluation_scores_known_outputs_and_writes_per_sample_rows(tmp_path, checker):
    rows = [
        {"problem": f"What is {a} + {b}?", "answer": str(a + b), "index": i}
        for i, (a, b) in enumerate([(1, 1), (2, 3), (4, 4), (5, 0), (6, 1)])
    ]
    outputs = {
        "What is 1 + 1?": "1 + 1 = 2. The answer is \\boxed{2}.",  # right
        "What is 2 + 3?": "The answer is \\boxed{6}.",  # wrong
        "What is 4 + 4?": "I do not know",  # nothing to extract: no_answer
        "What is 5 + 0?": "so x = 5",  # right, without a box
        "What is 6 + 1?": "\\boxed{\\frac{14}{2}}",
    }  # right, another form
    stub = StubGenerator(lambda prompt, j: outputs[QUESTION.search(prompt).group(0)])
    from prefopt.mathloop.benchmarks import BenchmarkSpec

    config = EvalConfig(benchmarks=[])
    metrics, details = evaluate_policy(
        stub,
        char_tokenizer("qwen"),
        [(BenchmarkSpec(name="arith"), rows)],
        checker,
        config,
        tmp_path,
        prefix="eval/verified",
    )
    assert metrics == {"eval/verified/arith": pytest.approx(0.6), "eval/verified/mean": pytest.approx(0.6)}
    assert (details["arith"]["correct"], details["arith"]["wrong"], details["arith"]["no_answer"]) == (3, 1, 1)
    assert stub.calls == [{"prompts": 5, "n": 1, "temperature": 0.0}]  # greedy, one batch
    lines = [json.loads(line) for line in (tmp_path / "arith.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in lines] == [True, False, False, True, True]
    assert [r["status"] for r in lines] == ["correct", "wrong", "no_answer", "correct", "correct"]
    assert lines[1]["extracted"] == "6" and lines[1]["gold"] == "5" and lines[2]["extracted"] is None
    assert lines[0]["prompt"].startswith("<|im_start|>user\nWhat is 1 + 1?<|im_end|>")  # through the chat template
    assert lines[0]["prompt"].endswith("<|im_start|>assistant\n") and lines[0]["output"] == outputs["What is 1 + 1?"]


def test_evaluation_avg_at_k_and_a_timeout_count_wrong(tmp_path):
    from prefopt.mathloop.benchmarks import BenchmarkSpec

    rows = [
        {"problem": "What is 2 + 2?", "answer": "4", "index": 0},
        {"problem": "What is 3 + 3?", "answer": "6", "index": 1},
    ]
    stub = StubGenerator(lambda p, j: "SLEEP" if "3 + 3" in p and j == 0 else f"\\boxed{{{arith_answer(p)}}}")
    # a light check function module: a worker replacing a timed-out one starts in a second
    with AnswerChecker(timeout_s=1.0, workers=1, check_fn="tests.unit.test_answer_checker:_check_with_faults") as slow:
        metrics, details = evaluate_policy(
            stub,
            char_tokenizer("qwen"),
            [(BenchmarkSpec(name="arith"), rows)],
            slow,
            EvalConfig(benchmarks=[], samples=4, temperature=0.7),
            tmp_path,
            prefix="eval/verified",
        )
    assert metrics["eval/verified/arith"] == 0.5 and details["arith"]["timeout"] == 1  # greedy = sample 0
    assert metrics["eval/verified_avg@4/arith"] == pytest.approx(7 / 8)
    assert stub.calls[1] == {"prompts": 2, "n": 4, "temperature": 0.7}
    row = json.loads((tmp_path / "arith.jsonl").read_text().splitlines()[1])
    assert row["status"] == "timeout" and len(row["sampled"]) == 4


def test_no_benchmarks_no_metrics(tmp_path, checker):
    assert evaluate_policy(
        StubGenerator(half_right), char_tokenizer("qwen"), [], checker, EvalConfig(benchmarks=[]), tmp_path
    ) == ({}, {})


def test_benchmark_paths_and_bad_rows_name_file_row_and_field(tmp_path):
    path = tmp_path / "math.jsonl"
    path.write_text('{"problem": "1+1", "answer": "2"}\n{"problem": "2+2"}\n')
    suite = {"math500": BenchmarkSpec(name="math500", path="HuggingFaceH4/MATH-500")}
    config = EvalConfig(benchmarks=["math500"], suite=suite, paths={"math500": str(path)})
    (spec,) = config.specs()
    with pytest.raises(DataError, match=r"math\.jsonl: row 2: missing field 'answer'"):
        benchmark_rows(spec, {})
    with pytest.raises(ConfigError, match="unknown benchmark 'nope'"):
        EvalConfig(benchmarks=["nope"], suite=suite)
    with pytest.raises(ConfigError, match="evaluation.prompt_family"):
        EvalConfig(prompt_family="chatml")


def test_hf_generator_on_the_tiny_model_left_pads_and_is_reproducible():
    from prefopt.models import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(
        arch="qwen2",
        config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1
        ),
        tokenizer="char",
    )
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    gen = HFGenerator(model, tok, GenerationConfig(batch_size=2, max_new_tokens=6), spec.completion_eos)
    prompts = ["<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n", "hi", "What is 10 - 3?"]
    greedy = gen.generate(prompts, n=1, temperature=0.0)
    assert len(greedy.texts) == 3 and all(len(t) == 1 for t in greedy.texts)
    # left padding: a prompt's greedy answer does not depend on the batch it came in
    alone = gen.generate(prompts[2:], n=1, temperature=0.0)
    assert alone.texts[0] == greedy.texts[2]
    a = gen.generate(prompts, n=3, temperature=1.0, seed=5)
    b = gen.generate(prompts, n=3, temperature=1.0, seed=5)
    assert a.texts == b.texts and all(len(t) == 3 for t in a.texts)
    assert tok.padding_side == "right" and model.training  # left as they were
    with pytest.raises(ConfigError, match="greedy"):
        gen.generate(prompts, n=2, temperature=0.0)


# -- warm-up (SFT) ------------------------------------------------------------------------------------------


def test_sft_lowers_the_nll_through_the_engine(tmp_path):
    from prefopt.mathloop.stages.warmup import SFTObjective, nll

    cfg = compose_cfg(
        [
            "warmup.steps=8",
            "warmup.batch_size=8",
            "warmup.micro_batch_size=4",
            "warmup.lr=3e-3",
            "warmup.warmup_steps=1",
            "warmup.progress=false",
        ]
    )
    p = build(cfg)
    loop = p.loop
    model, tok, result = loop.run_warmup(p.model, p.data, p.hardware.setup(), tmp_path / "sft")
    rows = [json.loads(line) for line in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 8 and losses[-1] < losses[0] - 0.5  # per-token NLL of the chosen answers falls
    assert result["metrics"]["eval/loss"] < losses[0]
    assert (tmp_path / "sft" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "sft" / "final" / "tokenizer.json").is_file()
    # the objective: −ℓ_w/n_w per pair, reference-free
    from prefopt.losses import PairLogps

    out = nll(PairLogps(torch.tensor([-6.0]), torch.tensor([-1.0]), torch.tensor([3.0]), torch.tensor([1.0])))
    assert out.loss.item() == pytest.approx(2.0) and SFTObjective().reference is False


def test_the_warmup_trains_on_the_noisy_sft_targets_and_the_preference_data_stays_clean(tmp_path, monkeypatch):
    import prefopt.mathloop.loop as loop_module

    seen = {}

    def spy(model, train_pairs, eval_pairs, *args, **kwargs):
        seen["train"] = train_pairs
        raise RuntimeError("stop here")

    monkeypatch.setattr(loop_module, "warm_up", spy)
    p = build(compose_cfg(["data.source.miscopied=1.0"]))
    with pytest.raises(RuntimeError, match="stop here"):
        p.loop.run_warmup(p.model, p.data, p.hardware.setup(), tmp_path / "sft")
    tok = p.loop.load(p.model, p.hardware)[1]
    boxed = [re.findall(r"\\boxed\{(-?\d+)\}", tok.decode(t.chosen_ids)) for t in seen["train"]]
    firsts = [re.search(r"What is (\d+)", tok.decode(t.prompt_ids)).group(1) for t in seen["train"]]
    train, _, _ = p.data.load()
    assert len(boxed) == len(train) > 0 and all(b == [a] for b, a in zip(boxed, firsts))  # every target miscopied
    assert all(pair.chosen.endswith(f"\\boxed{{{eval(pair.prompt[8:-1])}}}.") for pair in train)  # pairs: clean


# -- the loop and its cache ---------------------------------------------------------------------------------

LOOP = [
    "mathloop.warmup=true",
    "mathloop.pairs=true",
    "mathloop.evaluate=true",
    "warmup.steps=2",
    "warmup.batch_size=8",
    "warmup.micro_batch_size=8",
    "warmup.progress=false",
    "pairs.k=2",
    "pairs.eval_size=4",
    "verify.workers=1",
]


@pytest.fixture
def counted(monkeypatch):
    """The stub generator for every stage, and counters of the stages that really ran."""

    calls = {"warmup": 0, "pairs": 0, "eval": 0}
    stub = StubGenerator(half_right)
    monkeypatch.setattr(MathLoop, "generator", lambda self, model, tok, spec: stub)
    for stage, name in (("warmup", "run_warmup"), ("pairs", "run_pairs"), ("eval", "run_eval")):
        real = getattr(MathLoop, name)

        def wrapped(self, *a, _real=real, _stage=stage, **k):
            calls[_stage] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(MathLoop, name, wrapped)
    return calls


def test_the_loop_caches_warmup_and_pairs_and_a_changed_key_recomputes(tiny_run, tmp_path, counted):
    cache = f"mathloop.cache_dir={tmp_path / 'cache'}"
    first, run1 = tiny_run(*LOOP, cache, run_dir=tmp_path / "r1")
    assert counted == {"warmup": 1, "pairs": 1, "eval": 2}  # accuracy before and after
    m = first["metrics"]
    # the stub is right on even answers only, before and after: same accuracy, and the keys the report reads
    assert m["eval/verified/arith"] == m["eval/verified_before/arith"] == m["eval/verified/mean"] == even_share()
    # same problems solved before and after: all preserved, none improved (from the per-problem files)
    assert (m["eval/preserved/arith"], m["eval/improved/arith"]) == (1.0, 0.0)
    assert 0 < m["eval/preserved_low/arith"] < 1.0 == m["eval/preserved_high/arith"]
    info = first["mathloop"]
    assert info["warmup"]["cached"] is False and info["pairs"]["cached"] is False
    assert info["pairs"]["num_pairs"] == 32 and info["pairs"]["counts"]["dropped_all_correct"] == 0
    assert Path(info["pairs"]["path"]).is_file() and Path(info["pairs"]["path"] + ".provenance.json").is_file()
    tokenized = first["data"]["tokenize"]  # the preference run trained on the on-policy pairs (4 held out)
    assert (tokenized["train"]["pairs"], tokenized["eval"]["pairs"]) == (28, 4)
    assert (run1 / "verified" / "arith.jsonl").is_file() and (run1 / "verified_before" / "arith.jsonl").is_file()
    assert first["verified"]["before"]["arith"]["total"] == 8

    second, _ = tiny_run(*LOOP, cache, "loss=bpo", run_dir=tmp_path / "r2")  # another loss: same stages
    assert counted == {"warmup": 1, "pairs": 1, "eval": 3}  # only the accuracy after training ran again
    assert second["mathloop"]["warmup"]["cached"] and second["mathloop"]["pairs"]["cached"]
    assert second["mathloop"]["pairs"]["key"] == info["pairs"]["key"]
    assert second["metrics"]["eval/verified_before/arith"] == m["eval/verified_before/arith"]

    tiny_run(*LOOP, cache, "warmup.lr=1e-3", run_dir=tmp_path / "r3")  # a new warm-up: everything after it too
    assert counted == {"warmup": 2, "pairs": 2, "eval": 5}
    tiny_run(*LOOP, cache, "pairs.temperature=0.9", run_dir=tmp_path / "r4")  # new pairs from the cached warm-up
    assert counted == {"warmup": 2, "pairs": 3, "eval": 6}
    keys = sorted(p.name for p in (tmp_path / "cache" / "warmup").iterdir() if not p.name.startswith("."))
    assert len([k for k in keys if not k.endswith(".lock")]) == 2
    assert not list((tmp_path / "cache" / "warmup").glob(".*.build*"))  # no half-built entries left


def test_each_seed_has_its_own_warmup_and_pairs_shared_by_its_losses(tiny_run, tmp_path, counted):
    """`-m loss=dpo,bpo seed=0,1`: the seed is in the warm-up and pairs keys, the loss is not."""
    cache = f"mathloop.cache_dir={tmp_path / 'cache'}"
    s0, _ = tiny_run(*LOOP, cache, "seed=0", run_dir=tmp_path / "dpo0")
    s1, _ = tiny_run(*LOOP, cache, "seed=1", run_dir=tmp_path / "dpo1")
    assert counted == {"warmup": 2, "pairs": 2, "eval": 4}
    assert s0["mathloop"]["warmup"]["key"] != s1["mathloop"]["warmup"]["key"]
    assert s0["mathloop"]["pairs"]["key"] != s1["mathloop"]["pairs"]["key"]
    b1, _ = tiny_run(*LOOP, cache, "seed=1", "loss=bpo", run_dir=tmp_path / "bpo1")
    assert counted == {"warmup": 2, "pairs": 2, "eval": 5}  # seed 1's warm-up, pairs and accuracy before reused
    assert b1["mathloop"]["warmup"]["key"] == s1["mathloop"]["warmup"]["key"]
    assert b1["mathloop"]["pairs"]["key"] == s1["mathloop"]["pairs"]["key"]


def test_without_the_cache_the_stages_write_into_the_run_directory_only(tiny_run, tmp_path, counted):
    summary, run = tiny_run(
        *LOOP, "mathloop.cache=false", f"mathloop.cache_dir={tmp_path / 'cache'}", run_dir=tmp_path / "r"
    )
    assert not (tmp_path / "cache").exists()
    assert (run / "warmup" / "policy" / "model.safetensors").is_file() and (run / "pairs.jsonl").is_file()
    assert summary["mathloop"]["warmup"]["cached"] is False and counted == {"warmup": 1, "pairs": 1, "eval": 2}
    assert summary["mathloop"]["pairs"]["path"] == str(run / "pairs.jsonl")


def test_sampling_settings_that_cannot_make_pairs_are_refused():
    with pytest.raises(ConfigError, match=r"pairs.k must be an integer >= 2"):
        build(compose_cfg(["pairs.k=1"]))
    with pytest.raises(ConfigError, match=r"pairs.temperature must be > 0"):
        build(compose_cfg(["pairs.temperature=0"]))


def test_too_few_pairs_stop_with_the_counts(tiny_run, tmp_path, monkeypatch):

    monkeypatch.setattr(MathLoop, "generator", lambda self, m, t, s: StubGenerator(lambda p, j: "\\boxed{0}"))
    with pytest.raises(DataError, match=r"only \d+ pairs .* always right or always wrong"):
        tiny_run(*LOOP, f"mathloop.cache_dir={tmp_path}", "mathloop.evaluate=false")


# -- the entry points ---------------------------------------------------------------------------------------


def test_entry_points_sft_pairs_evaluate_in_process(tmp_path, monkeypatch):
    """What `python -m prefopt.{sft,pairs,evaluate}` run, on tiny settings (the CLI itself: test below)."""
    from prefopt.mathloop.jobs import evaluate_job, pairs_job, sft_job

    stub = StubGenerator(half_right)
    monkeypatch.setattr(MathLoop, "generator", lambda self, model, tok, spec: stub)
    over = LOOP + ["warmup.steps=3"]
    cfg = compose_cfg(over)
    p = build(cfg)
    summary = sft_job(p.loop, p.model, p.data, p.hardware, tmp_path / "sft")
    share = even_share()
    assert summary["metrics"]["eval/verified/arith"] == share and (tmp_path / "sft" / "final" / "config.json").is_file()
    assert json.loads((tmp_path / "sft" / "summary.json").read_text())["metrics"]["eval/verified/mean"] == share

    cfg = compose_cfg(over + [f"policy={tmp_path / 'sft' / 'final'}"])
    p = build(cfg)
    record = pairs_job(p.loop, p.model, p.data, p.hardware, tmp_path / "pairs")
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert record["num_pairs"] == len(rows) == 32 and record["k"] == 2
    assert "sft/final" in record["policy"]
    assert all(set(r) == {"prompt", "chosen", "rejected", "pair_id"} for r in rows)
    assert all(arith_answer(r["prompt"]) == int(re.search(r"boxed\{(-?\d+)", r["chosen"]).group(1)) for r in rows)
    # a data= config reads the pairs file
    from prefopt.data.sources import FileData

    train, held, _ = FileData(path=str(tmp_path / "pairs" / "pairs.jsonl"), eval_size=4).load()
    assert len(train) == 28 and len(held) == 4

    summary = evaluate_job(p.loop, p.model, p.data, p.hardware, tmp_path / "eval")
    assert summary["metrics"] == {"eval/verified/arith": share, "eval/verified/mean": share}
    assert (tmp_path / "eval" / "verified" / "arith.jsonl").is_file()
    # KL(π‖π_ref) on the policy's answers, against itself (exactly 0) and against the model's own random weights
    final = tmp_path / "sft" / "final"
    for reference, name in ((final, "kl_self"), ("model", "kl_model")):
        p = build(compose_cfg(over + [f"policy={final}", f"evaluation.kl_reference={reference}"]))
        metrics = evaluate_job(p.loop, p.model, p.data, p.hardware, tmp_path / name)["metrics"]
        assert metrics["eval/verified/mean"] == share
        if name == "kl_self":
            assert metrics["eval/kl/greedy"] == pytest.approx(0.0, abs=1e-6)
        else:
            assert metrics["eval/kl/greedy"] > 0.1 and metrics["eval/kl/greedy_low"] < metrics["eval/kl/greedy"]


REPO = Path(__file__).resolve().parents[2]


def _cli(module, *args, cwd):
    import os
    import subprocess

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", module, *tiny_model(args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def test_cli_entry_points_chain(tmp_path):  # ~30 s on 2 cores: four Python processes start and import torch
    """sft → pairs → evaluate as a user types them (a random tiny model: the pairs step may find no pairs)."""
    tiny = ["data.source.n_train=16", "data.source.n_eval=4", "train.progress=false", "verify.workers=1"]
    out = _cli(
        "prefopt.sft",
        *tiny,
        "warmup.steps=2",
        "warmup.batch_size=4",
        "warmup.micro_batch_size=4",
        f"hydra.run.dir={tmp_path}/sft",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert "eval/verified/arith" in summary["metrics"]
    out = _cli(
        "prefopt.pairs",
        *tiny,
        f"policy={tmp_path}/sft/final",
        "pairs.k=2",
        "generation.max_new_tokens=8",
        f"hydra.run.dir={tmp_path}/pairs",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    meta = json.loads((tmp_path / "pairs" / "pairs.jsonl.provenance.json").read_text())
    assert meta["k"] == 2 and meta["counts"]["samples"] == 32 and meta["temperature"] == 0.7
    out = _cli("prefopt.pairs", *tiny, "pairs.k=1", f"hydra.run.dir={tmp_path}/bad", cwd=tmp_path)
    assert out.returncode == 2 and "pairs.k must be an integer >= 2" in out.stderr
    out = _cli(
        "prefopt.evaluate",
        *tiny,
        f"policy={tmp_path}/sft/final",
        "generation.max_new_tokens=8",
        f"hydra.run.dir={tmp_path}/eval",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (tmp_path / "eval" / "verified" / "arith.jsonl").read_text().splitlines()]
    accuracy = sum(r["correct"] for r in rows) / len(rows)
    assert len(rows) == 4 and f"eval/verified/mean: {accuracy:.4f}" in out.stdout
    assert json.loads((tmp_path / "eval" / "summary.json").read_text())["metrics"]["eval/verified/mean"] == accuracy


def test_the_default_warmup_makes_a_policy_that_is_sometimes_right(tmp_path):
    """What the loop needs: the tiny random model, warmed up on the default arithmetic, answers 15-85% of the held-out
    problems right (greedy, verified), so that sampling gives right and wrong answers to pair. ~25 s on 2 quiet
    cores: the real 350-step warm-up, in one process."""
    out = _cli("prefopt.sft", "train.progress=false", f"hydra.run.dir={tmp_path}/sft", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert 0.15 <= summary["metrics"]["eval/verified/arith"] <= 0.85
    assert summary["verified"]["after"]["arith"]["total"] == 50


# -- the DCR table ------------------------------------------------------------------------------------------


def test_dcr_table_from_run_directories(tmp_path):
    from prefopt.reporting.dcr_table import write_dcr_table

    for i, (loss, after, chosen) in enumerate([("dpo", 0.4, -1.5), ("bpo", 0.5, 0.2)]):
        run = tmp_path / str(i)
        run.mkdir()
        metrics = {
            "eval/verified_before/mean": 0.35,
            "eval/verified/mean": after,
            "eval/rewards/chosen": chosen,
            "eval/rewards/rejected": -3.0,
            "eval/dcr/chosen_reward_below_zero": 0.9 if chosen < 0 else 0.1,
            "eval/dcr/chosen_logp_delta_per_token": chosen / 10,
        }
        (run / "summary.json").write_text(json.dumps({"status": "complete", "loss": loss, "metrics": metrics}))
    out = write_dcr_table([tmp_path], echo=False)
    md = (tmp_path / "dcr_table.md").read_text()
    assert "| dpo " in md and "| bpo " in md and "35.0%" in md and "40.0%" in md and "-1.500" in md
    csv_rows = (tmp_path / "dcr_table.csv").read_text().splitlines()
    assert csv_rows[0].startswith("loss,run,status,eval/verified_before/mean") and len(csv_rows) == 3
    assert [r["loss"] for r in out["rows"]] == ["dpo", "bpo"]


def test_dcr_table_with_seeds_shows_them_and_the_means(tmp_path):
    from prefopt.reporting.dcr_table import write_dcr_table

    for i, (loss, seed, after) in enumerate(
        [("dpo", "0", 0.2), ("dpo", "1", 0.4), ("bpo", "0", 0.5), ("bpo", "1", 0.7)]
    ):
        run = tmp_path / str(i)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n")
        (run / "summary.json").write_text(
            json.dumps({"status": "complete", "loss": loss, "metrics": {"eval/verified/mean": after}})
        )
    out = write_dcr_table([tmp_path], echo=False)
    assert out["table"].splitlines()[0].startswith("| loss | seed |")
    assert [(m["loss"], m["runs"], m["eval/verified/mean"]) for m in out["means"]] == [
        ("dpo", 2, pytest.approx(0.3)),
        ("bpo", 2, pytest.approx(0.6)),
    ]
    assert "Mean over the runs of each loss (dpo: 2, bpo: 2)" in (tmp_path / "dcr_table.md").read_text()


def test_experiment_overlay_composes_with_every_stage_and_the_table_callback():
    cfg = compose_cfg(["experiment=dcr_arith", "loss=caldpo"], tiny=False)
    assert cfg.mathloop.warmup and cfg.mathloop.pairs and cfg.mathloop.evaluate and cfg.loss.key == "caldpo"
    tiny = compose_cfg(["model=tiny_qwen"], tiny=False)  # every stage on (the fast tests turn them off)
    assert tiny.mathloop.warmup is tiny.mathloop.pairs is tiny.mathloop.evaluate is True
