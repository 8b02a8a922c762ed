"""The same per-token log-probs through TRL 1.16's own DPO loss code and through prefopt: the same losses.

TRL computes its losses inline in `DPOTrainer._compute_loss`; it is called here on a trainer object built
without `__init__` (no model, no dataset), with stub models whose forward returns the per-token outputs of
TRL's fused LM head (`log_probs`, `log_sum_sq_probs`, `entropy`, `is_top1`, `mean_logits`). TRL returns the
batch mean, so the per-pair comparison feeds one pair per call; AOT, which sorts over the batch, is compared
on whole batches. Where prefopt differs from TRL on purpose the matching setting is used and the difference is
asserted (docs/losses.md#trl-parity): rewards are β·r̂ on the plain sums for LD-DPO (TRL: on the desensitised sums).
"""

from __future__ import annotations

import types

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[bench]' brings TRL 1.16)")
from trl.trainer.dpo_trainer import DPOTrainer

from prefopt.losses import PairLogps, get_loss

PROMPT = 3


class _Head(torch.nn.Module):
    """Stands in for a model called with `fused_lm_head=True`: returns fixed per-token outputs."""

    is_gradient_checkpointing = False

    def __init__(self, log_probs, log_sum_sq):
        super().__init__()
        self.out = types.SimpleNamespace(
            log_probs=log_probs,
            log_sum_sq_probs=log_sum_sq,
            entropy=torch.zeros_like(log_probs),
            mean_logits=torch.zeros_like(log_probs),
            is_top1=torch.zeros_like(log_probs, dtype=torch.bool),
            aux_loss=None,
        )

    def forward(self, **kwargs):
        return self.out


