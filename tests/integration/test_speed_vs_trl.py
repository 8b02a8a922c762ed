"""scripts/speed_vs_trl.py: its table and JSON rows (fast), and a short real run of both tools (slow)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
KEYS = {"tool", "vocab", "reference", "steps_per_s", "tokens_per_s", "peak_rss_mb"}


def _bench():
    spec = importlib.util.spec_from_file_location("speed_vs_trl", REPO / "scripts" / "speed_vs_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_table_has_ratios_against_trl_of_the_same_vocab_and_reference(capsys):
    bench = _bench()
    row = dict(vocab=128, precision="bf16", mfu=0.5)
    bench.print_table(
        [
            dict(row, tool="prefopt", reference="live", steps_per_s=2.0, tokens_per_s=6000.0, peak_rss_mb=800.0),
            dict(row, tool="trl", reference="live", steps_per_s=0.5, tokens_per_s=1500.0, peak_rss_mb=1000.0),
        ]
    )
    out = capsys.readouterr().out
    prefopt_line = next(line for line in out.splitlines() if "prefopt" in line)
    assert "4.00" in prefopt_line and "0.80" in prefopt_line  # tokens/s ×TRL, RSS ×TRL


def test_the_same_pairs_and_tokens_for_both_tools():
    bench = _bench()
    train, tokenized, _ = bench.dataset(64)
    assert len(train) == len(tokenized) == 64
    tps = bench.tokens_per_step(tokenized)
    assert 30 < tps / bench.PAIRS_PER_STEP / 2 < 70  # tokens per sequence of the character-level arithmetic pairs


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra (trl)")
def test_a_short_benchmark_run_writes_the_json_rows(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(
        [
            sys.executable,
            "scripts/speed_vs_trl.py",
            "--steps",
            "3",
            "--large-steps",
            "3",
            "--warmup",
            "1",
            "--vocab",
            "small",
            "--reference",
            "cached",
            "--json",
            str(out),
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert {r["tool"] for r in rows} == {"prefopt", "trl"}
    for r in rows:
        assert KEYS <= set(r) and r["reference"] == "cached" and r["vocab"] == 128
        assert r["steps_per_s"] > 0 and r["peak_rss_mb"] > 100
    assert "tok/s ×TRL" in res.stdout


# -- the real workload (--model smollm2): SmolLM2-135M-Instruct on chat pairs ------------------------------------
def test_real_table_pairs_each_prefopt_row_with_trl_of_the_same_tuning_and_reference(capsys):
    bench = _bench()
    base = dict(vocab=49152, precision="bf16", mfu=0.1, cpu_s_per_step=10.0, first_step_s=30.0, load_1m=1.5)
    rows = [
        dict(base, tool=tool, tuning=tuning, reference="live", tokens_per_s=tps, steps_per_s=tps / 1000, peak_rss_mb=mb)
        for tool, tuning, tps, mb in (
            ("prefopt", "full", 300.0, 3000.0),
            ("prefopt-compiled", "full", 450.0, 2500.0),
            ("trl", "full", 100.0, 5000.0),
            ("prefopt", "lora", 200.0, 1000.0),
            ("trl", "lora", 400.0, 4000.0),
        )
    ]
    bench.print_table(rows)
    lines = capsys.readouterr().out.splitlines()
    assert "fine-tuning" in lines[0] and "load 1m" in lines[0] and "vocab" not in lines[0]
    cells = {(c[0], c[2]): c for c in ([x.strip() for x in line.strip("|").split("|")] for line in lines[2:])}
    assert cells["full", "prefopt"][10:12] == ["3.00", "0.60"]  # tokens/s and RSS against the full TRL row
    assert cells["full", "prefopt-compiled"][10:12] == ["4.50", "0.50"]
    assert cells["lora", "prefopt"][10:12] == ["0.50", "0.25"]  # against the LoRA row, not the full one
    assert cells["lora", "trl"][10:12] == ["", ""] and cells["full", "trl"][-1] == "1.50"


def test_real_pairs_are_fixed_chat_problems_with_a_correct_and_a_wrong_boxed_answer():
    bench = _bench()
    pairs = bench.real_pairs(24)
    assert pairs == bench.real_pairs(24) and pairs == bench.real_pairs(32)[:24]  # TRL's pairs = prefopt's first ones
    assert len({p.prompt for p in pairs}) == 24
    for p in pairs:
        chosen, rejected = (s.rsplit("\\boxed{", 1)[1].rstrip("}") for s in (p.chosen, p.rejected))
        assert chosen.isdigit() and rejected.isdigit()
        # the chosen answer's last worked step ends in its boxed number; the rejected one shares no long start
        assert chosen in p.chosen.rsplit("\\boxed", 1)[0]
        assert p.chosen[:20] != p.rejected[:20]


def test_real_pairs_fill_the_workload_token_ranges(smollm2_tokenizer):
    bench = _bench()
    _, tokenized, _, rows = bench.real_dataset(16, smollm2_tokenizer)
    for pair, row in zip(tokenized, rows):
        assert 64 <= len(pair.prompt_ids) <= 140 and 64 <= len(pair.chosen_ids) <= 140
        assert 64 <= len(pair.rejected_ids) <= 140
        assert pair.chosen_ids[-1] == smollm2_tokenizer.convert_tokens_to_ids("<|im_end|>")
        # TRL reads the prompt as prefopt renders it: template, default system message, assistant header
        assert smollm2_tokenizer(row["prompt"], add_special_tokens=False)["input_ids"] == list(pair.prompt_ids)
    assert bench.tokens_per_step(tokenized, 8) == pytest.approx(
        8 * sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in tokenized) / 16
    )


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="needs the bench extra (trl)")
def test_a_short_real_model_run_of_both_tools_sees_the_same_tokens(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    args = ["--model", "smollm2", "--steps", "2", "--warmup", "1", "--tuning", "lora", "--reference", "cached"]
    res = subprocess.run(
        [sys.executable, "scripts/speed_vs_trl.py", *args, "--tools", "prefopt,trl", "--json", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [r["tool"] for r in rows] == ["prefopt", "trl"]
    for r in rows:
        assert KEYS | {"tuning", "cpu_s_per_step", "first_step_s", "mfu", "load_1m"} <= set(r)
        assert r["tuning"] == "lora" and r["reference"] == "cached" and r["vocab"] == 49152
        assert r["steps_per_s"] > 0 and r["peak_rss_mb"] > 500 and len(r["step_s"]) == 1
        # both tools train on the same tokens per step, which tokens/s counts
        assert r["tokens_per_step_seen"] == pytest.approx(r["tokens_per_step"])
    assert "tok/s ×TRL" in res.stdout and "fine-tuning" in res.stdout
