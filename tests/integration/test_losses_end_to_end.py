"""Every loss of the second batch end to end: the real entry point on the tiny model, a few steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

# (overrides, loss key in the summary, whether a reference model runs, metrics the loss itself adds)
RUNS = [
    (["loss=exo"], "exo", True, []),
    (["loss=bco_pair"], "bco_pair", True, []),
    (["loss=sppo"], "sppo", True, []),
    (["loss=aot"], "aot", True, []),
    (["loss=aot_unpaired", "loss.label_smoothing=0.1"], "aot_unpaired", True, []),
    (["loss=discopop"], "discopop", True, ["discopop/mix"]),
    (["loss=dpo_norm"], "dpo_norm", True, []),
    (["loss=cpo"], "cpo", False, ["cpo/nll"]),
    (["loss=ld_dpo"], "ld_dpo", True, ["ld_dpo/tail_tokens"]),
    (["loss=wpo"], "wpo", True, ["wpo/weight"]),
    (["loss=sft"], "sft", False, ["sft/nll"]),
    (["loss=dpo", "loss.divergence=forward_kl"], "dpo", True, []),
    (["loss=dpo", "loss.divergence=js"], "dpo", True, []),
    (["loss=dpo", "loss.divergence=alpha", "loss.divergence_alpha=0.3"], "dpo", True, []),
    (["loss=mpo"], "mpo", True, ["dpo/loss", "bco_pair/loss", "sft/loss", "sft/nll"]),
    (
        ["loss=mix", "loss.components=[{key: ld_dpo, weight: 0.5}, {key: wpo, weight: 0.5}, {key: cpo, weight: 0.1}]"],
        "mix",
        True,
        ["ld_dpo/loss", "wpo/loss", "cpo/loss", "wpo/weight", "cpo/nll"],
    ),
]


@pytest.mark.parametrize("overrides, key, reference, own_metrics", RUNS, ids=[" ".join(r[0])[5:40] for r in RUNS])
def test_every_new_loss_trains_on_the_tiny_model(
    tiny_run, monkeypatch, tmp_path, overrides, key, reference, own_metrics
):
    import prefopt.logprobs

    calls = []
    real = prefopt.logprobs.pair_logps
    monkeypatch.setattr(
        prefopt.logprobs,
        "pair_logps",
        lambda m, *a, **k: calls.append(next(m.parameters()).requires_grad) or real(m, *a, **k),
    )
    summary, run_dir = tiny_run(*overrides, "steps=2", "eval_every=0", run_dir=tmp_path / "run")
    assert summary["status"] == "complete" and summary["step"] == 2 and summary["loss"] == key
    assert (False in calls) is reference  # a reference-free loss runs no reference forward at all
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    train = {k: v for r in rows for k, v in r.items() if k.startswith("train/")}
    evals = {k: v for r in rows for k, v in r.items() if k.startswith("eval/")}
    for name in ["loss", "rewards/margins", "entropy", "mean_token_accuracy"] + own_metrics:
        assert math.isfinite(train[f"train/{name}"]) and math.isfinite(evals[f"eval/{name}"]), name
    assert train["train/entropy"] > 0 and 0 <= train["train/mean_token_accuracy"] <= 1
    assert json.loads(json.dumps(summary["hparams"])) == summary["hparams"]  # plain values (a mixture's list too)
