"""The sweep report over seeds, on hand-written run directories (2 losses x 2 seeds, 4 problems), and the W&B
group of a seed sweep. Every number below is worked out by hand from the per-problem files."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from matplotlib.image import imread
from omegaconf import OmegaConf

from prefopt import dcr, report
from prefopt.compose import sweep_group
from prefopt.data.arith import ArithmeticData
from prefopt.reporting.compare import compare
from prefopt.reporting.runs import RunRecord
from prefopt.reporting.sweep import ReportCallback, ReportError, write_report
from tests.helpers.config import script_module, tiny_model

# per seed: the starting policy's outcomes on problems 0-3, and each loss's after training
BEFORE = {"0": "1100", "1": "1010"}
AFTER = {("dpo", "0"): "1000", ("dpo", "1"): "0010", ("bpo", "0"): "1110", ("bpo", "1"): "1011"}
CHOSEN = {("dpo", "0"): -1.0, ("dpo", "1"): -2.0, ("bpo", "0"): 0.5, ("bpo", "1"): 0.1}


def _jsonl(path: Path, bits: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "".join(json.dumps({"benchmark": "arith", "index": i, "correct": b == "1"}) + "\n" for i, b in enumerate(bits))
    )


@pytest.fixture
def runs(tmp_path) -> Path:
    sweep = tmp_path / "sweep"
    for n, ((loss, seed), bits) in enumerate(AFTER.items()):
        run = sweep / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- loss={loss}\n- seed={seed}\n")
        _jsonl(run / "verified" / "arith.jsonl", bits)
        _jsonl(run / "verified_before" / "arith.jsonl", BEFORE[seed])
        metrics = {
            "eval/verified/arith": bits.count("1") / 4,
            "eval/verified_before/arith": BEFORE[seed].count("1") / 4,
            "eval/rewards/chosen": CHOSEN[(loss, seed)],
            "eval/rewards/accuracies": 0.75,
        }
        (run / "summary.json").write_text(json.dumps({"status": "complete", "loss": loss, "metrics": metrics}))
    return sweep


def _rows(path: Path) -> dict[tuple, dict]:
    with path.open() as fh:
        return {(r["setting"], r["metric"], r["statistic"]): r for r in csv.DictReader(fh)}


def test_seed_report_groups_runs_and_compares_with_dpo(runs):
    result = write_report([runs])
    groups = {g.label: g for g in result["comparison"]["groups"]}
    assert list(groups) == ["loss=dpo", "loss=bpo"] and groups["loss=dpo"].seeds == ["0", "1"]
    dpo, bpo = groups["loss=dpo"], groups["loss=bpo"]
    assert dpo.accuracy["arith"].estimate == 0.25 and bpo.accuracy["arith"].estimate == 0.75  # 2/8, 6/8
    assert dpo.before["arith"].estimate == 0.5
    # solved before: (0,0) (0,1) (1,0) (1,2); dpo keeps (0,0) and (1,2), bpo all four
    assert dpo.preserved["arith"].estimate == 0.5 and bpo.preserved["arith"].estimate == 1.0
    # failed before: (0,2) (0,3) (1,1) (1,3); dpo solves none, bpo (0,2) and (1,3)
    assert dpo.improved["arith"].estimate == 0.0 and bpo.improved["arith"].estimate == 0.5
    # bpo - dpo: 4 wins, no losses out of 8 (seed, problem) pairs -> +0.5, McNemar p = 2 * 0.5**4
    d = bpo.versus["arith"]
    assert d.estimate == 0.5 and d.p_value == pytest.approx(0.125) and d.n == 8
    # 4 problems: seed 0 drawn twice (1/4) with problems only from {0, 3} (1/16), or seed 1 twice with problems
    # only from {1, 2}, gives a difference of 0: 1 draw in 32 (3.1%) is above the 2.5% tail; +1 likewise
    assert (d.low, d.high) == (0.0, 1.0)
    assert "arith" not in dpo.versus  # the baseline is not compared with itself
    # rewards/chosen: differences 1.5 and 2.1 -> mean 1.8, t = 1.8 / 0.3 = 6 with 1 df
    chosen = bpo.scalar_versus["eval/rewards/chosen"]
    assert chosen.estimate == pytest.approx(1.8)
    assert chosen.p_value == pytest.approx(1 - 2 / math.pi * math.atan(6))
    assert dpo.scalars["eval/rewards/chosen"].estimate == pytest.approx(-1.5)

    md = result["files"]["md"].read_text()
    assert "percentile bootstrap over seeds and problems" in md and "exact McNemar" in md
    assert "| loss=bpo | 8     | +50.0 [" in md and "p=0.125" in md
    assert "Paired difference in accuracy against dpo" in md
    rows = _rows(runs / "comparison.csv")
    assert float(rows[("loss=bpo", "arith", "improved")]["estimate"]) == 0.5
    assert rows[("loss=bpo", "arith", "versus")]["baseline"] == "dpo"
    # report.csv (one row per run) has each run's own preservation/improvement from its summary
    (runs / "3" / "summary.json").write_text(
        json.dumps(
            {"status": "complete", "loss": "bpo", "metrics": {"eval/preserved/arith": 1.0, "eval/improved/arith": 0.5}}
        )
    )
    with (write_report([runs])["files"]["csv"]).open() as fh:
        last = list(csv.DictReader(fh))[-1]
    assert (last["eval/preserved/arith"], last["eval/improved/arith"]) == ("1.0", "0.5")
    png = imread(runs / "verified_accuracy.png")
    assert png.shape[:2] == (500, 1100) and png.std() > 0


def test_baseline_is_settable_and_can_be_off(runs, tmp_path, capsys):
    assert report.main([str(runs), "--out", str(tmp_path / "b"), "--baseline", "bpo"]) == 0
    assert "loss=dpo | 8     | -50.0 [" in capsys.readouterr().out
    rows = _rows(tmp_path / "b" / "comparison.csv")
    assert float(rows[("loss=dpo", "arith", "versus")]["estimate"]) == -0.5
    result = write_report([runs], tmp_path / "off", baseline="none")
    assert not any(g.versus for g in result["comparison"]["groups"])
    assert "no paired differences" in result["files"]["md"].read_text()
    # the Hydra callback: its own `baseline`, and the run config's `report.baseline` over it
    ReportCallback(baseline="bpo").on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(runs)}}}))
    assert ("loss=dpo", "arith", "versus") in _rows(runs / "comparison.csv")
    ReportCallback(baseline="bpo").on_multirun_end(
        OmegaConf.create({"hydra": {"sweep": {"dir": str(runs)}}, "report": {"baseline": "dpo"}})
    )
    assert ("loss=bpo", "arith", "versus") in _rows(runs / "comparison.csv")


def test_single_seed_and_mismatched_problems(runs, tmp_path):
    result = write_report([runs / "0", runs / "2"], tmp_path / "one")  # seed 0 of each loss
    bpo = result["comparison"]["groups"][1]
    assert bpo.seeds == ["0"] and bpo.accuracy["arith"].estimate == 0.75
    assert bpo.versus["arith"].estimate == 0.5 and bpo.versus["arith"].p_value == pytest.approx(0.5)  # 2 wins
    assert bpo.scalar_versus["eval/rewards/chosen"].low is None  # one seed: no interval
    _jsonl(runs / "3" / "verified" / "arith.jsonl", "")  # a run evaluated on no problem at all
    (runs / "3" / "verified" / "arith.jsonl").write_text('{"index": 9, "correct": true}\n')
    with pytest.raises(ReportError, match="loss=bpo: .*share no problem"):
        write_report([runs], tmp_path / "bad")


def test_wandb_groups_the_seeds_of_one_setting():
    assert (
        sweep_group("07-00-00", ["experiment=dcr_arith", "loss=dpo", "seed=1"])
        == "07-00-00 experiment=dcr_arith loss=dpo"
    )
    assert sweep_group("07-00-00", ["loss=dpo", "seed=0"]) == sweep_group("07-00-00", ["seed=2", "loss=dpo"])
    assert sweep_group("07-00-00", ["loss=dpo", "beta=0.1"]) == "07-00-00"  # no seed axis: the sweep is the group


def test_dcr_table_over_seeds(runs, tmp_path, capsys):
    assert dcr.main([str(runs), "--out", str(tmp_path / "dcr")]) == 0
    md = (tmp_path / "dcr" / "dcr_table.md").read_text()
    header, _, dpo, bpo = md.split("\n\n")[1].splitlines()
    assert [c.strip() for c in header.split("|")[2:10]] == [
        "seeds",
        "acc before",
        "acc after",
        "Δ acc vs dpo",
        "preserved",
        "improved",
        "held-out reward acc",
        "rewards/chosen",
    ]
    cells = [c.strip() for c in bpo.split("|")[1:-1]]
    assert cells[:2] == ["loss=bpo", "0 1"] and cells[3].startswith("75.0 [")
    assert cells[4].startswith("+50.0 [") and cells[4].endswith("p=0.125")
    assert cells[5].startswith("100.0 [") and cells[6].startswith("50.0 [") and cells[8].startswith("0.300 [")
    assert cells[7].startswith("0.750")  # every run's held-out reward accuracy is 0.75
    assert [c.strip() for c in dpo.split("|")[1:-1]][4] == "-"  # the baseline itself
    assert "## Each run" in md and "exact McNemar" in md
    assert dcr.main([str(tmp_path / "missing")]) == 2 and "prefopt.dcr: error:" in capsys.readouterr().err


@pytest.mark.slow
def test_real_seed_sweep_end_to_end(tmp_path):
    """`python -m prefopt.run -m loss=dpo,bpo seed=0,1` on the tiny model with the verified evaluation on: four
    runs, preservation/improvement in each summary, and the sweep report grouping the seeds (~1 min on 2 cores)."""
    out = tmp_path / "sweep"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"}
    args = [
        "loss=dpo,bpo",
        "seed=0,1",
        "steps=2",
        "batch_size=4",
        "micro_batch_size=4",
        "eval_every=0",
        "data.source.n_train=16",
        "data.source.n_eval=8",
        "train.progress=false",
        "mathloop.warmup=false",
        "mathloop.pairs=false",
        "mathloop.evaluate=true",
        "evaluation.limit=8",
        "generation.max_new_tokens=8",
        "verify.workers=1",
        f"mathloop.cache_dir={tmp_path / 'cache'}",
        f"hydra.sweep.dir={out}",
    ]
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.run", "-m", *tiny_model(args)],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    for n in range(4):
        metrics = json.loads((out / str(n) / "summary.json").read_text())["metrics"]
        # the untrained tiny model solves none of the 8 problems: nothing to preserve, 0 of 8 improved
        assert "eval/preserved/arith" not in metrics and metrics["eval/improved/arith"] == 0.0
        assert metrics["eval/improved_high/arith"] == pytest.approx(1 - 0.025 ** (1 / 8))  # Clopper-Pearson, 0 of 8
    md = (out / "report.md").read_text()
    assert "| loss=dpo | 2     |" in md and "| loss=bpo | 16    | +0.0 [+0.0, +0.0] p=1 |" in md
    rows = _rows(out / "comparison.csv")
    assert rows[("loss=bpo", "arith", "accuracy")]["seeds"] == "0 1"
    assert rows[("loss=bpo", "eval/rewards/chosen", "versus")]["method"] == "paired t-test over seeds"


def test_runs_without_per_problem_files_as_from_wandb():
    """A W&B run's overrides are its whole flat config (stage seeds included) and it has no per-problem files:
    the seeds still form one group, and accuracy is the t interval over the runs' final accuracies."""

    def rec(loss, seed, acc):
        return RunRecord(
            name=f"{loss}{seed}",
            source="wandb:x",
            status="finished",
            step=2,
            loss=loss,
            overrides={"loss.key": loss, "seed": seed, "warmup.seed": seed, "lr": "0.0005"},
            final={"eval/verified/arith": acc},
        )

    result = compare([rec("dpo", "0", 0.2), rec("dpo", "1", 0.4), rec("bpo", "0", 0.5), rec("bpo", "1", 0.9)])
    dpo, bpo = result["groups"]
    assert (dpo.label, dpo.seeds, bpo.label) == ("loss=dpo", ["0", "1"], "loss=bpo")
    half = 12.706204736174707 * 0.1  # t(0.975, 1 df) * sd 0.1414 / sqrt(2)
    assert dpo.accuracy["arith"].estimate == pytest.approx(0.3)
    assert dpo.accuracy["arith"].low == pytest.approx(0.3 - half)
    assert bpo.versus == {}  # no per-problem files: no McNemar on problems


