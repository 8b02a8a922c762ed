"""Losses at equal KL: the KL estimate in a run's summary, and the sweep report's frontier and matched-KL table on
hand-written run directories (2 losses x 3 β, 20 problems). The interpolated values are worked out by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from prefopt.mathloop.loop import MathLoop
from prefopt.reporting.compare import compare
from prefopt.reporting.frontier import (
    accuracy_at,
    common_kl,
    frontier_lines,
    matched_table,
    nominal_table,
    versus_table,
)
from prefopt.reporting.sweep import collect, write_report
from tests.integration.test_math_loop import LOOP, StubGenerator, half_right

# (loss, β): (KL on greedy answers, problems solved of 20)
RUNS = {
    ("dpo", "0.1"): (0.8, 8),
    ("dpo", "0.2"): (0.4, 12),
    ("dpo", "0.4"): (0.2, 10),
    ("bpo", "0.1"): (0.3, 14),
    ("bpo", "0.2"): (0.1, 10),
    ("bpo", "0.4"): (0.05, 8),
}


def write_sweep(root: Path, runs: dict, kl: bool = True) -> Path:
    for n, ((loss, beta), (value, solved)) in enumerate(runs.items()):
        run = root / str(n)
        (run / ".hydra").mkdir(parents=True)
        overrides = f"- experiment=dcr_mini\n- loss={loss}\n- beta={beta}\n- seed=0\n"  # one setting common to all
        (run / ".hydra" / "overrides.yaml").write_text(overrides)
        (run / "verified").mkdir()
        rows = [{"benchmark": "arith", "index": i, "correct": i < solved} for i in range(20)]
        (run / "verified" / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"eval/verified/arith": solved / 20, "eval/verified/mean": solved / 20}
        if kl:
            metrics.update(
                {"eval/kl/greedy": value, "eval/kl/greedy_low": value - 0.01, "eval/kl/greedy_high": value + 0.01}
            )
        (run / "summary.json").write_text(json.dumps({"status": "complete", "loss": loss, "metrics": metrics}))
    return root


def test_lines_follow_kl_and_interpolate_at_common_kl(tmp_path):
    comparison = compare(collect([write_sweep(tmp_path, RUNS)])[0])
    lines = {line.label: line for line in frontier_lines(comparison["groups"], comparison["benchmarks"])}
    assert list(lines) == ["dpo", "bpo"]
    dpo, bpo = lines["dpo"], lines["bpo"]
    assert [p.beta for p in dpo.points] == [0.4, 0.2, 0.1]  # ordered by KL, not by β
    assert dpo.points[0].kl.low == pytest.approx(0.19) and dpo.points[0].accuracy.estimate == 0.5
    kl = common_kl([dpo, bpo])  # dpo covers [0.2, 0.8], bpo [0.05, 0.3]
    assert kl == pytest.approx([0.2, 0.25, 0.3])
    # dpo: (0.2, 0.5) -> (0.4, 0.6); bpo: (0.1, 0.5) -> (0.3, 0.7)
    assert accuracy_at(dpo, kl) == pytest.approx([0.5, 0.525, 0.55])
    assert accuracy_at(bpo, kl) == pytest.approx([0.6, 0.65, 0.7])
    assert accuracy_at(bpo, [0.01, 0.9]) == [None, None]  # outside its range: no extrapolation
    header, rows = matched_table([dpo, bpo], kl)
    assert header == ["loss", "KL = 0.2", "KL = 0.25", "KL = 0.3"]
    assert rows == [["dpo", "50.0", "52.5", "55.0"], ["bpo", "60.0", "65.0", "70.0"]]


def test_the_report_has_the_frontier_plot_and_both_tables(tmp_path):
    result = write_report([write_sweep(tmp_path / "sweep", RUNS)])
    md = result["files"]["md"].read_text()
    plot = tmp_path / "sweep" / "kl_frontier.png"
    assert plot in result["files"]["plots"] and imread(plot).shape[:2] == (550, 900)
    assert "![KL frontier](kl_frontier.png)" in md
    assert "| dpo  | 50.0     | 52.5      | 55.0     |" in md  # matched KL
    assert "| bpo  | 70.0 (KL 0.3) | 50.0 (KL 0.1) | 40.0 (KL 0.05) |" in md  # nominal β: 0.1, 0.2, 0.4
    assert "eval/kl/greedy" in result["columns"] and result["rows"][0]["eval/kl/greedy"] == 0.8


def test_disjoint_kl_ranges_are_said_and_runs_without_kl_have_no_section(tmp_path):
    apart = {("dpo", "0.1"): (0.8, 8), ("dpo", "0.2"): (0.6, 9), ("bpo", "0.1"): (0.1, 10), ("bpo", "0.2"): (0.2, 9)}
    md = write_report([write_sweep(tmp_path / "apart", apart)])["files"]["md"].read_text()
    assert (
        "KL ranges do not overlap (dpo [0.6, 0.8], bpo [0.1, 0.2])" in md
        and "| dpo  | 40.0 (KL 0.8) | 45.0 (KL 0.6) |" in md
    )
    old = write_report([write_sweep(tmp_path / "old", RUNS, kl=False)])
    assert "KL to the reference" not in old["files"]["md"].read_text()
    assert not (tmp_path / "old" / "kl_frontier.png").exists()


def test_each_loss_meets_the_baseline_where_their_kl_ranges_overlap(tmp_path):
    """Three losses with no KL common to all: the all-loss table is empty, but dpo meets bpo on [0.2, 0.3] and
    ipo on [0.5, 0.8]; a loss that never meets dpo's range gets one row that says so."""
    runs = {
        **RUNS,
        ("ipo", "0.1"): (0.9, 16),
        ("ipo", "0.2"): (0.5, 12),
        ("slic", "0.1"): (1.5, 9),
        ("slic", "0.2"): (1.2, 9),
    }
    comparison = compare(collect([write_sweep(tmp_path / "three", runs)])[0])
    lines = frontier_lines(comparison["groups"], comparison["benchmarks"])
    assert common_kl(lines) == []
    versus = versus_table(lines, "dpo")
    assert versus is not None
    header, rows = versus
    assert header == ["loss", "shared KL range", "KL", "dpo (%)", "loss (%)", "difference (points, 95% CI)"]
    # dpo: (0.2, 50) (0.4, 60) (0.8, 40); bpo: (0.05, 40) (0.1, 50) (0.3, 70); ipo: (0.5, 60) (0.9, 80)
    # at 0.65 dpo is 60 - 20 * 0.25/0.4 = 47.5 and ipo 60 + 20 * 0.15/0.4 = 67.5
    expected = [
        ["bpo", "[0.2, 0.3]", "0.2", "50.0", "60.0", 10.0],
        ["bpo", "[0.2, 0.3]", "0.25", "52.5", "65.0", 12.5],
        ["bpo", "[0.2, 0.3]", "0.3", "55.0", "70.0", 15.0],
        ["ipo", "[0.5, 0.8]", "0.5", "55.0", "60.0", 5.0],
        ["ipo", "[0.5, 0.8]", "0.65", "47.5", "67.5", 20.0],
        ["ipo", "[0.5, 0.8]", "0.8", "40.0", "75.0", 35.0],
    ]
    for row, want in zip(rows[:6], expected):
        assert row[:5] == want[:5]
        estimate, low, high = (float(v) for v in re.fullmatch(r"(\S+) \[(\S+), (\S+)\]", row[5]).groups())
        assert estimate == pytest.approx(want[5]) and 0.0 < low < estimate < high, row
    # problems solved are the first k of 20 in every run: at 0.2 bpo (half (0.1, 10), half (0.3, 14)) differs from
    # dpo (0.2, 10) by +0.5 on 4 problems, so no resample of problems can favour dpo
    assert re.fullmatch(r"\+10\.0 \[\+\d+\.\d, \+\d+\.\d\]", rows[0][5])
    assert rows[6] == ["slic", "none", "-", "-", "-", "-"]
    assert versus_table(lines, "caldpo") is None  # no run of the baseline: no table
    md = write_report([tmp_path / "three"])["files"]["md"].read_text()
    assert "### Against dpo at matched KL" in md and "no KL at which all can be compared" in md


