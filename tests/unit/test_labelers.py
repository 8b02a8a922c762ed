"""Pair labellers: best/worst of hand-made scores, ties, min_gap, counts; a real tiny reward model; bad input."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

from prefopt.errors import ConfigError, DataError
from prefopt.mathloop.judging.judges import RewardModelJudge
from prefopt.mathloop.labelers import LabelContext, RewardModelLabeler, ScoredStats, VerifierLabeler, build_scored_pairs
from prefopt.mathloop.stages.sampling import PairsConfig, sample_pairs, write_pairs
from prefopt.tokenizer import char_tokenizer
from prefopt.verify import Verdict


def test_best_and_worst_with_ties_and_min_gap():
    prompts = ["p0", "p1", "p2", "p3"]
    samples = [["a", "b", "c"], ["d", "e"], ["f", "g", "h"], ["i", "i"]]
    scores = [
        [0.5, 2.0, -1.0],  # chosen b (2.0), rejected c (-1.0): gap 3.0
        [1.0, 1.0],  # tie: dropped
        [0.2, 0.3, 0.1],  # gap 0.2 < min_gap 0.5: dropped
        [4.0, 1.0],
    ]  # same text twice: a tie whatever the scores
    pairs, stats = build_scored_pairs(prompts, samples, scores, min_gap=0.5)
    assert stats == ScoredStats(prompts=4, samples=10, dropped_tie=2, dropped_gap=1, pairs=1)
    assert pairs == [
        {
            "prompt": "p0",
            "chosen": "b",
            "rejected": "c",
            "pair_id": "0-1-2",
            "prompt_index": 0,
            "chosen_index": 1,
            "rejected_index": 2,
            "chosen_score": 2.0,
            "rejected_score": -1.0,
        }
    ]
    kept, stats = build_scored_pairs(prompts, samples, scores, min_gap=0.0)
    assert [p["pair_id"] for p in kept] == ["0-1-2", "2-1-2"] and stats.dropped_gap == 0 and stats.dropped_tie == 2


def test_equal_best_scores_take_the_first_sample():
    pairs, _ = build_scored_pairs(["q"], [["x", "y", "z"]], [[3.0, 3.0, 0.0]])
    assert (pairs[0]["chosen"], pairs[0]["rejected"]) == ("x", "z")


def test_scored_pairs_refuse_bad_shapes():
    with pytest.raises(DataError, match="prompt 0: 2 samples and 1 scores"):
        build_scored_pairs(["q"], [["a", "b"]], [[1.0]])
    with pytest.raises(DataError, match="non-finite"):
        build_scored_pairs(["q"], [["a", "b"]], [[1.0, float("nan")]])


def test_scores_reach_the_pair_file(tmp_path):
    pairs, stats = build_scored_pairs(["q"], [["good", "bad"]], [[1.5, -0.5]])
    write_pairs(tmp_path / "p.jsonl", pairs, {"labeler": {"labeler": "reward_model"}}, stats)
    row = json.loads((tmp_path / "p.jsonl").read_text())
    assert row == {
        "prompt": "q",
        "chosen": "good",
        "rejected": "bad",
        "pair_id": "0-0-1",
        "chosen_score": 1.5,
        "rejected_score": -0.5,
    }
    meta = json.loads((tmp_path / "p.jsonl.provenance.json").read_text())
    assert meta["counts"] == {"prompts": 1, "samples": 2, "dropped_tie": 0, "dropped_gap": 0, "pairs": 1}


class FakeGenerator:
    def __init__(self, texts):
        self.texts = texts

    def generate(self, prompts, n=1, temperature=0.0, seed=0):
        return SimpleNamespace(texts=[t[:n] for t in self.texts], unfinished=0)


class FakeChecker:
    def check_many(self, outputs, golds):
        return [Verdict(o == g, "correct" if o == g else "wrong", o) for o, g in zip(outputs, golds)]


def test_verifier_labeler_through_sample_pairs():
    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    gen = FakeGenerator([["2", "3"], ["4", "4"]])
    ctx = LabelContext(checker=FakeChecker)
    pairs, stats, extra = sample_pairs(gen, rows, ["r0", "r1"], PairsConfig(k=2), VerifierLabeler(), ctx)
    assert [(p["prompt"], p["chosen"], p["rejected"]) for p in pairs] == [("1+1", "2", "3")]
    assert stats.dropped_all_correct == 1 and extra["sample_accuracy"] == 0.75 and extra["unfinished_samples"] == 0


def _tiny_config(**kw):
    return Qwen2Config(
        vocab_size=kw.pop("vocab_size", 128),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        **kw,
    )


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory):
    """A tiny scalar-head reward model saved with save_pretrained, with its (char) tokenizer."""
    path = tmp_path_factory.mktemp("rm")
    tok = char_tokenizer("qwen")
    torch.manual_seed(0)
    model = Qwen2ForSequenceClassification(
        _tiny_config(vocab_size=len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path, model, tok


def test_reward_model_labeler_scores_and_picks(tiny_rm):
    path, model, tok = tiny_rm
    labeler = RewardModelLabeler(name_or_path=str(path), batch_size=3)
    rows = [{"problem": "1+1="}, {"problem": "3+4="}]
    samples = [["2", "11", "7"], ["7", "9", "1"]]
    pairs, stats, extra = labeler.label(rows, samples, LabelContext(checker=None))
    scorer = labeler.scorer("cpu")
    direct = scorer.score(["1+1="] * 3 + ["3+4="] * 3, [s for ss in samples for s in ss])
    # one at a time, no padding: the batched scores must not depend on padding or batch size
    single = [scorer.score([p], [a])[0] for p, a in zip(["1+1="] * 3 + ["3+4="] * 3, [s for ss in samples for s in ss])]
    assert direct == pytest.approx(single, abs=1e-5)
    for p in pairs:
        row = direct[3 * p["prompt_index"] : 3 * p["prompt_index"] + 3]
        assert p["chosen_score"] == pytest.approx(max(row)) and p["rejected_score"] == pytest.approx(min(row))
    assert stats.pairs + stats.dropped_tie + stats.dropped_gap == 2 and extra["reward_model"] == str(path)


def test_reward_model_refuses_a_causal_lm(tmp_path):
    tok = char_tokenizer("qwen")
    Qwen2ForCausalLM(_tiny_config(vocab_size=len(tok))).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=f"reward model {tmp_path}: not a sequence classifier"):
        RewardModelLabeler(name_or_path=str(tmp_path)).scorer("cpu")


def test_reward_model_refuses_a_foreign_tokenizer(tmp_path):
    tok = char_tokenizer("qwen")
    Qwen2ForSequenceClassification(_tiny_config(vocab_size=len(tok) - 10, num_labels=1)).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match="tokenizer has .* tokens but its config says vocab_size"):
        RewardModelLabeler(name_or_path=str(tmp_path)).scorer("cpu")


def test_reward_model_labeler_refuses_bad_settings():
    with pytest.raises(ConfigError, match="pairs.labeler.name_or_path is null"):
        RewardModelLabeler().scorer("cpu")
    assert RewardModelLabeler().with_reward_model("/rm").name_or_path == "/rm"
    assert RewardModelLabeler(name_or_path="org/rm").with_reward_model("/rm").name_or_path == "org/rm"
    with pytest.raises(ConfigError, match="pairs.labeler.min_gap"):
        RewardModelLabeler(name_or_path="x", min_gap=-1)
    with pytest.raises(ConfigError, match="pairs.k must be an integer >= 2"):
        PairsConfig(k=1, labeler=RewardModelLabeler(name_or_path="x"))


def test_labeler_changes_the_pairs_cache_key():
    verifier = PairsConfig(labeler=VerifierLabeler()).fingerprint()
    rm = PairsConfig(labeler=RewardModelLabeler(name_or_path="org/rm", min_gap=0.1)).fingerprint()
    assert verifier["labeler"] == {"labeler": "verifier"}
    assert rm["labeler"]["name_or_path"] == "org/rm" and rm["labeler"]["min_gap"] == 0.1


def test_reward_model_judge_prefers_the_higher_score(tiny_rm):
    path, _, _ = tiny_rm
    judge = RewardModelJudge(name_or_path=str(path), resamples=10)
    rows = judge.judge(["1+1=", "2+2="], ["2", "4"], ["3", "4"], "cpu")
    a, b = rows[0]["policy_score"], rows[0]["baseline_score"]
    assert a != b and rows[0]["preference"] == (1.0 if a > b else 0.0)
    assert rows[1]["policy_score"] == rows[1]["baseline_score"] and rows[1]["preference"] == 0.5  # same answer: tie


def test_sample_agreement_with_the_checker_hand_worked():
    from prefopt.mathloop.labelers import sample_agreement

    rows = [{"problem": "1+1", "answer": "2"}, {"problem": "2+2", "answer": "4"}]
    samples = [["2", "3", "5"], ["4", "4"]]
    # prompt 0: correct "2" (score 1.0) vs wrong "3" (2.0): disagree; vs wrong "5" (1.0): tie, ½. prompt 1: all correct
    out = sample_agreement(rows, samples, [[1.0, 2.0, 1.0], [0.0, 0.0]], FakeChecker())
    assert out == {"agreement": 0.25, "pairs": 2}
