"""Every bad config value gets one line naming the key, the value and what it must be, before any model loads."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import prefopt.models
from prefopt.compose import collect, unknown_additions
from prefopt.errors import ConfigError
from prefopt.losses import get_loss
from tests.helpers.config import compose_cfg, tiny_model

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    "override,message",
    [
        ("beta=abc", "beta='abc': must be a number > 0, or null"),
        ("beta=-1", "beta=-1: must be a number > 0, or null"),
        ("lr=1e-6x", "lr='1e-6x': must be a number > 0"),
        ("lr=0", "lr=0: must be a number > 0"),
        ("steps=2.5", "steps=2.5: must be an integer >= 1"),
        ("batch_size=true", "batch_size=True: must be an integer >= 1"),
        ("seed=one", "seed='one': must be an integer"),
        ("save_every=-1", "save_every=-1: must be an integer >= 0"),
        ("loss=bpo loss.alpha=abc", "loss.alpha='abc': must be a number (loss 'bpo')"),
        ("loss=bpo loss.form=3", "loss.form=3: must be a string (loss 'bpo')"),
        ("loss=ipo loss.length_normalize=maybe", "loss.length_normalize='maybe': must be true or false (loss 'ipo')"),
        (
            "reference_sync.every=2 reference_cache=auto",
            "reference_sync.every=2 cannot be combined with reference_cache",
        ),
        ("reference_sync.every=2 model.lora.r=4", "reference_sync.every=2 is not supported with LoRA"),
        ("data.truncation=middle", "data.truncation='middle': must be one of keep_end, keep_start, drop"),
        ("data.source.miscopied=1.5", "data.source.miscopied must be a share between 0 and 1, got 1.5"),
    ],
)
def test_a_bad_value_is_named_before_any_model_loads(override, message, monkeypatch):
    monkeypatch.setattr(prefopt.models, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    _, found = collect(compose_cfg(override.split()))
    assert len(found) == 1 and message in found[0]


def test_every_problem_is_listed_once():
    _, found = collect(compose_cfg(["beta=abc", "lr=1e-6x"]), overrides=["+los=ipo", "beta=abc", "lr=1e-6x"])
    assert found == [
        "+los=ipo: no part of prefopt reads 'los'; did you mean loss?",
        "beta='abc': must be a number > 0, or null",
        "lr='1e-6x': must be a number > 0",
    ]


@pytest.mark.parametrize(
    "override,ok",
    [
        ("+los=ipo", False),
        ("+stpes=3", False),
        ("+evaluation.paths.math500=/data/m.jsonl", True),
        ("++beta=0.2", True),
        ("+experiment=dcr_arith", True),
        ("+hydra.job.env_set.X=1", True),
        ("beta=0.2", True),
    ],
)
def test_an_added_key_nothing_reads_is_refused_with_close_valid_keys(override, ok):
    found = unknown_additions([override])
    assert (found == []) is ok
    if override == "+stpes=3":
        assert "did you mean steps" in found[0]


def test_a_good_loss_value_of_another_numeric_type_is_accepted():
    assert get_loss("dpop", dpop_lambda=12.5).hparams["dpop_lambda"] == 12.5
    with pytest.raises(ConfigError, match=r"loss.dpop_lambda='12': must be a number"):
        get_loss("dpop", dpop_lambda="12")


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "prefopt.run", *tiny_model(args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_command_line_prints_each_problem_once_and_exits_2(tmp_path):
    out = _cli("+los=ipo", "beta=abc", f"hydra.run.dir={tmp_path}/run", cwd=tmp_path)
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert text.count("no part of prefopt reads 'los'") == 1 and text.count("beta='abc'") == 1
    assert "Traceback" not in text
    assert "beta='abc'" in (tmp_path / "run" / "run.log").read_text()  # kept in the run's log file too