def test_dcr_study_script_retabulates_a_finished_sweep(runs, capsys):
    study = script_module("dcr_study")
    (runs / "study_header.md").write_text("## DCR study, 2026-11-30 21:53 UTC\n\n- command: `python -m prefopt.run`\n")
    assert study.main(["--sweep-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.index("## DCR study, 2026-11-30 21:53 UTC") < out.index("| loss=bpo | 0 1   |")
    assert "+50.0 [" in out and "cores" in study.machine()


def test_validation_split_is_disjoint_and_leaves_old_cache_keys_alone():
    plain = ArithmeticData()
    assert json.loads(plain.fingerprint()) == {
        "n_train": 150,
        "n_eval": 50,
        "max_operand": 9,
        "ops": "+-",
        "seed": 1234,
        "n_pairs": 0,
    }  # as before n_val existed
    data = ArithmeticData(n_train=100, n_eval=40, n_pairs=20, n_val=30)
    rows = {split: {r["problem"] for r in data.problem_rows(split)} for split in ("train", "eval", "pairs", "val")}
    assert len(rows["val"]) == 30 and "n_val" in data.fingerprint()
    assert not rows["val"] & (rows["train"] | rows["eval"] | rows["pairs"])
    assert {r["problem"] for r in plain.problem_rows("eval")} == {
        r["problem"] for r in ArithmeticData(n_val=30).problem_rows("eval")
    }  # held-out unchanged


def test_dcr_validation_script_tabulates_a_finished_sweep(tmp_path, capsys):
    script = script_module("dcr_validation")
    run = tmp_path / "sweep" / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "lr: 1.0e-05\nepochs: 3\npairs:\n  max_pairs_per_prompt: 4\n  eval_size: 200\n"
    )
    metrics = {
        "eval/verified_before/arith_val": 0.5,
        "eval/verified/arith_val": 0.52,
        "eval/preserved/arith_val": 0.9,
        "eval/preserved_low/arith_val": 0.84,
        "eval/preserved_high/arith_val": 0.94,
        "eval/improved/arith_val": 0.12,
        "eval/rewards/chosen": -0.004,
    }
    (run / "summary.json").write_text(json.dumps({"metrics": metrics}))
    (run / "metrics.jsonl").write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [{"step": 20, "eval/rewards/accuracies": 0.56}, {"step": 161, "eval/rewards/accuracies": 0.6}]
        )
    )
    (tmp_path / "sweep" / "study_header.md").write_text("## DCR miniature validation sweep, 2026-12-01 00:15 UTC\n")
    assert script.main(["--sweep-dir", str(tmp_path / "sweep")]) == 0
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| pairs.max_pairs_per_prompt=4")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    assert cells[:5] == ["pairs.max_pairs_per_prompt=4 lr=1e-05 epochs=3", "161", "50.0 → 52.0", "90 [84, 94]", "12"]
    # 120 of 200 held-out pairs: Clopper-Pearson [0.529, 0.668]
    assert cells[5] == "0.56 0.60 [0.53, 0.67]" and cells[6] == "-0.004"
    assert cells[7] == "yes"  # the whole interval above ½: healthy
    assert out.startswith("## DCR miniature validation sweep, 2026-12-01 00:15 UTC")


