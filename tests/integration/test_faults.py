"""Kill a run at any point and rerun the same command: the same result as if nothing had happened."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from prefopt.checkpoint import list_checkpoints
from tests.helpers.config import MATHLOOP_OFF, TINY_MODEL
from tests.helpers.small_fs import tmpfs

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
ARGS = [
    TINY_MODEL,
    "steps=8",
    "save_every=3",
    "eval_every=2",
    "batch_size=4",
    "micro_batch_size=2",
    "data.source.n_train=24",
    "data.source.n_eval=4",
    "train.progress=false",
    "lr=1e-3",
    *MATHLOOP_OFF,
]
TIMING = ("time", "per_s", "wall", "peak_memory")


def run(run_dir, fault=None, *extra, env=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, str(HELPERS / "fault_runner.py"), fault] if fault else [sys.executable, "-m", "prefopt.run"]
    return subprocess.run(
        cmd + ARGS + list(extra) + [f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=run_dir.parent,
    )


def strip(row: dict) -> dict:
    return {k: v for k, v in row.items() if not any(t in k for t in TIMING)}


def outcome(run_dir):
    rows = [strip(json.loads(x)) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((run_dir / "summary.json").read_text())
    return rows, strip(summary["metrics"]), summary


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("faults") / "baseline"
    out = run(run_dir)
    assert out.returncode == 0, out.stderr[-2000:]
    return outcome(run_dir)


def assert_same(run_dir, baseline):
    rows, final, summary = outcome(run_dir)
    base_rows, base_final, _ = baseline
    assert [r["step"] for r in rows] == [r["step"] for r in base_rows]  # no step lost, none logged twice
    for a, b in zip(rows, base_rows):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k)
    assert final.keys() == base_final.keys()
    for k in final:
        assert final[k] == pytest.approx(base_final[k], abs=1e-6), k
    return summary


KILLS = [  # (fault, exit code of the faulted run, step resumed from)
    pytest.param("mid_step:2", -9, None, id="before-first-checkpoint", marks=pytest.mark.slow),
    pytest.param("mid_step:5", -9, 3, id="mid-step"),
    pytest.param("mid_save:2", -9, 3, id="mid-save"),  # the step-6 save dies half-written: step 3 is used
    pytest.param("sigterm:5", 128 + 15, 5, id="sigterm-checkpoints-and-exits", marks=pytest.mark.slow),
    pytest.param("after_final:1", -9, 8, id="after-final-checkpoint", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("fault,code,resumed_from", KILLS)
def test_killed_run_resumes_to_the_uninterrupted_result(baseline, tmp_path, fault, code, resumed_from):
    run_dir = tmp_path / "run"
    out = run(run_dir, fault)
    assert out.returncode == code, out.stderr[-2000:]
    assert not (run_dir / "summary.json").exists()
    again = run(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    summary = assert_same(run_dir, baseline)
    assert summary["resumed_from_step"] == resumed_from
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # a half-written save was redone and renamed


def test_corrupt_newest_checkpoint_falls_back_to_the_previous(baseline, tmp_path):
    run_dir = tmp_path / "run"
    out = run(run_dir, "mid_step:7")  # checkpoints at steps 3 and 6, killed in step 7
    assert out.returncode == -9
    newest = run_dir / "checkpoints" / "step_00000006"
    (newest / "model.safetensors").write_bytes(b"\0" * 64)  # a torn write / bad disk
    again = run(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    logs = again.stdout + again.stderr
    assert "step_00000006 is unreadable" in logs and "trying the previous one" in logs
    summary = assert_same(run_dir, baseline)
    assert summary["resumed_from_step"] == 3


def test_a_half_written_checkpoint_is_never_taken_for_a_complete_one(tmp_path):
    run_dir = tmp_path / "run"
    assert run(run_dir, "mid_save:1").returncode == -9  # the very first save (step 3) dies
    ckpts = run_dir / "checkpoints"
    assert not list(ckpts.glob("step_*")) and list(ckpts.glob(".tmp-step_00000003"))
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 3
    shutil.rmtree(run_dir)


def one_error_line(out) -> str:
    """The run stopped with exit code 2 and one `prefopt: error:` line, no traceback, no torch internals."""
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.startswith("prefopt: error:")]
    assert len(lines) == 1, out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "inline_container" not in out.stderr + out.stdout
    return lines[0]


def test_a_full_disk_at_a_checkpoint_stops_with_one_line_and_resumes(baseline, tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    line = one_error_line(run(run_dir, "enospc_save:2"))  # the step-6 save: its trainer state hits ENOSPC
    assert line == (
        f"prefopt: error: cannot write checkpoint {ckpts / 'step_00000006'}: No space left on device "
        f"[ENOSPC]; the last complete checkpoint is {ckpts / 'step_00000003'}; rerun the same command "
        f"to resume from it"
    )
    assert list_checkpoints(ckpts) == [ckpts / "step_00000003"] and not list(ckpts.glob(".tmp-*"))
    steps = [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 6  # what was logged before the failure is kept
    again = run(run_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert assert_same(run_dir, baseline)["resumed_from_step"] == 3


def test_a_really_full_disk_then_space_freed_resumes_to_the_same_result(baseline, tmp_path):
    with tmpfs(tmp_path / "fs", size="16m") as fs:
        run_dir, filler = fs / "run", fs / "filler"
        ckpts = run_dir / "checkpoints"
        # After the step-3 checkpoint a filler takes all but 64 KiB: steps 4-6 still log, the step-6 save fails.
        line = one_error_line(run(run_dir, "fill_disk:1", env={"PREFOPT_FILL": str(filler)}))
        assert line.startswith(
            f"prefopt: error: cannot write checkpoint {ckpts / 'step_00000006'}: No space left on device [ENOSPC]"
        )
        assert line.endswith(
            f"the last complete checkpoint is {ckpts / 'step_00000003'}; rerun the same command to resume from it"
        )
        assert not list(ckpts.glob(".tmp-*"))  # the partial checkpoint gave its space back
        filler.unlink()  # the user frees space
        again = run(run_dir)
        assert again.returncode == 0, again.stderr[-2000:]
        assert assert_same(run_dir, baseline)["resumed_from_step"] == 3
        shutil.rmtree(run_dir)


@pytest.mark.slow
def test_leftovers_of_a_killed_save_are_removed_at_the_next_start(tmp_path):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert run(run_dir, "mid_save:2").returncode == -9  # the step-6 save dies half-written
    assert list(ckpts.glob(".tmp-step_00000006"))
    assert run(run_dir, "mid_step:5").returncode == -9  # the rerun dies in step 5, before any save of its own
    assert not list(ckpts.glob(".tmp-*"))  # so the start removed it
    assert list_checkpoints(ckpts) == [ckpts / "step_00000003"]
