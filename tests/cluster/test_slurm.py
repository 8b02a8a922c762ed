"""Against a real single-node SLURM cluster (tests/helpers/slurm_cluster.py): a job-array sweep, a run longer than its
time
limit, a preempted run, and the multi-node torchrun template with 2 processes. `python -m pytest -m slurm`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers.config import MATHLOOP_OFF, TINY_MODEL, tiny_model
from tests.integration.test_faults import strip

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launchers" / "sbatch_torchrun.sh"
# one CPU, one thread per job: two jobs share this 2-core node, and results do not depend on the thread count
LAUNCH = [
    "hydra/launcher=slurm_cpu",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=1",
]
SMALL = [
    "batch_size=4",
    "micro_batch_size=4",
    "eval_every=500",
    "data.source.n_train=64",
    "data.source.n_eval=8",
    "train.progress=false",
    "lr=1e-3",
    *MATHLOOP_OFF,
    TINY_MODEL,  # also for sbatch launchers/sbatch_torchrun.sh, which passes its arguments on as they are
]


def job_env(cluster) -> dict:
    """What a job needs: this checkout on PYTHONPATH, this venv on PATH, the cluster's SLURM_CONF, offline W&B."""
    return {
        **cluster.env,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "HF_HUB_OFFLINE": "1",
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "OMP_NUM_THREADS": "1",
    }


def spawn(cmd: list[str], env: dict, cwd: Path, log: Path) -> subprocess.Popen:
    """A process whose output goes to `log` (a pipe would fill up during a sweep's minutes of polling)."""
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def local_run(cluster, run_dir: Path, *overrides: str) -> subprocess.Popen:
    """The uninterrupted reference, as a plain process (it runs while the SLURM job does)."""
    return spawn(
        [sys.executable, "-m", "prefopt.run", *tiny_model(overrides), "hardware.threads=1", f"hydra.run.dir={run_dir}"],
        job_env(cluster),
        run_dir.parent,
        run_dir.parent / f"{run_dir.name}.out",
    )


def finish(proc: subprocess.Popen, cluster, timeout: float, during=None) -> str:
    """Wait for a process, starting requeued jobs at once and calling `during()` every second; its output."""
    deadline = time.time() + timeout
    while proc.poll() is None:
        if time.time() > deadline:
            proc.kill()
            pytest.fail(f"not done after {timeout:.0f} s; queue: {cluster.jobs()}")
        cluster.release_requeued()
        if during is not None:
            during()
        time.sleep(1)
    out = proc.log.read_text(errors="replace") if hasattr(proc, "log") else ""
    assert proc.returncode == 0, out[-4000:]
    return out


def sweep(cluster, sweep_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "prefopt.run", "-m", *LAUNCH, *tiny_model(overrides), f"hydra.sweep.dir={sweep_dir}"]
    return spawn(cmd, job_env(cluster), sweep_dir.parent, sweep_dir.parent / f"{sweep_dir.name}.out")


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def assert_same_as(run_dir: Path, reference: Path, tol: float = 1e-6, keys=None) -> None:
    """metrics.jsonl and summary.json equal the reference's (timings aside); no step is missing or logged twice."""
    rows, ref = metrics(run_dir), metrics(reference)
    assert [r["step"] for r in rows] == [r["step"] for r in ref]
    trained = [r["step"] for r in rows if "train/loss" in r]  # (the final evaluation has a line of its own)
    assert trained == list(range(1, len(trained) + 1))  # every step once: none lost, none logged twice
    for a, b in zip(rows, ref):
        a, b = strip(a), strip(b)
        if keys:
            a, b = ({k: v for k, v in row.items() if k in keys} for row in (a, b))
        assert a.keys() == b.keys(), a.get("step")
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=tol, rel=tol), (a.get("step"), k)
    final, base = (strip(json.loads((d / "summary.json").read_text())["metrics"]) for d in (run_dir, reference))
    assert final.keys() == base.keys()
    for k in keys or final:
        assert final.get(k) == pytest.approx(base.get(k), abs=tol, rel=tol), k


