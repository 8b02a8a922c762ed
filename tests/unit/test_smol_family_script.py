"""scripts/smol_family.py: the starting model's greedy accuracy per problem family, scored by the current checker."""

from __future__ import annotations

import json

import yaml

from tests.helpers.config import script_module


def _family(root, n, largest, ops, answers):
    run = root / str(n)
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        yaml.safe_dump({"data": {"source": {"max_operand": largest, "ops": ops}}})
    )
    (run / "summary.json").write_text(json.dumps({"metrics": {}}))
    (run / "verified").mkdir()
    rows = [{"output": o, "gold": g, "correct": c} for o, g, c in answers]
    (run / "verified" / "arith_val.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_rows_rescore_the_stored_answers_and_say_whether_a_family_fits(tmp_path):
    script = script_module("smol_family")
    # stored as correct by an older checker; today's reads `2 + 40` as a restated question, not 42
    _family(tmp_path, 0, 40, "+", [("1 + 40 = 2 + 40", "42", True), ("So, the answer is 7.", "7", True)])
    _family(
        tmp_path,
        1,
        9,
        "+-",
        [("\\boxed{3}", "3", True), ("So, the answer is 5.", "4", False), ("4 + 4 = 8", "8", True)],
    )
    rows = script.rows(tmp_path)
    assert rows[0][:2] == ["a + b, a, b in 0..40", "1681"]
    assert rows[0][2].startswith("50.0 [") and rows[0][3] == "0" and rows[0][4] == "yes"
    assert rows[1][:2] == ["a + or - b, a, b in 0..9", "200"]
    assert rows[1][2].startswith("66.7 [") and rows[1][3] == "33"
    assert rows[1][4] == "yes; 200 < 1200 problems"  # 25-70%, but no room for the study's splits
