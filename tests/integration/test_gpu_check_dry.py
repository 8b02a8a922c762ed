"""scripts/gpu_check.sh --dry: the GPU check's own code path on CPU: the recipe's DPO step (four rows), the same
step with hardware=fsdp under torchrun --nproc_per_node 1 (gloo), and TRL's DPOTrainer (full and LoRA)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow  # ~50 s of CPU, 70-80 s of wall time on the shared 2-core machine (7 rows of 1 step of 1 pair)
def test_gpu_check_dry_runs_the_recipe_step_on_cpu(tmp_path):
    out = subprocess.run(
        ["bash", str(REPO / "scripts" / "gpu_check.sh"), "--dry", "--json", str(tmp_path / "rows.json")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    merged = [r for r in rows if r["mode"] == "lora merged"]  # the LoRA row's adapters merged, generated from
    assert len(merged) == 1 and merged[0]["engine"] == "hf" and merged[0]["same_greedy_answers"] == 1.0
    rows = [r for r in rows if "reference" in r]
    assert [(r["tool"], r["mode"], r["reference"], r["strategy"]) for r in rows] == [
        ("prefopt", "full", "live", "none"),
        ("prefopt", "full", "cached", "none"),
        ("prefopt", "lora", "live", "none"),
        ("prefopt", "lora", "cached", "none"),
        ("prefopt", "full", "live", "fsdp"),
        ("trl", "full", "live", "none"),
        ("trl", "lora", "live", "none"),
    ]
    assert all(r["steps"] == 1 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert all(r["mfu"] is None for r in rows)  # no GPU, no peak to compare against
    assert rows[4]["fsdp_wrapped"]  # hardware=fsdp on one process really wraps the policy with fully_shard
    assert (
        "tokens/s" in out.stdout and "not run: FSDP" not in out.stdout and "TRL DPOTrainer: not run" not in out.stdout
    )
    assert "vLLM generation: not run (vLLM not installed or no GPU)" in out.stdout
