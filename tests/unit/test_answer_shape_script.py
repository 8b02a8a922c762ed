"""scripts/answer_shape.py: the form of the greedy answers before and after training, per loss over seeds."""

from __future__ import annotations

import json

import yaml

from tests.helpers.config import script_module


def _answers(path, outputs_correct):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"output": o, "correct": c}) + "\n" for o, c in outputs_correct))


def test_lengths_forms_and_accuracy_are_pooled_over_seeds(tmp_path):
    script = script_module("answer_shape")
    ramble = "To solve this problem, we need to find the sum of 4 and 12. " * 2
    for n, seed in enumerate((0, 1)):
        run = tmp_path / str(n)
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": {"key": "dpo"}, "seed": seed}))
        _answers(run / "verified_before" / "arith.jsonl", [(ramble, False), ("4 + 12 = 16", True)])
        _answers(run / "verified" / "arith.jsonl", [("So, the answer is 16.", True), ("4 + 12 = 16", True)])
    (tmp_path / "2" / ".hydra").mkdir(parents=True)  # a run that did not finish: left out
    (tmp_path / "2" / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"loss": {"key": "dpo"}, "seed": 2}))
    row = [line for line in script.table(tmp_path).splitlines() if line.startswith("| dpo")][0]
    cells = [c.strip() for c in row.split("|")[1:-1]]
    before = (len(ramble) + len("4 + 12 = 16")) / 2
    after = (len("So, the answer is 16.") + len("4 + 12 = 16")) / 2
    assert cells == ["dpo", "0,1", "4", f"{before:.0f} → {after:.0f}", "50% → 100%", "0% → 50%", "50.0% → 100.0%"]
