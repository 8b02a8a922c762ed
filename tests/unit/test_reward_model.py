"""The reward stage's pieces on hand-worked numbers: the Bradley–Terry loss, the reward read-out, the agreement."""

from __future__ import annotations

import math

import pytest
import torch

from prefopt.errors import ConfigError
from prefopt.losses import PairLogps
from prefopt.mathloop.reward.bradley_terry import RewardConfig, bradley_terry, checker_agreement


def test_bradley_terry_hand_worked():
    ones = torch.ones(2)
    out = bradley_terry(PairLogps(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 0.0]), ones, ones))
    # -log sigmoid(1) = log(1 + e^-1) = 0.313262; -log sigmoid(0) = log 2
    assert out.loss.tolist() == pytest.approx([math.log1p(math.exp(-1)), math.log(2)], abs=1e-6)
    r = torch.tensor([0.5], requires_grad=True)
    bradley_terry(PairLogps(r, torch.tensor([0.5]), torch.ones(1), torch.ones(1))).loss.sum().backward()
    assert r.grad.item() == pytest.approx(-0.5)  # d/dr_w of -log sigmoid(r_w - r_l) at a zero margin


def test_checker_agreement_hand_worked():
    # pair 0: chosen right, scored higher: agrees; pair 1: checker says rejected is right, scored lower: disagrees;
    # pair 2: both right: not counted; pair 3: equal scores: half
    out = checker_agreement(
        [2.0, 3.0, 1.0, 0.0], [1.0, 1.0, 5.0, 0.0], [True, False, True, True], [False, True, True, False]
    )
    assert out == {"agreement": 0.5, "pairs": 3}


def test_reward_config_refuses_bad_values():
    with pytest.raises(ConfigError, match=r"reward.batch_size \(10\) must be divisible"):
        RewardConfig(batch_size=10, micro_batch_size=4)
    with pytest.raises(ConfigError, match="reward.lr must be > 0"):
        RewardConfig(lr=0)


def test_reward_config_refuses_bad_sources_and_sampling():
    with pytest.raises(
        ConfigError, match=r"reward.source must be one of contrasts, data, samples, both \(got 'policy'\)"
    ):
        RewardConfig(source="policy")
    for bad in (0, 2.5, True):
        with pytest.raises(ConfigError, match=r"reward.contrasts_per_problem must be an integer >= 1"):
            RewardConfig(contrasts_per_problem=bad)
    with pytest.raises(ConfigError, match=r"reward.k must be an integer >= 2"):
        RewardConfig(k=1)
    with pytest.raises(ConfigError, match=r"reward.temperature must be > 0"):
        RewardConfig(temperature=0)
    with pytest.raises(ConfigError, match=r"reward.pairs_per_prompt must be an integer >= 1 or 'all'"):
        RewardConfig(pairs_per_prompt=0)


def test_clustered_share_resamples_whole_problems():
    from prefopt.stats import clustered_share

    # problem 0: 3 of 4 sample pairs agree, problem 1: 1 of 2, problem 2: 0 of 2 -> 4/8 pooled
    interval = clustered_share([3, 1, 0], [4, 2, 2])
    assert interval.estimate == pytest.approx(0.5)
    assert interval.n == 3 and "over problems" in interval.method
    # a resample is a multiset of whole problems: its share lies between the smallest (0) and the largest (3/4)
    assert 0.0 <= interval.low < 0.5 < interval.high <= 0.75
    same = clustered_share([2, 2], [2, 2])  # every pair agrees: nothing varies
    assert (same.estimate, same.low, same.high) == (1.0, 1.0, 1.0)
    assert clustered_share([], []) is None


class _Stub:
    """Samples: for problem i, the texts given; the checker compares the boxed answer with the gold."""

    def __init__(self, texts):
        self.texts, self.calls = texts, []

    def generate(self, prompts, n, temperature, seed):
        from prefopt.generate import Completions

        self.calls.append((len(prompts), n, temperature, seed))
        return Completions([t[:n] for t in self.texts], [[True] * n for _ in self.texts])


