"""KL(π‖π_ref) on the policy's own answers (prefopt.mathloop.policy_kl) against plain forwards on a tiny model."""

from __future__ import annotations

import copy

import pytest
import torch

from prefopt.generate import GenerationConfig, HFGenerator
from prefopt.mathloop.policy_kl import KLEstimator, answer_logps, kl_estimator
from prefopt.models import ModelSpec, load_model, load_tokenizer
from tests.helpers.config import TINY_SPEC

PROMPTS = [
    "<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 10 - 3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWhat is 7 + 7?<|im_end|>\n<|im_start|>assistant\n",
]


@pytest.fixture(scope="module")
def models():
    """(spec, tokenizer, reference, policy): the policy is the reference with every weight nudged."""
    spec = ModelSpec(**TINY_SPEC)
    tok = load_tokenizer(spec)
    reference = load_model(spec, vocab_size=len(tok))
    policy = copy.deepcopy(reference)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(1)
        for p in policy.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return spec, tok, reference, policy


def plain_logp(model, prompt_ids, answer_ids) -> float:
    """log π(answer | prompt) from one full forward of the unpadded sequence and a full log-softmax."""
    ids = torch.tensor([prompt_ids + answer_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()
    logps = torch.log_softmax(logits[0, :-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)
    return float(logps[len(prompt_ids) - 1 :].sum())


def test_answer_logps_equal_plain_forwards_whatever_the_padding(models):
    _, tok, reference, _ = models
    rows = [(tok(p, add_special_tokens=False).input_ids, list(range(40, 40 + n))) for p, n in zip(PROMPTS, (3, 9, 1))]
    got = answer_logps(reference, rows, tok.pad_token_id, batch_size=2)  # padded rows, two batches
    want = [plain_logp(reference, p, a) for p, a in rows]
    assert got.tolist() == pytest.approx(want, abs=1e-4)


def test_the_estimate_on_greedy_and_sampled_answers_is_the_sum_of_logp_differences(models):
    spec, tok, reference, policy = models
    generator = HFGenerator(policy, tok, GenerationConfig(max_new_tokens=8), spec.completion_eos)
    estimator = KLEstimator(policy, reference, tok)
    greedy = generator.generate(PROMPTS, n=1, temperature=0.0)
    sampled = generator.generate(PROMPTS, n=3, temperature=1.0, seed=2)
    assert greedy.token_ids is not None and sampled.token_ids is not None
    # the generated ids are the text's tokens, ending at the first stop token when the answer finished
    for texts, ids, done in zip(greedy.texts, greedy.token_ids, greedy.finished):
        assert tok.decode(ids[0], skip_special_tokens=True) == texts[0]
        assert done[0] == (ids[0][-1] in generator.stop_ids) and not set(ids[0][:-1]) & set(generator.stop_ids)
    got_greedy = estimator.score("greedy", PROMPTS, greedy)
    got_sampled = estimator.score("sampled", PROMPTS, sampled)
    for i, prompt in enumerate(PROMPTS):
        p = tok(prompt, add_special_tokens=False).input_ids
        diff = lambda a, p=p: plain_logp(policy, p, a) - plain_logp(reference, p, a)  # noqa: E731
        assert got_greedy[i] == pytest.approx(diff(greedy.token_ids[i][0]), abs=1e-4)
        want = sum(diff(a) for a in sampled.token_ids[i]) / 3
        assert got_sampled[i] == pytest.approx(want, abs=1e-4)
    metrics = estimator.metrics()
    assert metrics["eval/kl/greedy"] == pytest.approx(sum(got_greedy) / 3)
    assert metrics["eval/kl/sampled"] == pytest.approx(sum(got_sampled) / 3)
    for kind in ("greedy", "sampled"):
        assert metrics[f"eval/kl/{kind}_low"] < metrics[f"eval/kl/{kind}"] < metrics[f"eval/kl/{kind}_high"]


def test_the_policy_equal_to_its_reference_has_kl_zero_exactly(models):
    spec, tok, reference, _ = models
    same = copy.deepcopy(reference)
    estimator = kl_estimator(same, tok, spec, lambda s: load_model(s, vocab_size=len(tok)))
    assert estimator.reference_model is not same  # a fresh copy of the start, loaded from its spec
    completions = HFGenerator(same, tok, GenerationConfig(max_new_tokens=8)).generate(PROMPTS, n=2, temperature=1.0)
    assert estimator.score("sampled", PROMPTS, completions) == [0.0, 0.0, 0.0]
    assert estimator.metrics() == {"eval/kl/sampled": 0.0, "eval/kl/sampled_low": 0.0, "eval/kl/sampled_high": 0.0}


def test_a_lora_policy_is_measured_against_its_base_with_the_adapters_off(models):
    spec, tok, reference, _ = models
    lora = ModelSpec(**TINY_SPEC, lora={"r": 4, "dropout": 0.0})
    policy = load_model(lora, vocab_size=len(tok))  # the same base weights (init seed), adapters B = 0
    loads = []
    estimator = kl_estimator(policy, tok, lora, loads.append)
    assert estimator.reference_model is policy and loads == []  # no second copy
    completions = HFGenerator(policy, tok, GenerationConfig(max_new_tokens=8)).generate(PROMPTS, n=1)
    assert estimator.score("greedy", PROMPTS, completions) == pytest.approx([0.0] * 3, abs=1e-6)  # B = 0: the base
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    got = estimator.score("greedy", PROMPTS, completions)
    for i, prompt in enumerate(PROMPTS):
        p, a = tok(prompt, add_special_tokens=False).input_ids, completions.token_ids[i][0]
        assert got[i] == pytest.approx(plain_logp(policy, p, a) - plain_logp(reference, p, a), abs=1e-4)
    assert any(abs(v) > 1e-3 for v in got)  # the adapters moved the policy
