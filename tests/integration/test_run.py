"""The real entry point end to end on the tiny model: files, determinism, reference handling, errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prefopt.errors import ConfigError, DataError, TrainingError
from tests.helpers.config import MATHLOOP_OFF, tiny_model

REPO = Path(__file__).resolve().parents[2]


def cli(*args, cwd, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    return subprocess.run(
        [sys.executable, "-m", "prefopt.run", *tiny_model(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_run_writes_config_metrics_summary_and_checkpoint(tiny_run):
    summary, run_dir = tiny_run()
    for name in ("resolved_config.yaml", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "final" / "model.safetensors").is_file()
    assert (run_dir / "final" / "tokenizer_config.json").is_file()
    assert (run_dir / "checkpoints" / "step_00000003" / "COMPLETE").is_file()
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3]
    expected = {
        "train/loss",
        "train/rewards/chosen",
        "train/rewards/rejected",
        "train/rewards/margins",
        "train/rewards/accuracies",
        "train/logps/chosen",
        "train/logps/rejected",
        "train/dcr/chosen_reward_below_zero",
        "train/dcr/chosen_logp_delta_per_token",
        "train/dcr/rejected_logp_delta_per_token",
        "train/grad_norm",
        "train/lr",
        "train/tokens_per_s",
    }
    assert expected <= set(train_rows[0])
    assert any("eval/loss" in r for r in rows) and any("eval/rewards/accuracies" in r for r in rows)
    # step 1: policy == reference, so DPO's loss is ln 2 and both rewards are 0
    assert train_rows[0]["train/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert train_rows[0]["train/rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    on_disk = json.loads((run_dir / "summary.json").read_text())
    assert on_disk["status"] == "complete" and on_disk["step"] == 3
    assert on_disk["wall_time_s"] > 0 and on_disk["peak_memory_mb"] > 0
    assert on_disk["metrics"]["train/loss"] == pytest.approx(train_rows[-1]["train/loss"])
    assert summary["metrics"]["eval/loss"] == on_disk["metrics"]["eval/loss"]


def test_two_identical_runs_give_identical_metrics(tiny_run, tmp_path):
    _, a = tiny_run("seed=7", run_dir=tmp_path / "a")
    _, b = tiny_run("seed=7", run_dir=tmp_path / "b")

    def strip(rows):
        return [{k: v for k, v in r.items() if "time" not in k and "per_s" not in k} for r in rows]

    assert strip(read_metrics(a)) == strip(read_metrics(b))
    _, c = tiny_run("seed=8", run_dir=tmp_path / "c")
    assert strip(read_metrics(a)) != strip(read_metrics(c))


def test_top_level_beta_reaches_every_loss(tiny_run, tmp_path):
    summary, _ = tiny_run("loss=bpo", "beta=0.05", "steps=1", run_dir=tmp_path / "bpo")
    assert summary["hparams"]["beta"] == 0.05 and summary["loss"] == "bpo"
    summary, _ = tiny_run("loss=simpo", "steps=1", run_dir=tmp_path / "simpo")
    assert summary["hparams"]["beta"] == 2.0  # the loss's own default when no beta is set


def test_reference_free_loss_loads_and_runs_no_reference(tiny_run, monkeypatch, tmp_path):
    import prefopt.logprobs
    import prefopt.models
    import prefopt.training

    loads, frozen, calls = [], [], []
    real_load, real_freeze, real_pair = prefopt.models.load_model, prefopt.models.freeze, prefopt.logprobs.pair_logps
    monkeypatch.setattr(prefopt.training, "load_model", lambda *a, **k: loads.append(1) or real_load(*a, **k))
    monkeypatch.setattr(prefopt.training, "freeze", lambda m: frozen.append(1) or real_freeze(m))
    monkeypatch.setattr(
        prefopt.logprobs,
        "pair_logps",
        lambda m, *a, **k: calls.append(next(m.parameters()).requires_grad) or real_pair(m, *a, **k),
    )
    tiny_run("loss=simpo", "steps=2", "eval_every=0", run_dir=tmp_path / "simpo")
    assert loads == [1] and frozen == []
    assert calls and all(calls)  # every forward was the trainable policy: no reference forward at all
    calls.clear()
    tiny_run("loss=dpo", "steps=2", "eval_every=0", run_dir=tmp_path / "dpo")
    assert frozen == [1] and calls.count(False) == calls.count(True) > 0  # one reference forward per policy forward


def test_logger_wandb_offline_writes_a_local_run(tiny_run):
    _, run_dir = tiny_run("logger=wandb", "steps=2")
    assert (run_dir / "wandb_id").is_file()
    assert list((run_dir / "wandb").glob("offline-run-*")), "W&B offline run directory missing"


@pytest.mark.parametrize(
    "override,message",
    [
        ("beta=-0.1", r"beta=-0.1: must be a number > 0"),
        ("batch_size=5", "divisible by micro_batch_size"),
        ("loss=bpo loss.alpha=1.5", "alpha"),
    ],
)
def test_bad_config_values_stop_with_a_message_naming_the_key(tiny_run, override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_run(*override.split())


def test_data_row_missing_a_field_names_file_row_and_field(tiny_run, tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"q{i}", "chosen": f"a{i}", "rejected": f"b{i}"} for i in range(80)]
    del rows[41]["rejected"]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"pairs\.jsonl: row 42: missing field 'rejected'"):
        tiny_run("data=jsonl", f"data.source.path={path}")


def test_empty_data_set_stops(tiny_run, tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("")
    with pytest.raises(DataError, match="no usable preference pairs"):
        tiny_run("data=jsonl", f"data.source.path={path}")


def test_nan_loss_stops_naming_step_and_pairs_and_keeps_the_checkpoint(tiny_run, monkeypatch, tmp_path):
    import prefopt.logprobs

    real = prefopt.logprobs.pair_logps
    calls = {"n": 0}

    def poisoned(model, batch, *a, **k):
        out = real(model, batch, *a, **k)
        calls["n"] += 1
        if model.training and calls["n"] > 8:  # policy forwards of step 3 and later
            out.chosen = out.chosen * float("nan")
        return out

    monkeypatch.setattr(prefopt.logprobs, "pair_logps", poisoned)
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3 for pairs \['arith-train-\d+'"):
        tiny_run("steps=4", "save_every=2", "eval_every=0", run_dir=tmp_path / "nan")
    assert (tmp_path / "nan" / "checkpoints" / "step_00000002" / "COMPLETE").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "nan")] == [1, 2]


def test_resuming_a_run_directory_with_another_config_is_refused(tiny_run, tmp_path):
    tiny_run("steps=2", "save_every=2", run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"different config \(beta: None -> 0.2, loss.beta: 0.1 -> 0.2"):
        tiny_run("steps=4", "beta=0.2", run_dir=tmp_path / "a")


def test_resume_after_a_stop_continues_to_the_same_result(tiny_run, tmp_path):
    full, _ = tiny_run("steps=4", "save_every=2", run_dir=tmp_path / "full")
    tiny_run("steps=2", "save_every=2", run_dir=tmp_path / "cut")  # as if stopped after step 2's checkpoint
    resumed, _ = tiny_run("steps=4", "save_every=2", run_dir=tmp_path / "cut")
    assert resumed["resumed_from_step"] == 2
    for key in ("train/loss", "eval/loss", "train/rewards/margins"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], abs=1e-6), key
    assert [r["step"] for r in read_metrics(tmp_path / "cut") if "train/loss" in r] == [1, 2, 3, 4]


# -- the command line, as a user types it -------------------------------------------------------------


def test_cli_default_like_run_and_cfg_job(tmp_path):
    out = cli("--cfg", "job", "loss=bpo", "model=qwen_math", "beta=0.1", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Qwen/Qwen2.5-Math-7B" in out.stdout and "bfloat16" in out.stdout and "form: hinge" in out.stdout
    assert "beta: 0.1" in out.stdout


def test_cli_unknown_option_lists_valid_ones(tmp_path):
    out = cli("loss=nope", cwd=tmp_path)
    assert out.returncode != 0
    assert "Could not find 'loss/nope'" in out.stderr and "dpo" in out.stderr and "bpo" in out.stderr


def test_cli_real_model_without_hub_fails_fast_with_one_clear_line(tmp_path):
    t0 = time.perf_counter()
    out = cli("loss=bpo", "model=qwen_math", "beta=0.1", cwd=tmp_path, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert out.returncode == 2
    line = [ln for ln in out.stderr.splitlines() if ln.startswith("prefopt: error:")]
    assert len(line) == 1 and "Traceback" not in out.stderr
    # the recipe's run is refused with every problem at once, one line each (prefopt.compose)
    model = [ln for ln in out.stderr.splitlines() if "Qwen/Qwen2.5-Math-7B" in ln and "model.name_or_path=" in ln]
    assert len(model) == 1 and "pairs.path is required" in out.stderr


def test_cli_multirun_makes_one_directory_per_run(tmp_path):
    out = cli(
        "-m",
        "loss=dpo,bpo",
        "beta=0.05,0.1",
        "steps=2",
        "batch_size=4",
        "micro_batch_size=4",
        "data.source.n_train=16",
        "data.source.n_eval=4",
        "train.progress=false",
        *MATHLOOP_OFF,
        f"hydra.sweep.dir={tmp_path}/sweep",
        cwd=tmp_path,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    runs = sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and (p / "summary.json").exists())
    assert len(runs) == 4
    seen = {
        (
            json.loads((r / "summary.json").read_text())["loss"],
            json.loads((r / "summary.json").read_text())["hparams"]["beta"],
        )
        for r in runs
    }
    assert seen == {("dpo", 0.05), ("dpo", 0.1), ("bpo", 0.05), ("bpo", 0.1)}
