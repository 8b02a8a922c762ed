"""`python -m prefopt.run experiment=rm_arith` end to end on CPU with an empty cache (slow: run by .ci/run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_rm_arith_end_to_end(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.run",
            "experiment=rm_arith",
            "train.progress=false",
            f"mathloop.cache_dir={tmp_path / 'cache'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    m = summary["metrics"]
    assert 0 <= m["eval/judge/win_rate_low"] <= m["eval/judge/win_rate"] <= m["eval/judge/win_rate_high"] <= 1
    assert 0 <= m["eval/judge/lc_win_rate"] <= 1 and m["eval/judge/prompts"] == 50
    rows = [json.loads(line) for line in (tmp_path / "run" / "judged.jsonl").read_text().splitlines()]
    assert len(rows) == 50 and {"policy_score", "baseline_score", "preference"} <= set(rows[0])
    reward = json.loads(next((tmp_path / "cache" / "reward").glob("*/reward.json")).read_text())
    # agreement with the checker on three held-out sets, each with its interval (the figures themselves move with the
    # machine's arithmetic: docs/studies.md reports them, with what they mean)
    assert reward["agreement"]["pairs"] == 50
    for name in ("agreement", "on_policy_agreement", "fresh_answer_agreement"):
        a = reward[name]
        assert a["pairs"] > 0 and 0 <= a["low"] <= a["agreement"] <= a["high"] <= 1, (name, a)
    assert reward["on_policy_agreement"]["problems"] <= 50
    assert reward["training"] == {"data_pairs": 0, "contrast_pairs": 150 * 6 * 2}  # reward.source=contrasts
    # meaningful, not random: on answers it was not trained on, the whole 95% interval of its agreement with the
    # checker lies well above chance: fresh answers of the training problems, drawn as the labeller draws the answers it
    # ranks (0.765 [0.709, 0.819] on the 2-core machine, 2026-12-01; the lowest low over five reward seeds was 0.673),
    # and the data's held-out pairs (0.78 [0.64, 0.885]; lowest low 0.597). On the policy's samples of unseen problems
    # the estimate is above chance (0.617; lowest over five seeds 0.580), its interval not on every seed
    # (docs/studies.md); the bound is ½ itself, since another CPU's float order trains another model.
    assert reward["measured_on"] == {"k": 8, "temperature": 0.7} and reward["reward"]["ema"] == 0.995
    assert reward["fresh_answer_agreement"]["low"] > 0.6, reward["fresh_answer_agreement"]
    assert reward["agreement"]["low"] > 0.5, reward["agreement"]
    assert reward["on_policy_agreement"]["agreement"] > 0.5, reward["on_policy_agreement"]
    assert reward["exported_weights"] == "moving average, decay 0.995"
    pairs = next((tmp_path / "cache" / "pairs").glob("*.jsonl.provenance.json"))
    record = json.loads(pairs.read_text())
    assert record["labeler"]["labeler"] == "reward_model" and record["k"] == 8 and "checker_agreement" in record
    first = json.loads(pairs.with_name(pairs.name.replace(".provenance.json", "")).read_text().splitlines()[0])
    assert first["chosen_score"] > first["rejected_score"]
