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
