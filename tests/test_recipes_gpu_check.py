"""benchmarks/gpu_check.sh --dry: the GPU check's own code path (the recipe's DPO step, four rows) on CPU."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~17 s of CPU, about a minute of wall time on the shared 2-core machine
def test_gpu_check_dry_runs_the_recipe_step_on_cpu(tmp_path):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry", "--json", str(tmp_path / "rows.json")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(r["mode"], r["reference"]) for r in rows] == [("full", "live"), ("full", "cached"), ("lora", "live"),
                                                          ("lora", "cached")]
    assert all(r["steps"] == 2 and r["tokens_per_s"] > 0 and r["peak_memory_mb"] > 0 for r in rows)
    assert all(r["mfu"] is None for r in rows)  # no GPU, no peak to compare against
    assert "tokens/s" in out.stdout and "not run: FSDP" in out.stdout
    assert "vLLM generation: not run (vLLM not installed or no GPU)" in out.stdout