def test_the_warmup_key_ignores_pair_and_validation_problem_counts():
    from prefopt.mathloop.fingerprints import data_fingerprint

    plain, more = ArithmeticData(), ArithmeticData(n_pairs=100, n_val=30)
    # the warm-up trains on the same pairs: one cached warm-up serves both
    assert plain.load()[0] == more.load()[0]
    assert data_fingerprint(plain, training=True) == data_fingerprint(more, training=True)
    assert data_fingerprint(plain) != data_fingerprint(more)  # the pairs stage and evaluation still tell them apart
    assert data_fingerprint(ArithmeticData(n_train=151), training=True) != data_fingerprint(plain, training=True)


def test_miscopied_answers_are_a_share_of_the_sft_targets_only():
    from prefopt.errors import ConfigError
    from prefopt.mathloop.fingerprints import data_fingerprint
    from prefopt.verify import AnswerChecker

    plain, noisy = ArithmeticData(), ArithmeticData(miscopied=0.3)
    train, held, _ = plain.load()
    assert noisy.load() == plain.load() == plain.sft_load()  # preference pairs stay clean; 0 miscopies nothing
    sft_train, sft_held, _ = noisy.sft_load()
    assert sft_held == held  # the warm-up's held-out pairs (the benchmark's problems) stay clean
    changed = [i for i, (p, q) in enumerate(zip(train, sft_train)) if p != q]
    picked = noisy.miscopied_indices(len(train))
    assert len(picked) == 45 and set(changed) <= picked  # round(0.3 x 150); where a == a op b the copy is right
    assert len(changed) > 30
    checker = AnswerChecker()
    for i in changed:
        p, q = train[i], sft_train[i]
        a = q.prompt.split()[2]
        assert q.chosen == p.chosen.rsplit("\\boxed", 1)[0] + f"\\boxed{{{a}}}."  # the first operand is boxed
        assert q.rejected == p.rejected
        assert not checker.check(q.chosen, str(eval(q.prompt[8:-1]))).correct
    # 0 leaves every cache key as it was; a share changes the warm-up's key
    assert plain.fingerprint() == ArithmeticData(miscopied=0.0).fingerprint()
    assert data_fingerprint(noisy, training=True) != data_fingerprint(plain, training=True)
    for bad in (-0.1, 1.5, "lots", True):
        with pytest.raises(ConfigError, match="data.source.miscopied must be a share between 0 and 1"):
            ArithmeticData(miscopied=bad)