def test_checker_pairs_label_samples_by_the_answer_checker(monkeypatch):
    from types import SimpleNamespace

    from prefopt.mathloop.stages import reward_training as reward_stage
    from prefopt.verify import AnswerChecker

    rows = [{"problem": "What is 1 + 1?", "answer": "2"}, {"problem": "What is 2 + 2?", "answer": "4"}]
    stub = _Stub([["\\boxed{2}", "\\boxed{3}", "\\boxed{5}"], ["\\boxed{4}", "\\boxed{4}", "\\boxed{4}"]])
    checker = AnswerChecker(workers=1)
    loop = SimpleNamespace(
        reward=RewardConfig(k=3, temperature=0.9),
        load=lambda spec, hw: (None, None),
        render=lambda tok, problem: f"<{problem}>",
        generator=lambda m, t, s: stub,
        checker=lambda: checker,
    )
    try:
        pairs, counts = reward_stage.checker_pairs(loop, (None, None, None), rows, seed=7, limit="all")
        # the agreement is measured on answers drawn as the labeller draws its own: its k and temperature
        reward_stage.checker_pairs(loop, (None, None, None), rows, seed=8, limit="all", k=2, temperature=0.5)
    finally:
        checker.close()
    assert stub.calls == [(2, 3, 0.9, 7), (2, 2, 0.5, 8)]
    # problem 0: one right, two wrong -> two pairs; problem 1: all right -> dropped
    assert [(p["chosen"], p["rejected"], p["prompt_index"]) for p in pairs] == [
        ("\\boxed{2}", "\\boxed{3}", 0),
        ("\\boxed{2}", "\\boxed{5}", 0),
    ]
    assert counts["correct"] == 4 and counts["wrong"] == 2 and counts["dropped_all_correct"] == 1


def test_unseen_keeps_pairs_whose_answers_were_not_trained_on():
    from prefopt.data.sources import PreferencePair
    from prefopt.mathloop.stages.reward_training import unseen

    trained = [PreferencePair(prompt="p", chosen="a", rejected="b", pair_id="0")]
    pairs = [
        {"prompt": "p", "chosen": "a", "rejected": "c"},  # chosen trained on: out
        {"prompt": "p", "chosen": "d", "rejected": "c"},  # both new: kept
        {"prompt": "q", "chosen": "a", "rejected": "b"},
    ]  # another prompt: kept
    assert unseen(pairs, trained) == pairs[1:]


def test_the_reward_stage_refuses_data_without_gold_answers():
    from prefopt.data.arith import ArithmeticData
    from prefopt.mathloop.stages.reward_training import generated_rows

    class Pairs:  # a preference file: chosen/rejected, no problems with answers
        def load(self):
            return [], [], {}

    with pytest.raises(ConfigError, match=r"mathloop.reward=true needs problems with gold answers .* not Pairs"):
        generated_rows(Pairs(), "eval")
    rows = generated_rows(ArithmeticData(), "eval")
    assert len(rows) == 50 and {"problem", "answer"} <= set(rows[0])


def test_plausible_mistakes_are_wrong_distinct_and_sorted():
    from prefopt.data.arith import plausible_mistakes

    # 7 + 5 = 12: off by 1, 2, 10; the operands 7 and 5; the other operator's 7 - 5 = 2
    assert plausible_mistakes(7, "+", 5) == [2, 5, 7, 10, 11, 13, 14, 22]
    # 3 - 3 = 0: the operand 3 and off-by-one results coincide in a set; 0 itself never appears
    assert plausible_mistakes(3, "-", 3) == [-10, -2, -1, 1, 2, 3, 6, 10]


