"""Benchmark sets: loading local JSONL/JSON/Parquet files, bad rows, prompt templates, scores, eval configs."""

from __future__ import annotations

import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest  # noqa: E402
from hydra.utils import instantiate  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from prefopt.config import conf_dir  # noqa: E402
from prefopt.errors import ConfigError, DataError  # noqa: E402
from prefopt.mathloop.benchmarks import (  # noqa: E402
    COT_INSTRUCTION,
    BenchmarkSpec,
    format_prompt,
    load_benchmark,
    mean_accuracy,
    score,
)
from prefopt.verify import Verdict  # noqa: E402

ROWS = [
    {"problem": "What is 2+3?", "answer": "5", "level": 1},
    {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "level": 2},
    {"problem": "What is 10/4?", "answer": 2.5, "level": 2},
    {"problem": "What is 7*6?", "answer": 42, "level": 1},
]


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl(tmp_path):
    rows = load_benchmark(str(_jsonl(tmp_path / "bench.jsonl", ROWS)))
    assert rows == [
        {"problem": "What is 2+3?", "answer": "5", "index": 0},
        {"problem": "Simplify $\\frac{2}{4}$.", "answer": "\\frac{1}{2}", "index": 1},
        {"problem": "What is 10/4?", "answer": "2.5", "index": 2},
        {"problem": "What is 7*6?", "answer": "42", "index": 3},
    ]
    assert len(load_benchmark(str(tmp_path / "bench.jsonl"), limit=2)) == 2


def test_load_parquet(tmp_path):
    from datasets import Dataset

    path = tmp_path / "bench.parquet"
    Dataset.from_list([{"question": r["problem"], "gold": str(r["answer"])} for r in ROWS]).to_parquet(str(path))
    rows = load_benchmark(str(path), problem_field="question", answer_field="gold", limit=3)
    assert [r["problem"] for r in rows] == [r["problem"] for r in ROWS[:3]]
    assert [r["answer"] for r in rows] == ["5", "\\frac{1}{2}", "2.5"]


def test_load_json_array(tmp_path):
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(ROWS[:2]), encoding="utf-8")
    assert [r["answer"] for r in load_benchmark(str(path))] == ["5", "\\frac{1}{2}"]


def test_row_missing_answer_names_file_row_and_field(tmp_path):
    path = _jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"problem": "What is 1+1?"}])
    with pytest.raises(DataError) as err:
        load_benchmark(str(path))
    message = str(err.value)
    assert str(path) in message and "row 2" in message and "'answer'" in message


def test_row_missing_problem_in_parquet_names_row_and_field(tmp_path):
    from datasets import Dataset

    path = tmp_path / "bad.parquet"
    Dataset.from_list([{"problem": "1+1?", "answer": "2"}, {"problem": None, "answer": "3"}]).to_parquet(str(path))
    with pytest.raises(DataError, match=r"bad\.parquet: row 2: missing field 'problem'"):
        load_benchmark(str(path))


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], True, "  "])
def test_non_scalar_or_empty_answer_is_refused(tmp_path, value):
    path = _jsonl(tmp_path / "odd.jsonl", [{"problem": "p", "answer": value}])
    expected = r"odd\.jsonl: row 1: field 'answer' must be a non-empty string or a number"
    with pytest.raises(DataError, match=expected):
        load_benchmark(str(path))


def test_malformed_line_and_missing_file(tmp_path):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"problem": "p", "answer": "1"}\n{"problem": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"broken\.jsonl: row 2: not valid JSON"):
        load_benchmark(str(path))
    with pytest.raises(DataError, match="does not exist"):
        load_benchmark(str(tmp_path / "nowhere.jsonl"))


def test_answer_transforms(tmp_path):
    gsm = _jsonl(tmp_path / "gsm.jsonl", [{"question": "q", "answer": "3 * 4 = 12\n#### 1,200"}])
    assert load_benchmark(str(gsm), problem_field="question", answer_transform="gsm8k")[0]["answer"] == "1200"
    oly = _jsonl(tmp_path / "oly.jsonl", [{"question": "q", "final_answer": ["$3$", "$4$"]}])
    rows = load_benchmark(str(oly), problem_field="question", answer_field="final_answer", answer_transform="join")
    assert rows[0]["answer"] == "$3$, $4$"
    sol = _jsonl(tmp_path / "sol.jsonl", [{"problem": "q", "solution": "so \\boxed{\\frac{1}{2}}."}])
    rows = load_benchmark(str(sol), answer_field="solution", answer_transform="boxed")
    assert rows[0]["answer"] == "\\frac{1}{2}"
    no_hashes = _jsonl(tmp_path / "g2.jsonl", [{"problem": "q", "answer": "12"}])
    with pytest.raises(DataError, match=r"row 1: field 'answer' has no '#### <answer>' line"):
        load_benchmark(str(no_hashes), answer_transform="gsm8k")
    with pytest.raises(ConfigError, match="answer_transform"):
        load_benchmark(str(gsm), answer_transform="nope")


