"""One DPO step on SmolLM2-135M-Instruct: prefopt's loss and gradients equal TRL 1.16's `DPOTrainer` on the same
batch."""

from __future__ import annotations

import copy

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is not installed (pip install -e '.[bench]' brings TRL 1.16)")
from datasets import Dataset  # noqa: E402
from trl import DPOConfig, DPOTrainer  # noqa: E402

from prefopt.data.batching import collate, render_prompt, tokenize_pairs  # noqa: E402
from prefopt.data.sources import PreferencePair  # noqa: E402
from prefopt.logprobs import pair_logps  # noqa: E402
from prefopt.losses import get_loss  # noqa: E402

pytestmark = pytest.mark.slow

PAIRS = [
    PreferencePair("What is 7 + 5?", "7 + 5 = 12. \\boxed{12}", "7 + 5 = 13. \\boxed{13}", "a"),
    PreferencePair("What is 9 - 4?", "\\boxed{5}", "9 - 4 = 6, so \\boxed{6}", "b"),
    PreferencePair("Name a colour.", "Blue.", "Blue is the colour of the sky.", "c"),
]
BETA = 0.1


def test_one_dpo_step_equals_trl(smol, tmp_path):
    base, tok = smol
    eos = "<|im_end|>"
    ours, _ = tokenize_pairs(PAIRS, tok, max_length=160, max_prompt_length=96, completion_eos=eos)
    # TRL reads the same texts: the prompt as prefopt renders it (template, default system message), completions + EOS
    rows = [
        {"prompt": render_prompt(tok, p.prompt, True, None), "chosen": p.chosen + eos, "rejected": p.rejected + eos}
        for p in PAIRS
    ]
    policy_trl, reference = copy.deepcopy(base).train(), copy.deepcopy(base).eval()
    config = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=len(PAIRS),
        beta=BETA,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        max_length=None,
        seed=0,
        bf16=False,
        gradient_checkpointing=False,
    )  # float32 on both sides
    trainer = DPOTrainer(
        model=policy_trl, ref_model=reference, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok
    )
    seen = trainer.train_dataset
    assert [list(p.prompt_ids) for p in ours] == seen["prompt_ids"]  # the same tokens on both sides
    assert [list(p.chosen_ids) for p in ours] == seen["chosen_ids"]
    assert [list(p.rejected_ids) for p in ours] == seen["rejected_ids"]
    inputs = trainer.data_collator([seen[i] for i in range(len(PAIRS))])
    theirs = trainer.compute_loss(policy_trl, inputs)
    theirs.backward()

    policy = copy.deepcopy(base).train()
    batch = collate(ours, tok.pad_token_id, packing=True)
    with torch.no_grad():
        ref = pair_logps(reference, batch)
    loss = get_loss("dpo", beta=BETA)(pair_logps(policy, batch), ref).loss.mean()
    loss.backward()

    assert loss.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    assert abs(loss.item() - 0.6931471805599453) < 1e-4  # the first step: policy = reference
    their_grads = dict(policy_trl.named_parameters())
    for name, p in policy.named_parameters():  # relative to the gradient's norm: the tied embedding/LM head has
        theirs_grad = their_grads[name].grad  # 49,152 rows, most of them ~1e-9 (an element-wise rtol means nothing)
        assert theirs_grad is not None and p.grad is not None, name
        error = ((p.grad - theirs_grad).norm() / theirs_grad.norm()).item()
        assert error < 1e-4, (name, error)
