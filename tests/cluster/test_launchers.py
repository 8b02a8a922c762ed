"""SLURM presets for Hydra's submitit launcher, the multi-node sbatch template, a local submitit sweep end to end."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from prefopt.config import conf_dir
from prefopt.errors import ConfigError
from tests.helpers.config import MATHLOOP_OFF, TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
SBATCH = ROOT / "launchers" / "sbatch_torchrun.sh"
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"


def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _fake_bin(tmp_path: Path, name: str, body: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return bin_dir


def test_slurm_preset_composes_with_the_real_config():
    cfg = _hydra_cfg("hydra/launcher=slurm", "hardware=fsdp", "model=qwen_math")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert launcher.max_num_timeout > 0  # timed-out jobs are requeued
    assert launcher.tasks_per_node == launcher.gpus_per_node == 8 and launcher.nodes == 1
    assert launcher.signal_delay_s == 120
    assert launcher.partition is None and launcher.account is None and launcher.qos is None
    assert launcher.submitit_folder.startswith(str(cfg.hydra.sweep.dir))
    setup = "\n".join(launcher.setup)
    assert "export MASTER_ADDR=$(scontrol show hostnames" in setup and "export MASTER_PORT=" in setup
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-Math-7B" and cfg.hardware.strategy == "fsdp"


def test_slurm_overrides_and_the_one_gpu_preset():
    cfg = _hydra_cfg(
        "hydra/launcher=slurm",
        "hydra.launcher.partition=gpu",
        "hydra.launcher.account=proj",
        "hydra.launcher.gpus_per_node=4",
    )
    assert (cfg.hydra.launcher.partition, cfg.hydra.launcher.account) == ("gpu", "proj")
    assert cfg.hydra.launcher.tasks_per_node == 4  # follows gpus_per_node
    one = _hydra_cfg("hydra/launcher=slurm_1gpu").hydra.launcher
    assert one._target_ == SLURM_LAUNCHER and one.gpus_per_node == one.tasks_per_node == 1
    assert one.max_num_timeout > 0


def test_the_cpu_preset_asks_for_no_gpus_and_one_task():
    cpu = _hydra_cfg("hydra/launcher=slurm_cpu", "hydra.launcher.partition=debug").hydra.launcher
    assert cpu._target_ == SLURM_LAUNCHER and cpu.gpus_per_node is None and cpu.tasks_per_node == 1
    assert cpu.max_num_timeout > 0 and cpu.partition == "debug"
    cpu = _hydra_cfg("hydra/launcher=slurm_cpu", "hydra.launcher.gpus_per_node=null").hydra.launcher
    assert OmegaConf.to_container(cpu, resolve=True)["tasks_per_node"] == 1


def test_the_run_stops_on_the_signal_submitit_asks_slurm_for(monkeypatch):
    """submitit writes `--signal=<its USR_SIG>@<signal_delay_s>` into the sbatch script: prefopt listens to that one."""
    from submitit import JobEnvironment

    from prefopt.hardware import stop_signals

    monkeypatch.setattr(JobEnvironment, "USR_SIG", "USR2")  # submitit's default
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR2)
    monkeypatch.setattr(JobEnvironment, "USR_SIG", "USR1")  # what SUBMITIT_PREEMPT_SIGNAL=USR1 sets
    assert stop_signals() == (signal.SIGTERM, signal.SIGUSR1)
    monkeypatch.setattr(JobEnvironment, "USR_SIG", "USR9")
    with pytest.raises(ConfigError, match="SUBMITIT_PREEMPT_SIGNAL='USR9' names no signal"):
        stop_signals()


def test_the_preset_renders_a_valid_sbatch_script(tmp_path, monkeypatch):
    """What submitit would submit for this preset (the plugin's own parameter mapping), checked with `bash -n`."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
    from submitit import JobEnvironment

    fake_srun = _fake_bin(tmp_path, "srun", "exit 0")  # submitit's SLURM executor looks for srun
    monkeypatch.setenv("PATH", f"{fake_srun}:{os.environ['PATH']}")
    cfg = _hydra_cfg("hydra/launcher=slurm", "hydra.launcher.partition=gpu", f"hydra.sweep.dir={tmp_path}/sweep")
    params = dict(instantiate(cfg.hydra.launcher).params)
    executor = submitit.AutoExecutor(
        cluster="slurm", folder=tmp_path / "submitit", slurm_max_num_timeout=params.pop("max_num_timeout")
    )
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    assert executor._executor.max_num_timeout == 3
    script = executor._executor._make_submission_file_text("python -m prefopt.run", "uid")
    for flag in (
        "--nodes=1",
        "--ntasks-per-node=8",
        "--gpus-per-node=8",
        "--cpus-per-task=8",
        "--partition=gpu",
        "--time=1440",
        f"--signal={JobEnvironment.USR_SIG}@120",
    ):
        assert flag in script, flag
    assert script.index("export MASTER_ADDR") < script.index("srun ")  # setup runs before the tasks start
    path = tmp_path / "job.sh"
    path.write_text(script)
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_sbatch_template_is_valid_bash():
    text = SBATCH.read_text()
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    for directive in (
        "--nodes=",
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=",
        "--time=",
        "--requeue",
        "--signal=B:USR1@120",
        "--open-mode=append",
    ):
        assert f"#SBATCH {directive}" in text, directive


@pytest.fixture
def fake_slurm(tmp_path):
    """scontrol and srun stand-ins: srun records its command line and waits; `scontrol requeue` records itself and
    ends srun, as SLURM would."""
    log = tmp_path / "calls.log"
    _fake_bin(
        tmp_path,
        "scontrol",
        f"""
if [ "$1 $2" = "show hostnames" ]; then printf 'gpu-node-07\\ngpu-node-08\\n'; exit 0; fi
echo "scontrol $*" >> {log}
[ "$1" = requeue ] && kill "$(cat {tmp_path}/srun.pid)"
exit 0
""",
    )
    _fake_bin(
        tmp_path,
        "scancel",
        f"""
echo "scancel $*" >> {log}
kill -TERM "$(cat {tmp_path}/srun.pid)"  # the job's steps end after their checkpoint
exit 0
""",
    )
    bin_dir = _fake_bin(
        tmp_path,
        "srun",
        f"""
echo $$ > {tmp_path}/srun.pid
echo "srun $*" >> {log}
exec sleep "${{FAKE_SRUN_SECONDS:-0}}"
""",
    )
    env = dict(
        os.environ,
        PATH=f"{bin_dir}:{os.environ['PATH']}",
        SLURM_JOB_ID="4242",
        SLURM_JOB_NODELIST="gpu-node-[07-08]",
        SLURM_NNODES="2",
    )
    return env, log


def test_sbatch_template_starts_torchrun_per_node_in_a_run_dir_fixed_by_the_job_id(fake_slurm, tmp_path):
    env, log = fake_slurm
    subprocess.run(
        ["bash", str(SBATCH), "model=llama3_8b", "loss=bpo"],
        env=env,
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=30,
    )
    (call,) = [line for line in log.read_text().splitlines() if line.startswith("srun")]
    assert (
        "torchrun --nnodes 2 --nproc_per_node 8 --rdzv_id 4242 --rdzv_backend c10d "
        "--rdzv_endpoint gpu-node-07:24242 -m prefopt.run hardware=fsdp "
        "hydra.run.dir=outputs/slurm/4242 model=llama3_8b loss=bpo"
    ) in call
    subprocess.run(
        ["bash", str(SBATCH), "hardware=ddp", "steps=3"],
        env=dict(env, NPROC_PER_NODE="2"),
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=30,
    )
    call = [line for line in log.read_text().splitlines() if line.startswith("srun")][-1]
    assert (
        "--nproc_per_node 2 " in call and "-m prefopt.run hydra.run.dir=outputs/slurm/4242 hardware=ddp steps=3" in call
    )


def test_sbatch_template_requeues_itself_on_the_time_limit_signal(fake_slurm, tmp_path):
    env, log = fake_slurm
    proc = subprocess.Popen(
        ["bash", str(SBATCH)],
        env=dict(env, FAKE_SRUN_SECONDS="60"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 20
    while not (tmp_path / "srun.pid").exists() and time.time() < deadline:
        time.sleep(0.05)
    time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)  # what `--signal=B:USR1@120` sends 120 s before the limit
    out, _ = proc.communicate(timeout=20)
    calls = log.read_text().splitlines()
    # first the steps are asked to checkpoint and stop, then (once they have) the job is requeued
    assert calls[-2:] == ["scancel --signal=TERM 4242", "scontrol requeue 4242"], (calls, out)
    assert "requeueing job 4242" in out


@pytest.mark.slow  # ~30 s on 2 cores: two Python processes start, import torch and train
def test_submitit_local_sweep_runs_two_points_end_to_end(tmp_path):
    sweep = tmp_path / "sweep"
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline")
    cmd = [
        sys.executable,
        "-m",
        "prefopt.run",
        "-m",
        TINY_MODEL,
        "hydra/launcher=submitit_local",
        "loss=dpo,bpo",
        "steps=2",
        "batch_size=4",
        "micro_batch_size=2",
        "data.source.n_train=16",
        "data.source.n_eval=4",
        "train.progress=false",
        f"hydra.sweep.dir={sweep}",
        *MATHLOOP_OFF,
    ]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summaries = [json.loads((sweep / str(i) / "summary.json").read_text()) for i in (0, 1)]
    assert [s["status"] for s in summaries] == ["complete", "complete"]
    assert sorted(s["loss"] for s in summaries) == ["bpo", "dpo"]
    assert all(s["step"] == 2 for s in summaries)
    assert (sweep / ".submitit").is_dir()  # it went through submitit, not Hydra's basic launcher


@pytest.mark.slow  # ~45 s on 2 cores: a one-point sweep, then the same task again
def test_a_requeued_task_reruns_in_its_run_directory_and_resumes(tmp_path, monkeypatch):
    """What submitit does on a timeout (max_num_timeout > 0): it resubmits the pickled launcher call of that sweep
    point. The rerun lands in the same, timestamped run directory (Hydra copies the resolver cache of the sweep's
    config, so `${now:}` does not move), `resume: auto` continues from the newest complete checkpoint there, and the
    W&B run id in <run_dir>/wandb_id is reused."""
    import pickle
    import shutil

    import submitit

    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true")
    cmd = [
        sys.executable,
        "-m",
        "prefopt.run",
        "-m",
        TINY_MODEL,
        "hydra/launcher=submitit_local",
        "loss=dpo",
        "steps=2",
        "batch_size=4",
        "micro_batch_size=2",
        "data.source.n_train=16",
        "data.source.n_eval=4",
        "save_every=1",
        "train.progress=false",
        "logger=wandb",
        *MATHLOOP_OFF,
    ]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multirun").glob("*/*")  # the default, timestamped sweep directory
    run = sweep / "0"
    wandb_id = (run / "wandb_id").read_text()
    # The job "timed out" after step 1: its last checkpoint and summary never got written.
    shutil.rmtree(run / "checkpoints" / "step_00000002")
    (run / "summary.json").unlink()
    (submitted,) = sweep.glob(".submitit/*/*_submitted.pkl")
    delayed = pickle.loads(submitted.read_bytes())
    time.sleep(1.1)  # a later second: a re-evaluated ${now:%H-%M-%S} would name another directory
    for key in ("HF_HUB_OFFLINE", "WANDB_MODE", "WANDB_SILENT"):
        monkeypatch.setenv(key, env[key])
    monkeypatch.chdir(tmp_path)  # SLURM restarts a job in its submission directory; relative paths hang off it
    job = submitit.LocalExecutor(folder=sweep / ".submitit" / "%j").submit(delayed.function, *delayed.args)
    ret = job.result()
    assert Path(ret.hydra_cfg.hydra.runtime.output_dir) == run.resolve()
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["status"], summary["step"], summary["resumed_from_step"]) == ("complete", 2, 1)
    assert (run / "wandb_id").read_text() == wandb_id