def test_pair_kinds_script_tells_miscopies_from_arithmetic_mistakes():
    script = script_module("dcr_pair_kinds")
    q, right = "What is 26 - 30?", "26 - 30 = -4. The answer is \\boxed{-4}."
    assert script.kind(q, right, "26 - 30 = -4. The answer is \\boxed{26}.") == "miscopy"
    assert script.kind(q, right, "26 - 30 = -3. The answer is \\boxed{-3}.") == "arithmetic"
    assert script.kind(q, right, "26 - 31 = -5. The answer is \\boxed{-5}.") == "other"  # restated a wrong operand
    assert (
        script.kind(q, right, "26 - 30 = -3. The answer is \\boxed{-4}.") == "other"
    )  # boxes a result it did not state
    assert script.kind(q, right, "The answer is 26.") == "other"
    assert (
        script.kind("What is 5 + 0?", "5 + 0 = 5. The answer is \\boxed{5}.", "5 + 0 = 6. The answer is \\boxed{6}.")
        == "arithmetic"
    )
    out = script.table(
        [
            ("loss=dpo", {"miscopy": [True, True], "arithmetic": [True, False], "all": [True] * 3 + [False]}),
            ("loss=dpo", {"arithmetic": [False, False], "other": [True, True], "all": [False, False, True, True]}),
        ]
    )
    row = [line for line in out.splitlines() if line.startswith("| loss=dpo")][0]
    # pooled shares over 8 pairs; accuracies: the mean over the seeds that have the kind
    assert row == "| loss=dpo | 2 | 8 | 25%, 1.00 | 50%, 0.25 | 25%, 1.00 | 0.62 |"