def make_batch(n_pairs, seed, max_len=7, dtype=torch.float64):
    """Per-token log-probs of n pairs: (completion mask [2B, T], policy, reference, log Σp² [2B, T−1])."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (2 * n_pairs,), generator=g)
    total = PROMPT + max_len
    mask = torch.zeros(2 * n_pairs, total, dtype=torch.long)
    for i, n in enumerate(lengths.tolist()):
        mask[i, PROMPT : PROMPT + n] = 1
    shift = mask[:, 1:].double()
    policy = -torch.rand(2 * n_pairs, total - 1, generator=g, dtype=torch.float64) * 3 * shift
    reference = -torch.rand(2 * n_pairs, total - 1, generator=g, dtype=torch.float64) * 3 * shift
    log_sum_sq = -torch.rand(2 * n_pairs, total - 1, generator=g, dtype=torch.float64) * 2 * shift
    return mask, policy.to(dtype), reference.to(dtype), log_sum_sq.to(dtype)


def prefopt_logps(mask, per_token, log_sum_sq=None) -> PairLogps:
    """PairLogps from per-token log-probs, every optional field computed the plain way."""
    shift = mask[:, 1:].to(per_token.dtype)
    counts = shift.sum(1)
    b = mask.shape[0] // 2
    position = shift.cumsum(1) * shift  # 1-based position within the completion, 0 outside
    m = torch.minimum(counts[:b], counts[b:]).repeat(2)
    prefix = (per_token * ((position > 0) & (position <= m[:, None]))).sum(1)
    head = ((per_token - log_sum_sq) * shift).sum(1) if log_sum_sq is not None else None
    sums = (per_token * shift).sum(1)
    return PairLogps(
        sums[:b],
        sums[b:],
        counts[:b],
        counts[b:],
        chosen_prefix=prefix[:b],
        rejected_prefix=prefix[b:],
        chosen_head=None if head is None else head[:b],
        rejected_head=None if head is None else head[b:],
    )


def trl_loss(
    mask,
    policy,
    reference,
    log_sum_sq,
    *,
    loss_type="sigmoid",
    loss_weights=None,
    beta=0.1,
    label_smoothing=0.0,
    f_divergence_type="reverse_kl",
    f_alpha_divergence_coef=1.0,
    discopop_tau=0.05,
    ld_alpha=None,
    use_weighting=False,
):
    """TRL 1.16's `_compute_loss` on these log-probs: (batch-mean loss, its metrics)."""
    loss_types = loss_type if isinstance(loss_type, list) else [loss_type]
    trainer = object.__new__(DPOTrainer)
    policy_model, ref_model = _Head(policy, log_sum_sq), _Head(reference, log_sum_sq)
    policy_model.train()
    trainer.__dict__.update(
        model=policy_model,
        ref_model=ref_model,
        accelerator=types.SimpleNamespace(
            device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x
        ),
        args=types.SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False,
        ld_alpha=ld_alpha,
        precompute_ref_logps=False,
        f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef,
        loss_types=loss_types,
        loss_weights=loss_weights or [1.0] * len(loss_types),
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=use_weighting,
        _metrics={"train": __import__("collections").defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {"input_ids": torch.zeros_like(mask), "attention_mask": torch.ones_like(mask), "completion_mask": mask}
    loss = DPOTrainer._compute_loss(trainer, policy_model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


def per_pair(n_pairs, seed, trl_kwargs, key, hparams, dtype=torch.float64):
    """Each pair alone through TRL, all pairs at once through prefopt: the two per-pair loss vectors."""
    mask, policy, reference, lss = make_batch(n_pairs, seed, dtype=dtype)
    b = n_pairs
    theirs = []
    for i in range(b):
        rows = [i, b + i]
        loss, _ = trl_loss(mask[rows], policy[rows], reference[rows], lss[rows], **trl_kwargs)
        theirs.append(float(loss))
    out = get_loss(key, **hparams)(prefopt_logps(mask, policy, lss), prefopt_logps(mask, reference, lss))
    return out, theirs, (mask, policy, reference, lss)


# TRL's loss_type (and settings) → prefopt's key (and hyper-parameters)
CASES = [
    ({"loss_type": "sigmoid", "beta": 0.3}, "dpo", {"beta": 0.3}),
    ({"loss_type": "hinge", "beta": 0.3}, "slic", {"beta": 0.3}),
    ({"loss_type": "ipo", "beta": 0.3}, "ipo", {"beta": 0.3, "length_normalize": True}),  # TRL always normalises
    ({"loss_type": "exo_pair", "beta": 0.3, "label_smoothing": 1e-3}, "exo", {"beta": 0.3, "label_smoothing": 1e-3}),
    ({"loss_type": "exo_pair", "beta": 0.3, "label_smoothing": 0.2}, "exo", {"beta": 0.3, "label_smoothing": 0.2}),
    ({"loss_type": "nca_pair", "beta": 0.3}, "nca", {"beta": 0.3}),
    ({"loss_type": "robust", "beta": 0.3, "label_smoothing": 0.1}, "robust", {"beta": 0.3, "label_smoothing": 0.1}),
    ({"loss_type": "bco_pair", "beta": 0.3}, "bco_pair", {"beta": 0.3}),
    ({"loss_type": "sppo_hard", "beta": 0.3}, "sppo", {"beta": 0.3}),
    ({"loss_type": "apo_zero", "beta": 0.3}, "apo_zero", {"beta": 0.3}),
    ({"loss_type": "apo_down", "beta": 0.3}, "apo_down", {"beta": 0.3}),
    ({"loss_type": "discopop", "beta": 0.3, "discopop_tau": 0.05}, "discopop", {"beta": 0.3, "tau": 0.05}),
    ({"loss_type": "discopop", "beta": 0.3, "discopop_tau": 0.5}, "discopop", {"beta": 0.3, "tau": 0.5}),
    ({"loss_type": "sigmoid_norm", "beta": 0.3}, "dpo_norm", {"beta": 0.3}),
    ({"loss_type": "sigmoid", "f_divergence_type": "forward_kl"}, "dpo", {"divergence": "forward_kl"}),
    ({"loss_type": "sigmoid", "f_divergence_type": "js_divergence"}, "dpo", {"divergence": "js"}),
    (
        {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5},
        "dpo",
        {"divergence": "alpha", "divergence_alpha": 0.5},
    ),
    (
        {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.5},
        "dpo",
        {"divergence": "alpha", "divergence_alpha": 1.5},
    ),
    (
        {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1.0},
        "dpo",
        {"divergence": "alpha", "divergence_alpha": 1.0},
    ),
    ({"loss_type": "sigmoid", "beta": 0.3, "ld_alpha": 0.4}, "ld_dpo", {"beta": 0.3, "ld_alpha": 0.4}),
    ({"loss_type": "sigmoid", "beta": 0.3, "ld_alpha": 1.0}, "ld_dpo", {"beta": 0.3, "ld_alpha": 1.0}),
    ({"loss_type": "sigmoid", "beta": 0.3, "use_weighting": True}, "wpo", {"beta": 0.3}),
    ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, "mpo", {}),
    (
        {"loss_type": ["hinge", "ipo", "apo_zero"], "loss_weights": [0.5, 0.25, 2.0], "beta": 0.2},
        "mix",
        {
            "components": [
                {"key": "slic", "weight": 0.5, "beta": 0.2},
                {"key": "ipo", "weight": 0.25, "beta": 0.2},
                {"key": "apo_zero", "weight": 2.0, "beta": 0.2},
            ]
        },
    ),
]


@pytest.mark.parametrize(
    "trl_kwargs, key, hparams",
    CASES,
    ids=[f"{c[0]['loss_type']}-{c[1]}-{i}".replace("'", "") for i, c in enumerate(CASES)],
)
def test_per_pair_loss_equals_trl(trl_kwargs, key, hparams):
    # TRL's alpha divergence runs in float32 only (a float64 batch raises KeyError there): compare in float32
    alpha = trl_kwargs.get("f_divergence_type") == "alpha_divergence"
    dtype = torch.float32 if alpha else torch.float64
    out, theirs, _ = per_pair(6, seed=len(key) + 7, trl_kwargs=trl_kwargs, key=key, hparams=hparams, dtype=dtype)
    # TRL's exo_pair takes log ε and log(1 − ε) of a float32 tensor: agreement to float32's precision there
    rel = 1e-5 if alpha else 1e-6 if key == "exo" else 1e-9
    assert out.loss.tolist() == pytest.approx(theirs, rel=rel, abs=1e-12)


@pytest.mark.parametrize("loss_type, key", [("aot", "aot"), ("aot_unpaired", "aot_unpaired")])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_aot_batch_loss_equals_trl(loss_type, key, label_smoothing):
    # AOT sorts over the batch: compare whole batches (TRL's batch mean against prefopt's per-quantile losses).
    for seed in range(3):
        mask, policy, reference, lss = make_batch(8, seed)
        theirs, _ = trl_loss(
            mask, policy, reference, lss, loss_type=loss_type, beta=0.5, label_smoothing=label_smoothing
        )
        out = get_loss(key, beta=0.5, label_smoothing=label_smoothing)(
            prefopt_logps(mask, policy), prefopt_logps(mask, reference)
        )
        assert float(out.loss.mean()) == pytest.approx(float(theirs), rel=1e-10)


def test_rewards_match_trl_and_ld_dpo_differs_on_purpose():
    mask, policy, reference, lss = make_batch(5, 3)
    _, metrics = trl_loss(mask, policy, reference, lss, beta=0.3)
    out = get_loss("dpo", beta=0.3)(prefopt_logps(mask, policy), prefopt_logps(mask, reference))
    assert float(out.chosen_reward.mean()) == pytest.approx(metrics["rewards/chosen"], rel=1e-10)
    assert float(out.rejected_reward.mean()) == pytest.approx(metrics["rewards/rejected"], rel=1e-10)
    assert float((out.chosen_reward > out.rejected_reward).double().mean()) == pytest.approx(
        metrics["rewards/accuracies"]
    )
    # LD-DPO: TRL reports rewards on the desensitised sums, prefopt on the plain ones (one scale for all losses).
    _, ld_metrics = trl_loss(mask, policy, reference, lss, beta=0.3, ld_alpha=0.2)
    ld = get_loss("ld_dpo", beta=0.3, ld_alpha=0.2)(prefopt_logps(mask, policy), prefopt_logps(mask, reference))
    torch.testing.assert_close(ld.chosen_reward, out.chosen_reward)
    assert float(ld.chosen_reward.mean()) != pytest.approx(ld_metrics["rewards/chosen"], rel=1e-6)


def test_sft_term_differs_from_trl_only_in_its_average():
    # TRL's `sft` averages over all chosen tokens of the batch; prefopt's per pair (−ℓ_w/n_w) and then over pairs.
    mask, policy, reference, lss = make_batch(4, 11)
    theirs, _ = trl_loss(mask, policy, reference, lss, loss_type="sft")
    p = prefopt_logps(mask, policy)
    ours = get_loss("sft")(p, None).loss
    assert float(-p.chosen.sum() / p.chosen_tokens.sum()) == pytest.approx(float(theirs), rel=1e-10)
    if len(set(p.chosen_tokens.tolist())) > 1:
        assert float(ours.mean()) != pytest.approx(float(theirs), rel=1e-6)


def test_head_statistics_equal_trls_fused_lm_head():
    """WPO's Σ(log p − log Σp²), the entropy and the top-1 flags from prefopt's tiled head against TRL's own fused
    LM head (`add_fused_lm_head`, the kernel behind `use_weighting`, `entropy` and `mean_token_accuracy`)."""
    import copy

    from trl.trainer.utils import add_fused_lm_head

    from prefopt.data.arith import ArithmeticData
    from prefopt.data.batching import collate, tokenize_pairs
    from prefopt.logprobs import pair_logps
    from prefopt.models import ModelSpec, load_model, load_tokenizer

    spec = ModelSpec(
        arch="qwen2",
        config={
            "vocab_size": 128,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "tie_word_embeddings": True,
        },
        tokenizer="char",
    )
    tok = load_tokenizer(spec)
    model = load_model(spec, vocab_size=len(tok))
    rows, _, _ = ArithmeticData(n_train=6, n_eval=2).load()
    pairs, _ = tokenize_pairs(rows, tok, max_length=128, max_prompt_length=64)
    batch = collate(pairs, tok.pad_token_id)
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)  # a little language modelling: some targets become top-1
    for _ in range(8):
        opt.zero_grad()
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[:, :-1]
        torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch.input_ids[:, 1:].reshape(-1)
        ).backward()
        opt.step()
    ours = pair_logps(model, batch, chunk_elements=40, fields=("head_logps",), diagnostics=True)

    fused = copy.deepcopy(model)
    add_fused_lm_head(fused, outputs=("log_probs", "entropy", "log_sum_sq_probs", "is_top1"))
    labels = batch.input_ids.masked_fill(~batch.completion_mask.bool(), -100)
    with torch.no_grad():
        out = fused(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, fused_lm_head=True)
    mask = batch.completion_mask[:, 1:].float()
    b = batch.num_pairs
    head = ((out.log_probs - out.log_sum_sq_probs) * mask).sum(1)
    entropy = (out.entropy * mask).sum(1)
    top1 = (out.is_top1.float() * mask).sum(1)
    torch.testing.assert_close(torch.cat([ours.chosen, ours.rejected]), out.log_probs.sum(1), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat([ours.chosen_head, ours.rejected_head]), head, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(torch.cat([ours.chosen_entropy, ours.rejected_entropy]), entropy, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(ours.chosen_top1, top1[:b])
    assert 0 < float(top1[:b].sum()) < float(mask[:b].sum())
