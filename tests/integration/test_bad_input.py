"""Malformed data of every kind: a message naming file, row and field; dropped rows counted; nothing lost."""

from __future__ import annotations

import hashlib
import json

import pytest

from prefopt.data.sources import load_rows
from prefopt.errors import DataError
from tests.helpers.config import TINY_MODEL

GOOD = {"prompt": "What is 1 + 1?", "chosen": "2", "rejected": "3"}


def write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad,message",
    [
        ({"prompt": "q", "chosen": "a"}, r"rows\.jsonl: row 3: missing field 'rejected'"),
        ({"prompt": "q", "chosen": None, "rejected": "b"}, r"rows\.jsonl: row 3: missing field 'chosen'"),
        (
            {"prompt": 7, "chosen": "a", "rejected": "b"},
            r"rows\.jsonl: row 3: field 'prompt' must be a string or a list of messages \(got int\)",
        ),
        ('{"prompt": "q", "chosen": ', r"rows\.jsonl: row 3: not valid JSON"),
        (["q", "a", "b"], r"rows\.jsonl: row 3: expected an object with fields"),
    ],
)
def test_each_malformed_row_kind_names_file_row_and_field(tmp_path, bad, message):
    path = write(tmp_path / "rows.jsonl", [GOOD, GOOD, bad, GOOD])
    with pytest.raises(DataError, match=message):
        load_rows(str(path))


def test_empty_and_identical_rows_are_dropped_and_counted_or_refused(tmp_path):
    rows = [GOOD, {**GOOD, "chosen": "  "}, {**GOOD, "rejected": "2"}, GOOD]
    pairs, stats = load_rows(str(write(tmp_path / "rows.jsonl", rows)))
    assert len(pairs) == 2 and stats.as_dict() == {"rows": 4, "kept": 2, "dropped_identical": 1, "dropped_empty": 1}
    with pytest.raises(DataError, match=r"row 2: empty 'chosen' or 'rejected'"):
        load_rows(str(tmp_path / "rows.jsonl"), drop_identical=False)
    with pytest.raises(DataError, match=r"row 3: 'chosen' is identical to 'rejected'"):
        load_rows(str(write(tmp_path / "ident.jsonl", [GOOD, GOOD, {**GOOD, "rejected": "2"}])), drop_identical=False)


def test_a_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_long_prompts_are_truncated_and_counted_in_the_summary(tiny_run, tmp_path):
    rows = [
        {
            "prompt": f"What is {i} + 1?" + (" really" * 40 if i % 4 == 0 else ""),
            "chosen": f"{i + 1}",
            "rejected": f"{i + 2}",
        }
        for i in range(40)
    ]
    path = write(tmp_path / "long.jsonl", rows)
    summary, _ = tiny_run(
        "data=jsonl",
        f"data.source.path={path}",
        "data.source.eval_size=8",
        "data.max_length=96",
        "data.max_prompt_length=64",
        "steps=1",
    )
    tok = summary["data"]["tokenize"]
    assert tok["train"]["truncated_prompts"] + tok["eval"]["truncated_prompts"] == 10
    assert tok["train"]["prompt_tokens_cut"] + tok["eval"]["prompt_tokens_cut"] > 10 * 200  # " really" x 40, cut
    assert tok["train"]["truncation"] == "keep_end" and tok["train"]["dropped_long"] == 0


def test_bad_data_on_a_rerun_loses_nothing_already_written(tiny_run, tmp_path):
    path = write(tmp_path / "rows.jsonl", [{**GOOD, "prompt": f"q{i}", "chosen": f"a{i}"} for i in range(40)])
    _, run_dir = tiny_run(
        "data=jsonl", f"data.source.path={path}", "data.source.eval_size=8", "steps=2", run_dir=tmp_path / "run"
    )
    before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    write(path, [GOOD, {"prompt": "q"}])
    with pytest.raises(DataError, match="row 2: missing field 'chosen'"):
        tiny_run("data=jsonl", f"data.source.path={path}", "data.source.eval_size=8", "steps=4", run_dir=run_dir)
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_unreachable_wandb_never_stops_a_run(tiny_run, tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: connection refused
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    summary, run_dir = tiny_run(
        "logger=wandb", "logger.wandb.mode=online", "logger.wandb.init_timeout=3", "steps=2", run_dir=tmp_path / "run"
    )
    assert summary["status"] == "complete"
    assert len([1 for x in (run_dir / "metrics.jsonl").read_text().splitlines() if "train/loss" in x]) == 2
    assert "W&B is unavailable" in caplog.text


def test_validate_reports_every_problem_at_once_without_loading_a_model(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(GOOD) + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    args = [
        sys.executable,
        "-m",
        "prefopt.run",
        "validate=true",
        "loss=bpo",
        "loss.alpha=2",
        "batch_size=6",
        "micro_batch_size=4",
        "data.max_prompt_length=5000",
        "model=qwen_math",
        f"model.name_or_path={tmp_path / 'no_model'}",
        # the qwen_math recipe on CPU without its training problems and benchmark files
        # (tests/integration/test_recipes.py)
        "hardware=cpu",
        "model.lora.load_in_4bit=false",
        "mathloop.pairs=false",
        "evaluation.benchmarks=[]",
    ]
    out = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert out.returncode == 2
    for expected in (
        "loss.alpha must be in (0, 1]",
        "divisible by micro_batch_size",
        "not a directory with a saved model",
        "data.max_prompt_length (5000) must be < data.max_length (2048)",
        "data.source.path is required",
    ):  # on-policy pairs off: the paper's pair file (data=bpo_pairs)
        assert expected in out.stdout, (expected, out.stdout)
    assert out.stdout.startswith("prefopt: 5 problems (recipe qwen_math: conf/recipe/qwen_math.yaml):")
    tiny = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.run",
            TINY_MODEL,
            "validate=true",
            "data.max_length=8192",
            "data.max_prompt_length=64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert tiny.returncode == 2 and "data.max_length (8192) exceeds the model's context (4096 positions)" in tiny.stdout
    ok = subprocess.run(
        [sys.executable, "-m", "prefopt.run", TINY_MODEL, "validate=true", "data=jsonl", f"data.source.path={bad}"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert ok.returncode == 2 and "bad.jsonl: row 2: missing field 'rejected'" in ok.stdout
    good = subprocess.run(
        [sys.executable, "-m", "prefopt.run", "validate=true"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert good.returncode == 0 and "config OK" in good.stdout
    assert not (tmp_path / "outputs" / "cache").exists()  # nothing was trained, sampled or cached