def test_pair_kinds_script_sorts_the_starting_policys_mistakes_and_what_was_solved(tmp_path):
    script = script_module("dcr_pair_kinds")
    q = "What is 26 - 30?"
    assert script.answer_kind(q, "26 - 30 = -4. The answer is \\boxed{26}.") == "miscopy"
    assert script.answer_kind(q, "26 - 30 = -3. The answer is \\boxed{-3}.") == "arithmetic"
    assert script.answer_kind(q, "26 - 30 = -3. The answer is \\boxed{-4}.") == "other"
    run = tmp_path / "run"
    for name, rows in (
        (
            "verified_before",
            [
                (q, "26 - 30 = -4. The answer is \\boxed{26}.", False),
                (q, "26 - 30 = -3. The answer is \\boxed{-3}.", False),
                (q, "26 - 30 = -4. The answer is \\boxed{-4}.", True),
            ],
        ),
        ("verified", [(q, "", True), (q, "", False), (q, "", False)]),
    ):
        (run / name).mkdir(parents=True)
        (run / name / "arith.jsonl").write_text(
            "".join(json.dumps({"problem": p, "output": o, "correct": c}) + "\n" for p, o, c in rows)
        )
    fixed = script.fixed_kinds(run)
    assert dict(fixed) == {"miscopy": [True], "arithmetic": [False]}  # a problem solved before is not counted
    out = script.fixed_table([("loss=dpo", fixed), ("loss=dpo", {"miscopy": [False], "arithmetic": [True, True]})])
    assert "| loss=dpo | 2 | 1, 50% | 2, 67% | 0, - |" in out
    assert script.fixed_kinds(tmp_path / "no_run") is None
