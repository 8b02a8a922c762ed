"""The sweep report: files, numbers equal to the runs' summaries, plot sizes, override columns, incomplete
runs, the Hydra callback, the W&B reader (on a stand-in API) and the dashboard script."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from prefopt import report, wandb_dashboard
from prefopt.reporting import dashboard
from prefopt.reporting.sweep import ReportCallback, ReportError, fmt, write_report
from tests.helpers.config import MATHLOOP_OFF, TINY_MODEL

ROOT = Path(__file__).resolve().parents[2]
SWEEP = [
    "loss=dpo,bpo",
    "beta=0.05,0.1",
    "steps=2",
    "batch_size=4",
    "micro_batch_size=4",
    "eval_every=1",
    "data.source.n_train=8",
    "data.source.n_eval=8",
    "train.progress=false",
    *MATHLOOP_OFF,
]


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    """A real 4-run multirun of the entry point, with the report callback registered on the command line."""
    out = tmp_path_factory.mktemp("report") / "sweep"
    # One thread: the tiny model gains nothing from more, and spinning threads crawl on a busy machine.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "prefopt.run",
            "-m",
            TINY_MODEL,
            *SWEEP,
            f"hydra.sweep.dir={out}",
            "++hydra.callbacks.report._target_=prefopt.reporting.sweep.ReportCallback",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "report.md" in proc.stdout  # the callback printed the table and where it wrote
    return out


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("checkpoints", "final"))
    return dst


def _csv(path: Path) -> list[dict]:
    with path.open() as fh:
        return list(csv.DictReader(fh))


def _png_shape(path: Path) -> tuple[int, int]:
    img = imread(path)
    assert img.std() > 0  # not a blank canvas
    return img.shape[0], img.shape[1]


# (height, width) in pixels: a figure has the same size whatever the number of runs it shows
EXPECTED = {"rewards.png": (480, 1500), "chosen_below_zero.png": (480, 900), "verified_accuracy.png": (500, 1100)}


def _expected(name: str) -> tuple[int, int]:
    return EXPECTED[name]


def test_callback_wrote_the_sweep_report(sweep):
    for name in ("report.md", "report.csv", "rewards.png", "chosen_below_zero.png"):
        assert (sweep / name).is_file(), name
    assert not (sweep / "verified_accuracy.png").exists()
    assert "No run has verified accuracy" in (sweep / "report.md").read_text()


def test_table_numbers_equal_the_summaries(sweep, tmp_path, capsys):
    result = write_report([sweep], tmp_path, echo=True)
    rows = _csv(tmp_path / "report.csv")
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]
    metric_cols = [c for c in rows[0] if c.startswith(("train/", "eval/"))]
    assert {
        "train/loss",
        "eval/loss",
        "eval/rewards/chosen",
        "eval/rewards/rejected",
        "eval/rewards/margins",
        "eval/rewards/accuracies",
        "train/dcr/chosen_reward_below_zero",
        "eval/dcr/chosen_logp_delta_per_token",
    } <= set(metric_cols)
    printed = capsys.readouterr().out
    for row, raw in zip(rows, result["rows"]):
        summary = json.loads((sweep / row["run"] / "summary.json").read_text())
        assert row["status"] == "complete" and int(row["step"]) == summary["step"] == 2
        for col in metric_cols:
            assert float(row[col]) == summary["metrics"][col], col  # exact: the CSV keeps full precision
            assert raw[col] == summary["metrics"][col]
        assert float(row["wall_time_s"]) == summary["wall_time_s"]
        assert fmt(summary["metrics"]["eval/loss"]) in printed


def test_columns_are_the_overrides_that_differ(sweep, tmp_path):
    rows = _csv(sweep / "report.csv")
    assert list(rows[0])[:4] == ["run", "dir", "loss", "beta"]
    assert [(r["loss"], r["beta"]) for r in rows] == [("dpo", "0.05"), ("dpo", "0.1"), ("bpo", "0.05"), ("bpo", "0.1")]
    for same in ("steps", "batch_size", "data.source.n_train", "train.progress"):
        assert same not in rows[0]
    md = (sweep / "report.md").read_text()
    assert "Common to all runs:" in md and "`steps=2`" in md
    # Two runs of one loss: only beta differs, and loss becomes a common setting.
    result = write_report([sweep / "0", sweep / "1"], tmp_path)
    assert result["columns"][:3] == ["run", "dir", "beta"] and "loss" not in result["columns"]
    assert [r.label for r in result["runs"]] == ["beta=0.05", "beta=0.1"]


def test_plots_are_images_of_the_expected_size(sweep):
    for name in ("rewards.png", "chosen_below_zero.png"):
        assert _png_shape(sweep / name) == _expected(name)


def test_killed_run_is_incomplete_not_a_crash(sweep, tmp_path):
    killed = _copy_run(sweep / "2", tmp_path / "runs" / "killed")
    (killed / "summary.json").unlink()
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    (killed / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # cut mid-line
    empty = tmp_path / "runs" / "died_at_start"  # killed before it logged anything
    shutil.copytree(sweep / "3" / ".hydra", empty / ".hydra")
    _copy_run(sweep / "0", tmp_path / "runs" / "done")

    result = write_report([tmp_path / "runs"], echo=False)
    by_name = {r["run"]: r for r in _csv(tmp_path / "runs" / "report.csv")}
    assert set(by_name) == {"killed", "died_at_start", "done"}
    assert by_name["killed"]["status"] == by_name["died_at_start"]["status"] == "incomplete"
    assert by_name["done"]["status"] == "complete"
    assert int(by_name["killed"]["step"]) == first["step"]
    assert float(by_name["killed"]["train/loss"]) == first["train/loss"]
    assert by_name["killed"]["wall_time_s"] == "" and by_name["died_at_start"]["train/loss"] == ""
    assert "Incomplete" in result["files"]["md"].read_text()
    assert _png_shape(tmp_path / "runs" / "rewards.png") == _expected("rewards.png")


def test_verified_accuracy_table_and_chart(sweep, tmp_path):
    accs = {"0": (0.40, 0.20), "2": (0.55, 0.30)}
    for name, (gsm, math) in accs.items():
        run = _copy_run(sweep / name, tmp_path / "runs" / name)
        summary = json.loads((run / "summary.json").read_text())
        summary["metrics"].update(
            {
                "eval/verified/gsm8k": gsm,
                "eval/verified/math500": math,
                "eval/verified/mean": (gsm + math) / 2,
                "eval/verified_before/gsm8k": 0.35,
                "eval/verified_before/math500": 0.25,
                "eval/verified_before/mean": 0.30,
            }
        )
        (run / "summary.json").write_text(json.dumps(summary))
    result = write_report([tmp_path / "runs"])
    rows = _csv(tmp_path / "runs" / "report.csv")
    assert [float(r["eval/verified/mean"]) for r in rows] == [pytest.approx(0.30), pytest.approx(0.425)]
    assert float(rows[1]["eval/verified/gsm8k"]) == 0.55
    assert {"eval/verified/mean", "eval/verified_before/mean"} <= set(result["columns"])
    md = result["files"]["md"].read_text()
    assert "| before preference training | 35.0 " in md and "| gsm8k" in md and "42.5" in md
    png = tmp_path / "runs" / "verified_accuracy.png"
    assert png in result["files"]["plots"] and _png_shape(png) == _expected("verified_accuracy.png")


def test_callback_on_multirun_end_and_failures(sweep, tmp_path, caplog):
    target = tmp_path / "sweep"
    for name in ("0", "1"):
        _copy_run(sweep / name, target / name)
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(target)}}}))
    assert (target / "report.md").is_file() and len(_csv(target / "report.csv")) == 2
    # A report that cannot be written is a warning, never an exception that fails the sweep.
    ReportCallback().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "nothing")}}}))
    assert "report not written" in caplog.text


def test_cli(sweep, tmp_path, capsys):
    assert report.main([str(sweep / "1"), str(sweep / "3"), "--out", str(tmp_path / "out")]) == 0
    assert "| 1" in capsys.readouterr().out and (tmp_path / "out" / "report.csv").is_file()
    assert report.main([str(tmp_path / "missing")]) == 2
    assert report.main([str(tmp_path / "out")]) == 2  # a directory with no runs under it
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("prefopt.report: error:") for line in err)


class _FakeRun:
    def __init__(self, name, loss, beta, history, state="finished"):
        self.name, self.id, self.state = name, name, state
        self.config = {"loss": {"_target_": "prefopt.losses.Loss", "key": loss, "beta": beta}, "steps": 2}
        self.summary = {
            "eval/loss": history[-1]["eval/loss"],
            "eval/rewards/accuracies": {"max": 0.9, "last": 0.5},
            "_runtime": 12.5,
            "step": history[-1]["step"],
        }
        self._history = history

    def history(self, samples=500, pandas=True):
        assert not pandas
        return [{"_step": i, **row} for i, row in enumerate(self._history)]


def test_wandb_group_through_the_api(tmp_path, monkeypatch, capsys):
    runs = [
        _FakeRun(
            "dpo-run",
            "dpo",
            0.1,
            [
                {"step": 1, "train/rewards/chosen": 0.0, "eval/loss": 0.7},
                {"step": 2, "train/rewards/chosen": -0.2, "eval/loss": 0.6},
            ],
        ),
        _FakeRun("bpo-run", "bpo", 0.1, [{"step": 1, "train/rewards/chosen": 0.1, "eval/loss": 1.0}], "crashed"),
    ]
    calls = []

    class Api:
        def __init__(self, timeout=None):
            pass

        def runs(self, path, filters=None):
            calls.append((path, filters))
            return runs

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Api))
    result = write_report(["wandb:me/prefopt/sweep-1"], tmp_path)
    assert calls == [("me/prefopt", {"group": "sweep-1"})]
    rows = _csv(tmp_path / "report.csv")
    assert [(r["run"], r["loss.key"], r["status"]) for r in rows] == [
        ("dpo-run", "dpo", "complete"),
        ("bpo-run", "bpo", "crashed"),
    ]
    assert "loss.beta" not in rows[0] and "steps" not in rows[0]
    assert float(rows[0]["eval/loss"]) == 0.6 and float(rows[0]["eval/rewards/accuracies"]) == 0.5
    assert result["runs"][0].history["train/rewards/chosen"] == [(1, 0.0), (2, -0.2)]

    class Down(Api):
        def runs(self, path, filters=None):
            raise ConnectionError("Max retries exceeded\nwith url: https://api.wandb.ai/graphql")

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Api=Down))
    with pytest.raises(ReportError, match=r"^cannot read W&B group me/prefopt/g: ConnectionError: Max retries"):
        write_report(["wandb:me/prefopt/g"], tmp_path)
    assert report.main(["--wandb", "me/prefopt/g", "--out", str(tmp_path)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1
    with pytest.raises(ReportError, match="ENTITY/PROJECT/GROUP"):
        write_report(["wandb:me/prefopt"], tmp_path)


def test_dashboard_charts_plot_logged_metrics(sweep, monkeypatch, capsys):
    record = lambda kind: lambda **kw: (kind, kw)  # noqa: E731
    wr = types.SimpleNamespace(
        **{k: record(k) for k in ("Runset", "LinePlot", "BarPlot", "RunComparer", "PanelGrid", "P", "H2", "Report")}
    )
    wr.P = lambda text: ("P", text)
    wr.H2 = lambda text: ("H2", text)
    kind, kw = dashboard.build_report(wr, "me", "prefopt", "sweep-1")
    grids = [b[1] for b in kw["blocks"] if b[0] == "PanelGrid"]
    assert kind == "Report" and kw["entity"] == "me" and len(grids) == len(dashboard.SECTIONS) + 1
    assert all(g["runsets"][0][1]["filters"] == "Metric('Group') == 'sweep-1'" for g in grids)
    logged = {k for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines() for k in json.loads(line)}
    lines = [p[1] for g in grids for p in g["panels"] if p[0] == "LinePlot"]
    assert lines and all(p["x"] == "step" and set(p["y"]) <= logged for p in lines)
    monkeypatch.setitem(sys.modules, "wandb_workspaces", None)  # not installed
    assert wandb_dashboard.main(["me/prefopt", "sweep-1"]) == 2
    assert "pip install wandb-workspaces" in capsys.readouterr().err
