"""Preference pairs from verified samples: counts, drops, chosen/rejected labels, files and provenance."""

from __future__ import annotations

import json

import pytest

from prefopt.errors import ConfigError, DataError
from prefopt.mathloop.stages.sampling import PairStats, build_pairs, provenance_path, validate_sampling, write_pairs
from prefopt.verify import Verdict

OK = Verdict(True, "correct", "1")
BAD = Verdict(False, "wrong", "2")
NONE = Verdict(False, "no_answer", None)
SLOW = Verdict(False, "timeout", None)

PROMPTS = ["p0", "p1", "p2", "p3"]
SAMPLES = [
    ["right a", "right b", "wrong a", "rambling"],  # mixed: 2 correct, 1 wrong, 1 no answer
    ["right c", "right d"],  # all correct: dropped
    ["wrong b", "stuck"],  # all wrong (one timed out): dropped
    ["right e", "wrong c"],  # mixed: exactly one pair possible
]
VERDICTS = [[OK, OK, BAD, NONE], [OK, OK], [BAD, SLOW], [OK, BAD]]
CORRECT_TEXTS = {s for ss, vs in zip(SAMPLES, VERDICTS) for s, v in zip(ss, vs) if v.correct}


def test_counts_and_drops():
    pairs, stats = build_pairs(PROMPTS, SAMPLES, VERDICTS, seed=0)
    assert stats == PairStats(
        prompts=4,
        samples=10,
        correct=5,
        wrong=3,
        no_answer=1,
        timeout=1,
        error=0,
        dropped_all_correct=1,
        dropped_all_wrong=1,
        pairs=2,
    )
    assert stats.correct + stats.wrong + stats.no_answer + stats.timeout + stats.error == stats.samples
    assert [p["prompt_index"] for p in pairs] == [0, 3]
    assert pairs[1] == {
        "prompt": "p3",
        "chosen": "right e",
        "rejected": "wrong c",
        "pair_id": "3-0-1",
        "prompt_index": 3,
        "chosen_index": 0,
        "rejected_index": 1,
    }


def test_chosen_always_correct_and_rejected_always_wrong():
    pairs, stats = build_pairs(PROMPTS, SAMPLES, VERDICTS, seed=1, max_pairs_per_prompt="all")
    assert stats.pairs == len(pairs) == 2 * 2 + 1  # p0: {right a, right b} x {wrong a, rambling}; p3: one
    for p in pairs:
        i = p["prompt_index"]
        assert p["prompt"] == PROMPTS[i]
        assert VERDICTS[i][p["chosen_index"]].correct and p["chosen"] == SAMPLES[i][p["chosen_index"]]
        assert not VERDICTS[i][p["rejected_index"]].correct and p["rejected"] == SAMPLES[i][p["rejected_index"]]
        assert p["chosen"] in CORRECT_TEXTS and p["rejected"] not in CORRECT_TEXTS
    assert len({p["pair_id"] for p in pairs}) == len(pairs)
    assert {p["rejected"] for p in pairs if p["prompt_index"] == 0} == {"wrong a", "rambling"}


def test_deterministic_with_a_seed():
    many = [["r1", "r2", "r3", "w1", "w2", "w3"]] * 20
    verdicts = [[OK, OK, OK, BAD, BAD, NONE]] * 20
    prompts = [f"q{i}" for i in range(20)]
    first, _ = build_pairs(prompts, many, verdicts, seed=7, max_pairs_per_prompt=2)
    again, _ = build_pairs(prompts, many, verdicts, seed=7, max_pairs_per_prompt=2)
    other, _ = build_pairs(prompts, many, verdicts, seed=8, max_pairs_per_prompt=2)
    assert first == again
    assert first != other
    assert len(first) == 40
    for i in range(20):  # two distinct pairs per prompt
        mine = [(p["chosen"], p["rejected"]) for p in first if p["prompt_index"] == i]
        assert len(set(mine)) == 2


