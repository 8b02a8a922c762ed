"""prefopt's sequence log-probs on SmolLM2-135M-Instruct equal a plain transformers forward's, in every layout."""

from __future__ import annotations

import pytest
import torch

from prefopt.data.batching import collate, tokenize_pairs
from prefopt.data.sources import PreferencePair
from prefopt.logprobs import sequence_logps

pytestmark = pytest.mark.slow

PAIRS = [
    PreferencePair(
        "What is 7 + 5?", "7 + 5 = 12. The answer is \\boxed{12}.", "7 + 5 = 13. The answer is \\boxed{13}.", "arith"
    ),
    PreferencePair(
        "Name a colour.", "Blue.", "Blue is a colour of the sky on a clear day.", "prefix"
    ),  # chosen: a prefix
    PreferencePair(
        ({"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Capital of France?"}),
        "Paris",
        "London",
        "system",
    ),
    PreferencePair("Say hello.", "Hello!", "Hello!", "same"),  # identical answers
]


def plain_logps(model, pair) -> tuple[list[float], list[int]]:
    """Each sequence alone, no padding: a full forward, log-softmax, summed over its completion tokens."""
    sums, counts = [], []
    for completion in (pair.chosen_ids, pair.rejected_ids):
        ids = torch.tensor([list(pair.prompt_ids) + list(completion)])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
        n = len(completion)
        sums.append(logps[-n:].gather(-1, ids[0, -n:, None]).sum().item())
        counts.append(n)
    return sums, counts


@pytest.mark.parametrize("layout", [False, "shared_prefix", "flat"], ids=["padded", "shared_prefix", "flat"])
def test_sequence_logps_equal_a_plain_forward(smol, layout):
    model, tok = smol
    pairs, _ = tokenize_pairs(PAIRS, tok, max_length=160, max_prompt_length=96, completion_eos="<|im_end|>")
    batch = collate(pairs, tok.pad_token_id, packing=layout)
    if layout == "shared_prefix":
        assert batch.input_ids.shape[0] == len(pairs)  # one row per pair
    with torch.no_grad():
        sums, counts = sequence_logps(model, batch)
    b = len(pairs)
    expected = [plain_logps(model, p) for p in pairs]
    want_sums = torch.tensor([e[0][0] for e in expected] + [e[0][1] for e in expected])
    want_counts = torch.tensor([e[1][0] for e in expected] + [e[1][1] for e in expected], dtype=counts.dtype)
    torch.testing.assert_close(counts, want_counts)
    torch.testing.assert_close(sums, want_sums, rtol=1e-5, atol=1e-5)
    assert sums[b - 1].item() == pytest.approx(
        sums[2 * b - 1].item(), abs=1e-5
    )  # identical answers, identical log-probs