def test_a_second_knob_traces_the_line_and_runs_at_the_default_beta_join_it(tmp_path):
    """`along=("beta", "lr")`: a loss's settings that differ in β or lr make one line; a run without a `beta`
    override takes its resolved β (0.1 here) and joins the β-swept points of its loss."""
    runs = {  # (loss, overrides): (KL, solved of 20)
        ("dpo", ()): (0.8, 8),
        ("dpo", ("lr=1e-4",)): (0.2, 10),
        ("dpo", ("beta=0.2",)): (0.6, 12),
        ("bpo", ()): (0.3, 14),
        ("bpo", ("lr=1e-4",)): (0.1, 10),
    }
    root = tmp_path / "knobs"
    for n, ((loss, extra), (value, solved)) in enumerate(runs.items()):
        run = root / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in (f"loss={loss}", *extra, "seed=0")))
        beta = next((o.split("=")[1] for o in extra if o.startswith("beta=")), "0.1")
        (run / "resolved_config.yaml").write_text(f"seed: 0\nloss:\n  key: {loss}\n  beta: {beta}\n")
        (run / "verified").mkdir()
        rows = [{"benchmark": "arith", "index": i, "correct": i < solved} for i in range(20)]
        (run / "verified" / "arith.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        metrics = {"eval/verified/arith": solved / 20, "eval/verified/mean": solved / 20, "eval/kl/greedy": value}
        (run / "summary.json").write_text(json.dumps({"status": "complete", "loss": loss, "metrics": metrics}))
    comparison = compare(collect([root])[0])
    by_beta = {line.label: line for line in frontier_lines(comparison["groups"], comparison["benchmarks"])}
    assert sorted(by_beta) == ["bpo", "bpo lr=1e-4", "dpo", "dpo lr=1e-4"]  # lr apart: lines of their own
    assert [p.beta for p in by_beta["dpo"].points] == [0.2, 0.1]  # the default-β run joins the β=0.2 one
    lines = {ln.label: ln for ln in frontier_lines(comparison["groups"], comparison["benchmarks"], ("beta", "lr"))}
    assert sorted(lines) == ["bpo", "dpo"]
    assert [p.name for p in lines["dpo"].points] == ["β = 0.1, lr = 1e-4", "β = 0.2", "β = 0.1"]  # by KL
    kl = common_kl(list(lines.values()))
    assert kl == pytest.approx([0.2, 0.25, 0.3])
    assert accuracy_at(lines["dpo"], kl) == pytest.approx([0.5, 0.5125, 0.525])
    assert accuracy_at(lines["bpo"], kl) == pytest.approx([0.6, 0.65, 0.7])
    header, rows = nominal_table(list(lines.values()))
    assert header == ["loss", "β = 0.1", "β = 0.2", "β = 0.1, lr = 1e-4"]
    assert rows[0] == ["dpo", "40.0 (KL 0.8)", "60.0 (KL 0.6)", "50.0 (KL 0.2)"]
    assert rows[1] == ["bpo", "70.0 (KL 0.3)", "-", "50.0 (KL 0.1)"]
    md = write_report([root], along=("beta", "lr"))["files"]["md"].read_text()
    assert "### Accuracy (%) at nominal β and lr" in md and "| dpo  | 50.0     | 51.2" in md


def test_a_run_with_evaluation_reports_kl_per_answer_and_in_its_summary(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setattr(MathLoop, "generator", lambda self, model, tok, spec: StubGenerator(half_right))
    summary, run = tiny_run(*LOOP, f"mathloop.cache_dir={tmp_path / 'cache'}", "evaluation.samples=2")
    metrics = summary["metrics"]
    for kind in ("greedy", "sampled"):
        assert metrics[f"eval/kl/{kind}_low"] <= metrics[f"eval/kl/{kind}"] <= metrics[f"eval/kl/{kind}_high"]
    rows = [json.loads(line) for line in (run / "verified" / "arith.jsonl").read_text().splitlines()]
    assert metrics["eval/kl/greedy"] == pytest.approx(sum(r["kl"] for r in rows) / len(rows))
    assert metrics["eval/kl/sampled"] == pytest.approx(sum(r["kl_sampled"] for r in rows) / len(rows))
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/kl/greedy" in entry for entry in logged)
    assert not any(k.startswith("eval/kl") and "before" in k for k in metrics)


def test_the_kl_reference_is_the_runs_frozen_reference_not_a_second_load(tiny_run, tmp_path, monkeypatch):
    """The run holds the starting policy as its frozen reference: the after-training KL uses it, loading nothing."""
    import prefopt.mathloop.loop as loop_module

    monkeypatch.setattr(MathLoop, "generator", lambda self, model, tok, spec: StubGenerator(half_right))
    loads_during_kl, references = [], []
    real_estimator, real_load = loop_module.kl_estimator, MathLoop.load

    def recording_load(self, spec, hardware):
        loads_during_kl.append(spec)
        return real_load(self, spec, hardware)

    def estimator(policy, tokenizer, start, load, chunk_elements=None):
        with monkeypatch.context() as m:
            m.setattr(MathLoop, "load", recording_load)
            references.append(load(start))
        return real_estimator(policy, tokenizer, start, lambda s: references[-1], chunk_elements)

    monkeypatch.setattr(loop_module, "kl_estimator", estimator)
    summary, _ = tiny_run(*LOOP, f"mathloop.cache_dir={tmp_path / 'cache'}")
    assert loads_during_kl == [] and len(references) == 1
    assert not references[0].training and not any(p.requires_grad for p in references[0].parameters())
    assert "eval/kl/greedy" in summary["metrics"]