def test_repeated_samples_give_no_repeated_pairs():
    pairs, stats = build_pairs(["q"], [["a", "a", "b", "b"]], [[OK, OK, BAD, BAD]], max_pairs_per_prompt="all")
    assert [(p["chosen"], p["rejected"]) for p in pairs] == [("a", "b")]
    assert stats.correct == 2 and stats.wrong == 2


def test_bad_input_is_refused():
    with pytest.raises(DataError, match="prompt 0: 2 samples but 1 verdicts"):
        build_pairs(["q"], [["a", "b"]], [[OK]])
    with pytest.raises(DataError, match="2 prompts, 1 sample lists"):
        build_pairs(["q", "r"], [["a"]], [[OK]])
    with pytest.raises(DataError, match="prompt 0, sample 1"):
        build_pairs(["q"], [["a", "b"]], [[OK, True]])
    with pytest.raises(ConfigError, match="max_pairs_per_prompt"):
        build_pairs(["q"], [["a"]], [[OK]], max_pairs_per_prompt=0)


@pytest.mark.parametrize("k", [1, 0, 2.5, True])
def test_validate_sampling_refuses_k(k):
    with pytest.raises(ConfigError, match=r"pairs\.k"):
        validate_sampling(k, 0.8)


@pytest.mark.parametrize("temperature", [0, 0.0, -1.0, None])
def test_validate_sampling_refuses_temperature(temperature):
    with pytest.raises(ConfigError, match=r"pairs\.temperature"):
        validate_sampling(4, temperature)


def test_the_smallest_valid_sampling_settings_make_pairs():
    """k=2 at an integer temperature is accepted: one right and one wrong sample make one pair."""
    validate_sampling(2, 1)
    pairs, stats = build_pairs(["q"], [["\\boxed{1}", "\\boxed{2}"]], [[OK, BAD]], seed=0)
    assert stats.pairs == len(pairs) == 1 and pairs[0]["chosen"] == "\\boxed{1}"


def test_write_pairs_round_trip_and_provenance(tmp_path):
    pairs, stats = build_pairs(PROMPTS, SAMPLES, VERDICTS, seed=0, max_pairs_per_prompt="all")
    path = tmp_path / "cache" / "pairs.jsonl"
    provenance = {"policy": "outputs/warmup/policy", "k": 4, "temperature": 0.8, "seed": 0}
    meta_path = write_pairs(path, pairs, provenance, stats=stats)

    assert meta_path == provenance_path(path) == tmp_path / "cache" / "pairs.jsonl.provenance.json"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == len(pairs) == 5
    for row, pair in zip(rows, pairs):
        assert set(row) == {"prompt", "chosen", "rejected", "pair_id"}
        assert (row["prompt"], row["chosen"], row["rejected"], row["pair_id"]) == (
            pair["prompt"],
            pair["chosen"],
            pair["rejected"],
            pair["pair_id"],
        )

    meta = json.loads(meta_path.read_text())
    assert meta["policy"] == "outputs/warmup/policy"
    assert (meta["k"], meta["temperature"], meta["seed"]) == (4, 0.8, 0)
    assert meta["file"] == "pairs.jsonl" and meta["num_pairs"] == 5
    assert meta["counts"] == stats.as_dict()
    assert meta["counts"]["dropped_all_correct"] == 1 and meta["counts"]["dropped_all_wrong"] == 1
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_write_pairs_keeps_unicode_and_chat_prompts(tmp_path):
    pairs = [
        {
            "prompt": [{"role": "user", "content": "½ + ½ = ?"}],
            "chosen": "\\boxed{1} ✓",
            "rejected": "\\boxed{2}",
            "pair_id": "0-0-1",
        }
    ]
    write_pairs(tmp_path / "p.jsonl", pairs, {"k": 2})
    row = json.loads((tmp_path / "p.jsonl").read_text(encoding="utf-8"))
    assert row["prompt"][0]["content"] == "½ + ½ = ?" and row["chosen"].endswith("✓")
    assert json.loads((tmp_path / "p.jsonl.provenance.json").read_text())["num_pairs"] == 1
