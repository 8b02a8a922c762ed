"""torchrun with 2 CPU processes (gloo): DDP and FSDP2 follow the single-process trajectory; one process writes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.helpers.config import MATHLOOP_OFF, tiny_model

COMMON = [
    "steps=5",
    "batch_size=8",
    "micro_batch_size=2",
    "eval_every=2",
    "data.source.n_train=40",
    "data.source.n_eval=8",
    "train.progress=false",
    "optimizer.warmup_steps=1",
    "save_every=5",
    *MATHLOOP_OFF,
]


def launch(tmp_path, name, nproc, *overrides):
    run_dir = tmp_path / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    prefix = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--standalone",
            "-m",
            "prefopt.run",
        ]
        if nproc > 1
        else [sys.executable, "-m", "prefopt.run"]
    )
    out = subprocess.run(
        prefix + tiny_model(COMMON + list(overrides)) + [f"hydra.run.dir={run_dir}"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def trajectory(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/grad_norm", "eval/loss")
    return [(r["step"], {k: r[k] for k in keys if k in r}) for r in rows]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return launch(tmp_path_factory.mktemp("single"), "single", 1, "hardware=cpu", "hardware.threads=1")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(single, tmp_path, strategy):
    extra = ["hardware.mixed_precision=null"] if strategy == "fsdp" else []
    run_dir = launch(tmp_path, strategy, 2, f"hardware={strategy}", *extra)
    ours, ref = trajectory(run_dir), trajectory(single)
    assert [s for s, _ in ours] == [s for s, _ in ref] and len([1 for _, m in ref if "train/loss" in m]) == 5
    for (step, a), (_, b) in zip(ours, ref):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (strategy, step, k)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["strategy"] == strategy
    # one writer: the same files as the single-process run, one line per step, one checkpoint, one log
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(p.name for p in single.iterdir())
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step_00000005"]
    assert (run_dir / "final" / "model.safetensors").is_file()