def test_contrast_pairs_box_the_right_answer_against_a_plausible_mistake():
    """Every pair is right against wrong by the answer checker; each mistake comes clean and with a noisy working;
    only training problems appear; the same seed gives the same pairs."""
    import re

    from prefopt.data.arith import ArithmeticData, plausible_mistakes, solve
    from prefopt.verify import AnswerChecker

    data = ArithmeticData(n_train=20, n_eval=10)
    pairs = data.contrast_pairs(per_problem=3, seed=5)
    train, held = data.split_problems()
    assert len(pairs) == 20 * 3 * 2
    assert {p.prompt for p in pairs} == {f"What is {a} {op} {b}?" for a, op, b in train}
    assert not {p.prompt for p in pairs} & {f"What is {a} {op} {b}?" for a, op, b in held}
    golds = {f"What is {a} {op} {b}?": solve(a, op, b) for a, op, b in train}
    checker = AnswerChecker(workers=1)
    try:
        ok_c = checker.check_many([p.chosen for p in pairs], [str(golds[p.prompt]) for p in pairs])
        ok_r = checker.check_many([p.rejected for p in pairs], [str(golds[p.prompt]) for p in pairs])
    finally:
        checker.close()
    assert all(v.correct for v in ok_c) and not any(v.correct for v in ok_r)
    working = re.compile(r"^(\d+) ([+-]) (\d+) = (-?\d+)\. The answer is \\boxed\{(-?\d+)\}\.$")
    clean, noisy = pairs[0::2], pairs[1::2]
    for c, n in zip(clean, noisy):
        a, op, b = re.match(r"What is (\d+) ([+-]) (\d+)\?", c.prompt).groups()
        right = solve(int(a), op, int(b))
        # the clean pair restates the question; both boxes equal the stated results
        assert c.chosen == f"{a} {op} {b} = {right}. The answer is \\boxed{{{right}}}."
        wrong = int(working.match(c.rejected).group(5))
        assert c.rejected == f"{a} {op} {b} = {wrong}. The answer is \\boxed{{{wrong}}}."
        assert wrong in plausible_mistakes(int(a), op, int(b))
        # its noisy twin boxes the same right and wrong answers under other workings
        assert int(working.match(n.chosen).group(5)) == right and int(working.match(n.rejected).group(5)) == wrong
        assert c.pair_id + "-noisy" == n.pair_id
    # per problem, distinct mistakes
    by_prompt = {}
    for c in clean:
        by_prompt.setdefault(c.prompt, []).append(c.rejected)
    assert all(len(set(v)) == 3 for v in by_prompt.values())
    # the noise is real: many noisy workings restate the question wrongly or state another result than the box
    off = [
        n
        for n in noisy
        if not n.chosen.startswith(re.match(r"What is (.*)\?", n.prompt).group(1) + " = ")
        or working.match(n.chosen).group(4) != working.match(n.chosen).group(5)
    ]
    assert len(off) > len(noisy) // 2
    assert data.contrast_pairs(per_problem=3, seed=5) == pairs and data.contrast_pairs(per_problem=3, seed=6) != pairs
    # more than a problem has: all of its mistakes, no repeats
    assert len(ArithmeticData(n_train=1, n_eval=1).contrast_pairs(per_problem=50, seed=0)) == 2 * len(
        plausible_mistakes(*ArithmeticData(n_train=1, n_eval=1).split_problems()[0][0])
    )


def test_the_contrasts_source_needs_data_that_makes_contrast_pairs():
    from types import SimpleNamespace

    from prefopt.data.arith import ArithmeticData
    from prefopt.mathloop.stages.reward_training import training_rows

    class Pairs:  # preference data with gold answers but no contrast pairs
        def load(self):
            return [], [], {}

    loop = SimpleNamespace(reward=RewardConfig(source="contrasts", contrasts_per_problem=2, seed=3))
    with pytest.raises(
        ConfigError, match=r"reward.source=contrasts needs data that makes contrastive pairs .* not Pairs"
    ):
        training_rows(loop, None, Pairs())
    rows, held, counts = training_rows(loop, None, ArithmeticData())
    assert rows == ArithmeticData().contrast_pairs(2, 3) and len(held) == 50
    assert counts == {"data_pairs": 0, "contrast_pairs": 150 * 2 * 2}


def test_rm_agreement_script_tabulates_each_seed_from_its_reward_record(tmp_path, monkeypatch, capsys):
    """scripts/rm_agreement.py on a tiny schedule: one row per reward seed, read back from that seed's cached
    reward.json, and the mean row; the warm-up is shared by the seeds."""
    import json

    from tests.helpers.config import script_module

    monkeypatch.chdir(tmp_path)
    script = script_module("rm_agreement")
    script.main(
        [
            "--seeds",
            "0,1",
            f"mathloop.cache_dir={tmp_path / 'cache'}",
            "warmup.steps=5",
            "reward.steps=3",
            "pairs.k=2",
            "data.source.n_train=12",
            "data.source.n_eval=6",
            "reward.contrasts_per_problem=2",
            "hardware.threads=1",
        ]
    )
    out = capsys.readouterr().out
    records = {
        json.loads(p.read_text())["reward"]["seed"]: json.loads(p.read_text())
        for p in (tmp_path / "cache" / "reward").glob("*/reward.json")
    }
    assert set(records) == {0, 1} and len(list((tmp_path / "cache" / "warmup").glob("*/warmup.json"))) == 1
    rows = [line for line in out.splitlines() if line.startswith("| ")]
    assert rows[0].startswith("| reward.seed | source | train pairs | held-out data pairs")
    for seed in (0, 1):
        row = next(r for r in rows if r.startswith(f"| {seed} | contrasts | {12 * 2 * 2} | "))
        assert script.cell(records[seed]["agreement"]) in row
        assert script.cell(records[seed]["fresh_answer_agreement"]) in row
        assert records[seed]["agreement"]["pairs"] == 6
    mean = (records[0]["agreement"]["agreement"] + records[1]["agreement"]["agreement"]) / 2
    assert rows[-1].startswith(f"| mean of 2 | | | {mean:.3f} | ")
    assert script.cell({"agreement": float("nan"), "pairs": 0}) == "- (0)" and script.mean([float("nan")]) == "-"