def test_format_prompt_per_family():
    problem = "What is 2+3?"
    assert format_prompt(problem, "qwen_math") == [
        {"role": "system", "content": "Please reason step by step, and put your final answer within \\boxed{}."},
        {"role": "user", "content": problem},
    ]
    assert format_prompt(problem, "llama3") == [{"role": "user", "content": f"{problem}\n{COT_INSTRUCTION}"}]
    assert format_prompt(problem, "plain") == [{"role": "user", "content": problem}]
    with pytest.raises(ConfigError, match="qwen_math, llama3, plain, data"):
        format_prompt(problem, "gpt")


def test_score_counts_each_status():
    verdicts = [Verdict(True, "correct", "1")] * 3 + [
        Verdict(False, "wrong", "2"),
        Verdict(False, "no_answer"),
        Verdict(False, "timeout"),
        Verdict(False, "error"),
        Verdict(False, "no_answer"),
    ]
    assert score(verdicts) == {
        "accuracy": 3 / 8,
        "correct": 3,
        "total": 8,
        "wrong": 1,
        "no_answer": 2,
        "timeout": 1,
        "error": 1,
    }
    assert score([])["accuracy"] == 0.0
    assert mean_accuracy([{"accuracy": 0.5}, {"accuracy": 0.25}]) == pytest.approx(0.375)


EVAL_CONFIGS = sorted((conf_dir() / "benchmark").glob("*.yaml"))


def test_every_benchmark_config_is_there():
    names = {p.stem for p in EVAL_CONFIGS}
    assert {"arith", "math500", "aime24", "amc23", "minerva_math", "olympiadbench", "gsm8k"} <= names


@pytest.mark.parametrize("path", EVAL_CONFIGS, ids=lambda p: p.stem)
def test_benchmark_config_instantiates(path):
    assert path.read_text().startswith(f"# @package benchmark.{path.stem}\n# ")
    spec = instantiate(OmegaConf.load(path))
    assert isinstance(spec, BenchmarkSpec) and spec.name == path.stem
    assert spec.limit is None
    if spec.name in ("arith", "arith_val"):  # generated by the run: held-out and validation arithmetic
        assert spec.path is None
        with pytest.raises(ConfigError, match=f"benchmark.{spec.name}.path"):
            spec.load()
    else:
        assert spec.path.count("/") == 1  # a hub id by default; users point it at a local file instead


def test_benchmark_config_with_a_local_path_loads(tmp_path):
    rows = [{"question": "q1", "answer": "x\n#### 7"}, {"question": "q2", "answer": "#### 8"}]
    data = _jsonl(tmp_path / "gsm.jsonl", rows)
    cfg = OmegaConf.load(conf_dir() / "benchmark" / "gsm8k.yaml")
    cfg.path, cfg.limit = str(data), 1
    assert instantiate(cfg).load() == [{"problem": "q1", "answer": "7", "index": 0}]
    with pytest.raises(ConfigError, match="benchmark.x.limit"):
        BenchmarkSpec(name="x", path=str(data), limit=-1)


