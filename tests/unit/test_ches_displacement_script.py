"""scripts/ches_displacement.py: CHES joined to the measured displacement of each held-out pair, per loss."""

from __future__ import annotations

import json

import numpy as np
import yaml
from scipy import stats as sps

from prefopt import displacement
from tests.helpers.config import script_module


def _run(root, name, loss, seed, ches, deltas, per_token):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": {"key": loss}, "seed": seed}))
    pairs = root / f"pairs-{seed}.jsonl"
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "pair_id": f"{seed}-{i}"} for i in range(len(ches) + 1)]
    for row, score in zip(rows, ches):  # the last pair has no score: it is left out of the join
        row.update(ches=score, ches_length_normalized=score / 10)
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "summary.json").write_text(json.dumps({"mathloop": {"pairs": {"path": str(pairs)}}}))
    records = [
        {"pair_id": r["pair_id"], "chosen_delta": d, "chosen_delta_per_token": t}
        for r, d, t in zip(rows, [*deltas, 0.0], [*per_token, 0.0])
    ]
    displacement.write(run, 4, [{"pair_id": "stale", "chosen_delta": 9.0, "chosen_delta_per_token": 9.0}])
    displacement.write(run, 8, records)  # the last evaluation is the one read


def test_the_table_pools_each_loss_over_seeds_and_reads_the_last_evaluation(tmp_path):
    script = script_module("ches_displacement")
    ches = [[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    deltas = [[-0.1, -0.2, -0.4, -0.8], [-1.0, -1.5, -1.2, -2.0]]
    per_token = [[0.1, 0.0, -0.1, -0.2], [-0.3, -0.2, -0.4, -0.5]]
    for n, seed in enumerate((0, 1)):
        _run(tmp_path, str(n), "dpo", seed, ches[n], deltas[n], per_token[n])
    table = script.table(tmp_path)
    line = [line for line in table.splitlines() if line.startswith("| dpo")][0]
    row = [cell.strip() for cell in line.split("|")[1:-1]]
    assert row[1] == "0,1" and row[2] == "8"  # 4 scored pairs per seed; the unscored and the stale ones are out
    flat = [x for seed in ches for x in seed]
    rho, p = sps.spearmanr(flat, [x for seed in deltas for x in seed])
    assert row[3] == f"{rho:+.2f} (p = {p:.2g})"
    assert rho < 0  # higher CHES, larger fall of the chosen log-probability in this made-up sweep
    tokens = [x for seed in per_token for x in seed]
    normalized = np.array(flat) / 10
    cut = np.quantile(normalized, 0.75)
    top = np.mean([t for t, s in zip(tokens, normalized) if s >= cut])
    rest = np.mean([t for t, s in zip(tokens, normalized) if s < cut])
    assert row[6] == f"{top:+.4f} / {rest:+.4f}"


def test_runs_without_scores_give_no_rows(tmp_path):
    script = script_module("ches_displacement")
    run = tmp_path / "0"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": {"key": "dpo"}, "seed": 0}))
    assert script.run_pairs(run) == []  # no summary, no displacement files
    assert len(script.table(tmp_path).splitlines()) == 2  # the header only
