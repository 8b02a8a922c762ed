"""CHES in the runs: the pair stage stores it per pair (pairs.ches=true), a run drops the top share
(data.drop_top_ches) with the count in summary.json, and `prefopt.ches` scores an existing pair file."""

from __future__ import annotations

import json
import math

import pytest

from prefopt.ches import ches_job
from prefopt.ches_scores import score_pairs
from prefopt.compose import build
from prefopt.data.sources import FileData
from prefopt.mathloop.jobs import pairs_job
from prefopt.mathloop.loop import MathLoop
from prefopt.models import load_model, load_tokenizer
from tests.helpers.config import compose_cfg
from tests.integration.test_math_loop import StubGenerator, half_right

PAIRS = ["mathloop.warmup=false", "pairs.k=2", "verify.workers=1", "pairs.ches=true"]


def test_the_pair_stage_stores_ches_per_pair_and_in_the_provenance(tmp_path, monkeypatch):
    monkeypatch.setattr(MathLoop, "generator", lambda self, model, tok, spec: StubGenerator(half_right))
    plan = build(compose_cfg(PAIRS))
    record = pairs_job(plan.loop, plan.model, plan.data, plan.hardware, tmp_path / "pairs")
    path = tmp_path / "pairs" / "pairs.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == record["num_pairs"] == 32
    assert all(set(r) == {"prompt", "chosen", "rejected", "pair_id", "ches", "ches_length_normalized"} for r in rows)
    provenance = json.loads((tmp_path / "pairs" / "pairs.jsonl.provenance.json").read_text())
    assert provenance["ches"]["scored"] == 32 and provenance["ches"]["raw"]["max"] == max(r["ches"] for r in rows)
    # The same scores as the scorer gives on the training run's pairs (the file read back, as a run reads it).
    tokenizer = load_tokenizer(plan.model)
    model = load_model(plan.model, vocab_size=len(tokenizer))
    train, _, _ = FileData(path=str(path), eval_size=1).load()
    again = score_pairs(model, tokenizer, train, dict(plan.tokenize, completion_eos=plan.model.completion_eos))
    assert [s["ches"] for s in again] == pytest.approx([r["ches"] for r in rows[:-1]], rel=1e-5)


def test_a_run_drops_the_top_share_and_records_it(tiny_run):
    summary, run_dir = tiny_run("data.drop_top_ches=0.25", "data.ches_score=raw")
    record = summary["data"]["ches_filter"]
    assert record["pairs"] == 32 and record["dropped"] == math.floor(0.25 * 32) == 8
    assert record["source"] == "reference model" and record["score"] == "raw"
    assert summary["data"]["tokenize"]["train"]["pairs"] == 24  # trained on the rest
    scores = [json.loads(line)["ches"] for line in (run_dir / "ches.jsonl").read_text().splitlines()]
    assert record["threshold"] == sorted(scores)[-8] and record["highest_kept"] == sorted(scores)[-9]
    assert "ches_filter" not in tiny_run(run_dir=run_dir.parent / "plain")[0]["data"]  # off by default


def test_prefopt_ches_scores_a_pair_file_that_a_run_then_filters(tiny_run, tmp_path):
    pairs = tmp_path / "mine.jsonl"
    rows = [{"prompt": f"What is {i} + 1?", "chosen": f"{i + 1}", "rejected": f"{i + 2} or so"} for i in range(12)]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = ["data=jsonl", "data.source.eval_size=2", "data.max_length=128", "data.max_prompt_length=64"]
    plan = build(compose_cfg(data + [f"data.source.path={pairs}"]))
    record = ches_job(plan, tmp_path / "run")
    scored = tmp_path / "mine.ches.jsonl"
    assert record["ches"]["scored"] == 12 and scored.is_file()
    summary, _ = tiny_run(*data, f"data.source.path={scored}", "data.drop_top_ches=0.5")
    assert summary["data"]["ches_filter"]["source"] == "pair file" and summary["data"]["ches_filter"]["dropped"] == 5