# -- layouts: the Hugging Face hub copies and the Qwen2.5-Math evaluation harness's data/<name>/test.jsonl --------
# Rows shaped like each file (field names from the harness's data files and the hub data sets; values made up).
HF_ROWS = {
    "math500": {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2", "level": 1},
    "aime24": {"id": 60, "problem": "Find $n$.", "solution": "so $\\boxed{204}$", "answer": "204", "url": "u"},
    "amc23": {"id": 0, "question": "How many?", "answer": 27.0, "url": "u"},
    "minerva_math": {"question": "Find the mass.", "answer": "7.5"},
    "olympiadbench": {"id": 1606, "question": "Find x.", "final_answer": ["$3$"], "solution": ["..."]},
}
HARNESS_ROWS = {
    "math500": {"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$.", "answer": "2", "unique_id": "a"},
    "aime24": {"id": 60, "problem": "Find $n$.", "solution": "so $\\boxed{204}$", "answer": "204", "url": "u"},
    "amc23": {"id": 0, "question": "How many?", "answer": 27.0, "url": "u"},
    "minerva_math": {"problem": "Find the mass.", "solution": "m = 7.5 kg, so $\\boxed{7.5}$.", "type": "p", "idx": 0},
    "olympiadbench": {
        "id": 1606,
        "question": "Find x and y.",
        "final_answer": ["$3$", "$4$"],
        "solution": ["..."],
        "is_multiple_answer": True,
        "unit": None,
        "answer_type": "Numerical",
    },
    "gsm8k": {"question": "Tom has 3 apples ...", "answer": "3 + 4 = 7\n#### 1,007"},
}
EXPECTED = {  # (benchmark, layout): (problem, answer)
    ("math500", "hf"): ("Compute $1+1$.", "2"),
    ("math500", "harness"): ("Compute $1+1$.", "2"),
    ("aime24", "hf"): ("Find $n$.", "204"),
    ("aime24", "harness"): ("Find $n$.", "204"),
    ("amc23", "hf"): ("How many?", "27"),
    ("amc23", "harness"): ("How many?", "27"),
    ("minerva_math", "hf"): ("Find the mass.", "7.5"),
    ("minerva_math", "harness"): ("Find the mass.", "7.5"),
    ("olympiadbench", "hf"): ("Find x.", "$3$"),
    ("olympiadbench", "harness"): ("Find x and y.", "$3$, $4$"),
    ("gsm8k", "harness"): ("Tom has 3 apples ...", "1007"),
}


@pytest.mark.parametrize("name,layout", sorted(EXPECTED), ids=lambda x: x)
def test_each_benchmark_config_reads_both_layouts(tmp_path, caplog, name, layout):
    row = (HF_ROWS if layout == "hf" else HARNESS_ROWS)[name]
    cfg = OmegaConf.load(conf_dir() / "benchmark" / f"{name}.yaml")
    cfg.path = str(_jsonl(tmp_path / "test.jsonl", [row, row]))
    with caplog.at_level("INFO", logger="prefopt"):
        rows = instantiate(cfg).load()
    assert [(r["problem"], r["answer"]) for r in rows] == [EXPECTED[name, layout]] * 2
    assert f"benchmark.{name}: {cfg.path}: problem from" in caplog.text  # the log says which fields were used


def test_detected_fields_are_logged_and_set_fields_win(tmp_path, caplog):
    path = _jsonl(tmp_path / "minerva.jsonl", [HARNESS_ROWS["minerva_math"]])
    with caplog.at_level("INFO", logger="prefopt"):
        assert load_benchmark(str(path), key="benchmark.minerva_math")[0]["answer"] == "7.5"
    assert "problem from 'problem', answer from 'solution' (answer_transform boxed)" in caplog.text
    # a field set in the config is used as set (here the raw solution text is the "answer")
    rows = load_benchmark(str(path), answer_field="solution", problem_field="type")
    assert rows[0]["problem"] == "p" and rows[0]["answer"].startswith("m = 7.5 kg")


def test_an_undetectable_layout_names_file_fields_and_keys(tmp_path):
    path = _jsonl(tmp_path / "odd.jsonl", [{"prompt": "p", "target": "1"}])
    spec = BenchmarkSpec(name="math500", path=str(path))
    with pytest.raises(DataError) as err:
        spec.load()
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "['prompt', 'target']" in message
    assert "set benchmark.math500.problem_field and benchmark.math500.answer_field" in message


def test_every_benchmark_field_is_overridable_from_the_command_line(tmp_path):
    from tests.helpers.config import compose_cfg

    data = _jsonl(tmp_path / "b.jsonl", [{"q": "What?", "gold": "x\n#### 5"}] * 3)
    cfg = compose_cfg(
        [
            f"benchmark.gsm8k.path={data}",
            "benchmark.gsm8k.split=train",
            "benchmark.gsm8k.subset=null",
            "benchmark.gsm8k.problem_field=q",
            "benchmark.gsm8k.answer_field=gold",
            "benchmark.gsm8k.answer_transform=gsm8k",
            "benchmark.gsm8k.limit=2",
            "evaluation.benchmarks=[gsm8k]",
        ]
    )
    (spec,) = instantiate(cfg.evaluation).specs()
    assert (spec.path, spec.split, spec.subset, spec.limit) == (str(data), "train", None, 2)
    assert spec.load() == [
        {"problem": "What?", "answer": "5", "index": 0},
        {"problem": "What?", "answer": "5", "index": 1},
    ]