def test_the_agreement_is_measured_as_the_labeller_samples_and_keyed_by_it():
    """The reward stage measures its agreement on answers drawn at the pair labeller's k and temperature, so a cached
    reward model measured at another temperature is not reused for a run whose labeller samples differently."""
    from prefopt.compose import build
    from prefopt.mathloop.stages.reward_training import measure_sampling, reward_key
    from tests.helpers.config import compose_cfg

    def plan(*overrides):
        return build(compose_cfg(["experiment=rm_arith", *overrides], tiny=False), check_inputs=False)

    base = plan()
    spec = base.model
    assert measure_sampling(base.loop) == {"k": 8, "temperature": 0.7} and base.loop.reward.temperature == 1.0
    hotter = plan("pairs.temperature=1.0")
    assert measure_sampling(hotter.loop) == {"k": 8, "temperature": 1.0}
    assert reward_key(hotter.loop, spec, hotter.data) != reward_key(base.loop, spec, base.data)
    # what the reward model trains on is the same: only the measurement moved
    assert vars(hotter.loop.reward) == vars(base.loop.reward)


def saved_tiny_policy(path):
    """A tiny qwen2 character-tokenizer causal LM saved at `path` (the reward stage's starting point); its tokenizer."""
    from prefopt.models import ModelSpec, load_model, load_tokenizer
    from tests.helpers.config import TINY_SPEC

    spec = ModelSpec(**TINY_SPEC, tokenizer_family="qwen")
    tok = load_tokenizer(spec)
    load_model(spec, vocab_size=len(tok)).save_pretrained(path)
    return tok


def test_reward_config_refuses_a_bad_moving_average():
    for bad in (0, 1, 1.5, -0.1, True, "0.99"):
        with pytest.raises(ConfigError, match=r"reward.ema must be a decay between 0 and 1, or null"):
            RewardConfig(ema=bad)
    assert RewardConfig(ema=None).ema is None and RewardConfig(ema=0.995).ema == 0.995


def test_keep_average_follows_the_ema_rule_and_resumes_from_the_optimizer_state():
    """keep_average on hand-worked numbers: SGD at lr 0.1 on sum(w) moves w by -0.1 a step (1, 0.9, 0.8, 0.7);
    the average at decay 0.5 starts at the weights before the first step: 0.95, 0.875, 0.7875. Kept in the
    optimizer's state, it survives a state_dict round trip (a resumed stage)."""
    from prefopt.mathloop.reward.bradley_terry import keep_average, use_average

    def sgd(w):
        return keep_average(torch.optim.SGD([w], lr=0.1), 0.5)

    def step(opt, w):
        opt.zero_grad()
        w.sum().backward()
        opt.step()

    w = torch.nn.Parameter(torch.ones(2))
    opt = sgd(w)
    for expected in (0.95, 0.875):
        step(opt, w)
        assert opt.state[w]["ema"].tolist() == pytest.approx([expected] * 2)
    resumed_w = torch.nn.Parameter(w.detach().clone())
    resumed = sgd(resumed_w)
    resumed.load_state_dict(opt.state_dict())
    step(resumed, resumed_w)
    assert resumed_w.tolist() == pytest.approx([0.7] * 2)
    assert use_average(resumed) and resumed_w.tolist() == pytest.approx([0.7875] * 2)
    assert not use_average(torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=0.1))  # nothing kept: unchanged


def test_keep_average_waits_for_a_parameters_first_gradient():
    """A parameter without a gradient in the first step (AdamW leaves its state empty then) gets its average only
    after the first step that updates it, starting from its weights before that step; AdamW still sets up its own
    state for it (a state entry made earlier would make AdamW take it for initialised: KeyError 'exp_avg')."""
    from prefopt.mathloop.reward.bradley_terry import keep_average, use_average

    used, idle = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.full((2,), 3.0))
    opt = keep_average(torch.optim.AdamW([used, idle], lr=0.1, weight_decay=0.0), 0.5)
    used.sum().backward()
    opt.step()
    assert "ema" in opt.state[used] and not opt.state.get(idle)
    before = idle.detach().clone()
    opt.zero_grad()
    (used.sum() + idle.sum()).backward()
    opt.step()  # AdamW's first step on `idle`: w - lr * sign(g) = 2.9
    assert set(opt.state[idle]) == {"step", "exp_avg", "exp_avg_sq", "ema"}
    torch.testing.assert_close(opt.state[idle]["ema"], 0.5 * before + 0.5 * idle.detach())
    assert use_average(opt) and idle.tolist() == pytest.approx([2.95, 2.95])