def segments(sweep_dir: Path) -> list[str]:
    """One line per start of the job (submitit logs each), over all its segments."""
    (log,) = sweep_dir.glob(".submitit/*/*_0_log.out")
    return [
        line for line in log.read_text().splitlines() if line.startswith("submitit INFO") and "Starting with" in line
    ]


def one_wandb_id(run_dir: Path) -> str:
    run_id = (run_dir / "wandb_id").read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline and {p.name.rsplit("-", 1)[1] for p in offline} == {run_id}
    return run_id


def test_a_two_point_sweep_runs_as_a_job_array_on_a_cpu_partition(slurm_cluster, tmp_path):
    sweep_dir = tmp_path / "sweep"
    out = finish(sweep(slurm_cluster, sweep_dir, "loss=dpo,bpo", "steps=3", *SMALL), slurm_cluster, 300)
    summaries = [json.loads((sweep_dir / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [(s["status"], s["loss"], s["step"]) for s in summaries] == [("complete", "dpo", 3), ("complete", "bpo", 3)]
    logs = sorted(sweep_dir.glob(".submitit/*/*_log.out"))
    assert len(logs) == 2 and all("Starting with JobEnvironment(job_id=" in p.read_text() for p in logs)
    assert {p.name.split("_")[1] for p in logs} == {"0", "1"}  # one array, tasks 0 and 1
    assert (sweep_dir / "report.md").is_file() and "2 runs" in out


@pytest.fixture(scope="module")
def steps_per_s(slurm_cluster, tmp_path_factory) -> float:
    """This machine's training speed now (the loop only, one thread), measured on a short run of the same set-up."""
    run_dir = tmp_path_factory.mktemp("calibrate") / "run"
    proc = local_run(slurm_cluster, run_dir, "steps=150", "logger=wandb", *SMALL)
    finish(proc, slurm_cluster, 180)
    return 150 / json.loads((run_dir / "summary.json").read_text())["wall_time_s"]


def test_a_run_longer_than_its_time_limit_is_requeued_and_ends_as_if_uninterrupted(
    slurm_cluster, tmp_path, steps_per_s
):
    """timeout_min=1: SLURM sends submitit's USR2 signal_delay_s before the limit (up to 30 s earlier: it checks
    every 30 s); every rank checkpoints at the end of its step, submitit requeues, the job resumes. About 60 s of
    training (at the speed measured just before) cannot fit in one segment: the signal comes by 55 s."""
    steps = min(max(int(60 * steps_per_s), 300), 5000)
    run = [f"steps={steps}", "logger=wandb", *SMALL]
    (tmp_path / "ref").mkdir()
    reference = local_run(slurm_cluster, tmp_path / "ref" / "run", *run)
    sweep_dir = tmp_path / "sweep"
    proc = sweep(
        slurm_cluster,
        sweep_dir,
        "hydra.launcher.timeout_min=1",
        "hydra.launcher.signal_delay_s=5",
        "hydra.launcher.max_num_timeout=6",
        *run,
    )
    finish(proc, slurm_cluster, 540)
    finish(reference, slurm_cluster, 120)
    run_dir = sweep_dir / "0"
    starts = segments(sweep_dir)
    log = (run_dir / "run.log").read_text()
    assert len(starts) >= 2 and log.count("SIGUSR2 received: checkpoint of step") >= 1, log[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["resumed_from_step"] is not None
    assert_same_as(run_dir, tmp_path / "ref" / "run")
    one_wandb_id(run_dir)


def test_a_preempted_run_resumes_after_scontrol_requeue_and_scancel_usr2(slurm_cluster, tmp_path):
    """`scontrol requeue` (what preemption does: SIGTERM, then the job goes back to the queue) and then
    `scancel --signal=USR2` (the time-limit signal sent by hand): the run ends as if nothing had happened."""
    run = ["steps=400", "logger=wandb", *SMALL]
    (tmp_path / "ref").mkdir()
    reference = local_run(slurm_cluster, tmp_path / "ref" / "run", *run)
    sweep_dir, run_dir = tmp_path / "sweep", tmp_path / "sweep" / "0"
    actions = [["scontrol", "requeue"], ["scancel", "--signal=USR2"]]
    done: list[tuple[str, int]] = []

    def interrupt():  # once the segment has logged 50 steps past where it started
        rows = metrics(run_dir)
        running = [job for job, state, _ in slurm_cluster.jobs() if state == "RUNNING"]
        start = done[-1][1] if done else 0
        if actions and running and rows and rows[-1]["step"] > start + 40 and rows[-1]["step"] < 320:
            slurm_cluster.run(*actions[0], running[0])
            done.append((actions.pop(0)[0], rows[-1]["step"]))

    finish(sweep(slurm_cluster, sweep_dir, "hydra.launcher.timeout_min=10", *run), slurm_cluster, 420, interrupt)
    finish(reference, slurm_cluster, 120)
    assert [a for a, _ in done] == ["scontrol", "scancel"], done
    log = (run_dir / "run.log").read_text()
    assert "SIGTERM received: checkpoint of step" in log and "SIGUSR2 received: checkpoint of step" in log, log[-3000:]
    assert len(segments(sweep_dir)) == 3
    assert_same_as(run_dir, tmp_path / "ref" / "run")
    one_wandb_id(run_dir)


def test_the_torchrun_template_with_two_processes_matches_one_process_and_requeues(slurm_cluster, tmp_path):
    """`sbatch launchers/sbatch_torchrun.sh` on the CPU node: 2 gloo processes (DDP); USR1 to the batch shell (what
    `--signal=B:USR1@120` sends) makes both ranks checkpoint, the shell requeues the job, it resumes."""
    run = ["steps=300", "batch_size=8", "micro_batch_size=4", *SMALL[2:]]
    (tmp_path / "ref").mkdir()
    reference = local_run(slurm_cluster, tmp_path / "ref" / "run", "hardware=cpu", *run)
    # the job gets the submitter's environment (sbatch's default --export=ALL): NPROC_PER_NODE, PATH, PYTHONPATH
    submit = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--nodes=1",
            "--gpus-per-node=0",
            "--cpus-per-task=2",
            "--time=10",
            f"--chdir={tmp_path}",
            str(SBATCH),
            "hardware=ddp",
            *run,
        ],
        env=dict(job_env(slurm_cluster), NPROC_PER_NODE="2"),
        capture_output=True,
        text=True,
    )
    assert submit.returncode == 0, submit.stderr
    job = submit.stdout.strip().split(";")[0]
    run_dir = tmp_path / "outputs" / "slurm" / job
    signalled = []

    def usr1():
        rows = metrics(run_dir)
        if not signalled and rows and 30 < rows[-1]["step"] < 250:
            slurm_cluster.run("scancel", "--batch", "--signal=USR1", job)
            signalled.append(rows[-1]["step"])

    # Until the job has left the queue for good: a squeue that failed (slurmctld busy under load: a timeout, empty
    # stdout) says nothing, so only an answered empty queue or a purged job id ends the wait.
    waiter = spawn(
        [
            sys.executable,
            "-c",
            f"""
import subprocess, time
while True:
    q = subprocess.run(["squeue", "-h", "-j", "{job}"], capture_output=True, text=True)
    if (q.returncode == 0 and not q.stdout.strip()) or "Invalid job id" in q.stderr:
        break
    time.sleep(1)
""",
        ],
        slurm_cluster.env,
        tmp_path,
        tmp_path / "waiter.out",
    )
    finish(waiter, slurm_cluster, 420, usr1)
    finish(reference, slurm_cluster, 120)
    out = (tmp_path / f"slurm-{job}.out").read_text()
    assert signalled and f"requeueing job {job}" in out and "(restart 1)" in out, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["status"], summary["world_size"], summary["strategy"]) == ("complete", 2, "ddp")
    assert summary["resumed_from_step"] is not None
    assert_same_as(
        run_dir,
        tmp_path / "ref" / "run",
        tol=1e-5,
        keys=("train/loss", "train/rewards/chosen", "train/rewards/rejected", "train/grad_norm", "eval/loss"),
    )
