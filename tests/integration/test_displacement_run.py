"""Every run with evaluation writes the held-out pairs' token-level displacement: the file per evaluation, the
`eval/displacement/...` scalars, and the report's figures and worst pairs; with the reference cache and with a live
reference, in every batch layout, to the same values; a reference-free loss against its starting policy."""

from __future__ import annotations

import json

import numpy as np
import pytest

from prefopt import displacement
from prefopt.reporting.sweep import write_report


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Four tiny runs: live reference in the shared-prefix and flat layouts, the cache with shared-prefix and
    padded rows."""
    from prefopt.run import train
    from tests.helpers.config import compose_cfg

    root = tmp_path_factory.mktemp("displacement")
    settings = {
        "live": ["reference_cache=null"],
        "live_flat": ["reference_cache=null", "train.packing=flat"],
        "cached": [f"reference_cache={root / 'cache'}"],
        "cached_padded": [f"reference_cache={root / 'cache_padded'}", "train.packing=false"],
    }
    return {name: (train(compose_cfg(o), run_dir=root / name), root / name) for name, o in settings.items()}


def test_every_evaluation_writes_each_pair_with_its_texts(runs):
    summary, run_dir = runs["live"]
    files = displacement.steps(run_dir)
    assert sorted(files) == [2, 3]  # eval_every=2, and the final evaluation at step 3
    records = displacement.read(files[3])
    assert len(records) == 8 and len({r["pair_id"] for r in records}) == 8
    for r in records:
        assert r["step"] == 3 and "What is" in r["prompt_text"] and r["chosen_text"] and r["rejected_text"]
        assert len(r["chosen_token_delta"]) == r["chosen_tokens"] and len(r["chosen_bins"]) == displacement.BINS
        assert r["chosen_delta"] == pytest.approx(r["chosen_logp"] - r["chosen_ref_logp"], abs=1e-6)
        assert r["chosen_delta"] == pytest.approx(sum(r["chosen_token_delta"]), abs=1e-3)
    # the per-pair changes agree with the engine's own mean over the pairs
    mean = np.mean([r["chosen_delta_per_token"] for r in records])
    assert mean == pytest.approx(summary["metrics"]["eval/dcr/chosen_logp_delta_per_token"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", ["live", "cached"])
def test_the_scalars_reach_metrics_and_summary(runs, name):
    summary, run_dir = runs[name]
    rows = {r["step"]: r for r in _metrics(run_dir) if "eval/loss" in r}
    assert sorted(rows) == [2, 3]
    for row in rows.values():
        assert 0.0 <= row["eval/displacement/chosen_fell"] <= 1.0
        assert "eval/displacement/chosen_delta_per_token_p50" in row
    final = displacement.summary(displacement.read(displacement.steps(run_dir)[3]))
    for key, value in final.items():
        assert summary["metrics"][key] == pytest.approx(value)
    assert (
        json.loads((run_dir / "summary.json").read_text())["metrics"]["eval/displacement/chosen_fell"]
        == (final["eval/displacement/chosen_fell"])
    )


def test_cache_and_live_reference_in_every_layout_give_the_same_changes(runs):
    by_run = {name: displacement.read(displacement.steps(d)[2]) for name, (_, d) in runs.items()}
    base = by_run["live"]
    for name, records in by_run.items():
        assert [r["pair_id"] for r in records] == [r["pair_id"] for r in base], name
        for a, b in zip(records, base):
            assert a["chosen_ref_logp"] == pytest.approx(b["chosen_ref_logp"], abs=1e-4), name
            np.testing.assert_allclose(a["chosen_token_delta"], b["chosen_token_delta"], atol=2e-4, err_msg=name)
            np.testing.assert_allclose(a["rejected_token_delta"], b["rejected_token_delta"], atol=2e-4, err_msg=name)


def test_the_report_draws_the_distributions_and_lists_the_worst_pairs(runs, capsys):
    _, run_dir = runs["cached"]
    written = write_report([run_dir], echo=True)
    names = {p.name for p in written["files"]["plots"]}
    assert {"displacement_hist.png", "displacement_profile.png"} <= names
    for name in ("displacement_hist.png", "displacement_profile.png"):
        assert (run_dir / name).read_bytes()[:4] == b"\x89PNG"
    md = (run_dir / "report.md").read_text()
    assert "## Token-level displacement on the held-out pairs" in md and "most displaced pairs" in md
    worst = displacement.most_displaced(displacement.read(displacement.steps(run_dir)[3]), 5)
    assert all(r["pair_id"] in md for r in worst)
    assert worst[0]["pair_id"] in capsys.readouterr().out


def test_a_reference_free_loss_is_measured_against_its_starting_policy(runs, tmp_path):
    """SimPO has no reference: its held-out pairs' starting log-probs are recorded before the first step, so its
    `ref_logp` equals the live DPO run's reference (the same initial weights and pairs), and a resumed run keeps
    them from its checkpoint instead of recording the resumed weights."""
    from prefopt.run import train
    from tests.helpers.config import compose_cfg

    summary = train(compose_cfg(["loss=simpo"]), run_dir=tmp_path / "simpo")
    live = displacement.read(displacement.steps(runs["live"][1])[3])
    train(compose_cfg(["loss=simpo", "steps=2", "save_every=2"]), run_dir=tmp_path / "cut")
    resumed = train(compose_cfg(["loss=simpo", "save_every=2"]), run_dir=tmp_path / "cut")
    assert resumed["resumed_from_step"] == 2
    for name in ("simpo", "cut"):
        records = displacement.read(displacement.steps(tmp_path / name)[3])
        assert [r["pair_id"] for r in records] == [r["pair_id"] for r in live], name
        for a, b in zip(records, live):
            for side in ("chosen", "rejected"):
                assert a[f"{side}_ref_logp"] == pytest.approx(b[f"{side}_ref_logp"], abs=1e-4), (name, side)
        assert max(abs(r["chosen_delta"]) for r in records) > 1e-3, name  # the policy moved from its start
    assert 0.0 <= summary["metrics"]["eval/displacement/chosen_fell"] <= 1.0