def test_keep_average_refuses_weights_below_float32():
    from prefopt.mathloop.reward.bradley_terry import keep_average

    w = torch.nn.Parameter(torch.ones(2, dtype=torch.bfloat16))
    with pytest.raises(ConfigError, match=r"reward.ema averages float32 weights; these are torch.bfloat16"):
        keep_average(torch.optim.SGD([w], lr=0.1), 0.99)


def test_the_reward_stage_exports_the_moving_average_of_its_weights(tmp_path):
    """Through the engine's Trainer: with reward.ema the exported model holds the moving average of the weights
    after each step (the same training path as without it), and a stage stopped at step 2 and resumed to step 4
    exports the same average as one run straight through (the average travels in the checkpoint)."""
    from functools import partial

    from prefopt.data.arith import ArithmeticData
    from prefopt.data.batching import tokenize_pairs
    from prefopt.hardware import Hardware
    from prefopt.mathloop.reward.bradley_terry import reward_model_from, train_reward_model

    tok = saved_tiny_policy(tmp_path / "policy")
    train, _, _ = ArithmeticData(n_train=12, n_eval=2).load()
    pairs, _ = tokenize_pairs(train, tok, max_length=128, max_prompt_length=64)
    decay, seen = 0.5, []

    def adamw(params, lr):
        params = list(params)
        opt = torch.optim.AdamW(params, lr=lr)

        def snapshot(*_):
            seen.append([p.detach().clone() for p in params])

        opt.register_step_pre_hook(lambda *_: None if seen else snapshot())
        opt.register_step_post_hook(snapshot)
        return opt

    def trained(run_dir, steps, ema):
        model = reward_model_from(tmp_path / "policy", tok.pad_token_id, seed=0)  # the same head every time
        config = RewardConfig(
            steps=steps, batch_size=4, micro_batch_size=4, lr=1e-2, warmup_steps=0, ema=ema, progress=False
        )
        result = train_reward_model(
            model, pairs, [], tok.pad_token_id, config, partial(adamw), Hardware(device="cpu"), tmp_path / run_dir
        )
        return [p.detach().clone() for p in model.parameters() if p.requires_grad], result["trainer"]

    last, _ = trained("plain", 4, None)
    assert len(seen) == 5  # the weights before the first step and after each of the 4
    expected = seen[0]
    for weights in seen[1:]:
        expected = [decay * a + (1 - decay) * w for a, w in zip(expected, weights)]
    straight, trainer = trained("straight", 4, decay)
    for got, want, _final in zip(straight, expected, last):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert any(not torch.allclose(got, final) for got, final in zip(straight, last))  # not the last step's weights
    trainer.export(tmp_path / "exported")
    from transformers import AutoModelForSequenceClassification

    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "exported")
    torch.testing.assert_close(reloaded.score.weight, straight[-1])
    trained("resumed", 2, decay)
    resumed, again = trained("resumed", 4, decay)
    assert again.resumed_from == 2  # it went on from the step-2 checkpoint, not from scratch
    for got, want in zip(resumed, straight):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_the_reward_head_is_drawn_from_the_reward_seed(tmp_path):
    """The reward model's random head comes from reward.seed alone: the same seed gives the same head whatever the
    process's random state (a warm-up trained in this process or read from the cache leaves different states), another
    seed another head, and the process's random state is not moved."""
    from prefopt.mathloop.reward.bradley_terry import reward_model_from

    tok = saved_tiny_policy(tmp_path)
    torch.manual_seed(1)
    first = reward_model_from(tmp_path, tok.pad_token_id, seed=3).score.weight
    torch.rand(100)  # another random state before the second load
    state = torch.get_rng_state()
    again = reward_model_from(tmp_path, tok.pad_token_id, seed=3).score.weight
    assert torch.equal(torch.get_rng_state(), state)
    other = reward_model_from(tmp_path, tok.pad_token_id, seed=4).score.weight
    assert torch.equal(first, again) and not torch.equal(first, other) and first.abs().sum() > 0
