"""TR-DPO's moving reference (`reference_sync.every` / `.alpha`): the update, its schedule, refusals, resume."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from prefopt.data.arith import ArithmeticData
from prefopt.data.batching import tokenize_pairs
from prefopt.engine import TrainConfig, Trainer, TrainerParts
from prefopt.errors import ConfigError
from prefopt.hardware import Hardware
from prefopt.losses import get_loss
from prefopt.models import ModelSpec, load_model, load_tokenizer
from prefopt.reference_providers import MovingReference, choose_reference
from tests.helpers.config import TINY_SPEC

SPEC = ModelSpec(**TINY_SPEC)


@pytest.fixture(scope="module")
def setup():
    tok = load_tokenizer(SPEC)
    model = load_model(SPEC, vocab_size=len(tok))
    rows, _, _ = ArithmeticData(n_train=8, n_eval=2).load()
    pairs, _ = tokenize_pairs(rows, tok, max_length=128, max_prompt_length=64)
    return model, tok, pairs


def trainer(setup, loss="dpo", reference=True, **cfg):
    """A set-up Trainer with a frozen copy as reference, or (reference=False) a LoRA-like adapters-off context."""
    model, tok, pairs = setup
    policy = copy.deepcopy(model)
    ref = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
    config = TrainConfig(steps=2, batch_size=4, micro_batch_size=4, progress=False, **cfg)
    loss = get_loss(loss)
    provider = choose_reference(loss, config, model=ref, context=None if reference else (lambda: None))
    parts = TrainerParts(
        policy=policy,
        reference=provider,
        loss=loss,
        optimizer_factory=lambda ps: torch.optim.SGD(ps, lr=0.5),
        scheduler_factory=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0),
        train_pairs=pairs,
        eval_pairs=[],
        pad_id=tok.pad_token_id,
        seed=0,
        max_grad_norm=None,
    )
    return Trainer(parts, config, Hardware(device="cpu"), "/nonexistent").setup()


@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_sync_is_the_soft_update_of_the_spec(setup, alpha):
    t = trainer(setup, reference_sync_every=1, reference_sync_alpha=alpha)
    assert isinstance(t.reference, MovingReference)
    before = {n: p.detach().clone() for n, p in t.reference.model.named_parameters()}
    t.train_step()
    policy = {n: p.detach().clone() for n, p in t.policy.named_parameters()}
    assert any(not torch.equal(policy[n], before[n]) for n in before)  # the step moved the policy
    t.reference.sync()
    for n, p in t.reference.model.named_parameters():
        torch.testing.assert_close(p, alpha * policy[n] + (1 - alpha) * before[n], rtol=1e-6, atol=1e-7)
    assert all(not p.requires_grad for p in t.reference.model.parameters())


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(reference_sync_every=-1), "reference_sync.every must be a number of steps >= 1, or null (got -1)"),
        (dict(reference_sync_every=1, reference_sync_alpha=0.0), "reference_sync.alpha must be in (0, 1] (got 0.0)"),
        (dict(reference_sync_every=1, reference_sync_alpha=1.5), "reference_sync.alpha must be in (0, 1] (got 1.5)"),
    ],
)
def test_bad_values_name_the_key(setup, overrides, message):
    with pytest.raises(ConfigError) as err:
        trainer(setup, **overrides)
    assert message in str(err.value)


def test_refused_with_lora_and_reference_free_losses(setup):
    with pytest.raises(ConfigError, match=r"reference_sync.every=2 is not supported with LoRA"):
        trainer(setup, reference=False, reference_sync_every=2)
    with pytest.raises(ConfigError, match=r"reference_sync.every=2: loss 'simpo' is reference-free"):
        trainer(setup, loss="simpo", reference=False, reference_sync_every=2)


def test_refused_with_a_reference_cache_and_lora_from_the_command_line(tiny_run, tmp_path):
    with pytest.raises(ConfigError, match=r"reference_sync.every=2 cannot be combined with reference_cache"):
        tiny_run("reference_sync.every=2", f"reference_cache={tmp_path / 'cache'}", run_dir=tmp_path / "a")
    with pytest.raises(ConfigError, match=r"reference_sync.every=2 is not supported with LoRA"):
        tiny_run("reference_sync.every=2", "model.lora.r=4", run_dir=tmp_path / "b")


def rows(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_hard_copy_schedule_is_visible_in_the_rewards(tiny_run, tmp_path):
    # alpha = 1, every 2 steps: the reference equals the policy right after steps 2, 4 and 6, so the rewards of
    # steps 3 and 5 (computed before their update) and the evaluations after steps 2, 4, 6 are 0 (to float32
    # rounding: the policy's forward also computes the token metrics, the reference's does not); those of steps
    # 4 and 6 are not (step 1 has learning rate 0, the first of the warm-up, so step 2's are 0 too).
    _, run = tiny_run(
        "reference_sync.every=2", "reference_sync.alpha=1.0", "steps=6", "lr=1e-2", run_dir=tmp_path / "r"
    )
    train = {r["step"]: r for r in rows(run) if "train/loss" in r}
    evals = [r for r in rows(run) if "eval/loss" in r]
    zero = pytest.approx(0, abs=1e-5)
    assert abs(train[4]["train/rewards/chosen"]) > 1e-2 and abs(train[6]["train/rewards/chosen"]) > 1e-2
    for step in (3, 5):
        assert train[step]["train/rewards/chosen"] == zero and train[step]["train/rewards/rejected"] == zero
    assert [r["step"] for r in evals] == [2, 4, 6]
    assert all(r["eval/rewards/chosen"] == zero and r["eval/rewards/rejected"] == zero for r in evals)


def test_resumed_run_equals_an_uninterrupted_one(tiny_run, tmp_path):
    sync = ["reference_sync.every=1", "reference_sync.alpha=0.5", "lr=1e-2", "save_every=3"]
    full, _ = tiny_run(*sync, "steps=6", run_dir=tmp_path / "full")
    tiny_run(*sync, "steps=3", run_dir=tmp_path / "cut")  # as if stopped after step 3's checkpoint
    resumed, _ = tiny_run(*sync, "steps=6", run_dir=tmp_path / "cut")
    assert resumed["resumed_from_step"] == 3
    for key in ("train/loss", "eval/loss", "train/rewards/margins", "eval/rewards/chosen"):
        assert resumed["metrics"][key] == pytest.approx(full["metrics"][key], abs=1e-7), key
    plain, _ = tiny_run("lr=1e-2", "save_every=3", "steps=6", run_dir=tmp_path / "plain")
    assert plain["metrics"]["eval/rewards/chosen"] != pytest.approx(full["metrics"]["eval/rewards/chosen"], abs=1e-6)


SYNC = ["reference_sync.every=2", "reference_sync.alpha=0.5", "lr=1e-2"]


@pytest.fixture(scope="module")
def single_sync(tmp_path_factory):
    from tests.cluster.test_distributed import launch

    return launch(tmp_path_factory.mktemp("sync"), "single", 1, "hardware=cpu", "hardware.threads=1", *SYNC)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_follow_the_single_process_trajectory(single_sync, tmp_path, strategy):
    """Every rank updates the reference identically: under DDP each rank lerps its own copy toward the same
    (all-reduced) policy, under FSDP2 its own shard toward the same shard of the policy. Two processes give the
    single process's trajectory, and the checkpoint (written collectively under FSDP) holds the full reference."""
    from tests.cluster.test_distributed import launch, trajectory

    extra = ["hardware.mixed_precision=null"] if strategy == "fsdp" else []
    run = launch(tmp_path, strategy, 2, f"hardware={strategy}", *extra, *SYNC)
    ours, ref = trajectory(run), trajectory(single_sync)
    assert [s for s, _ in ours] == [s for s, _ in ref]
    for (step, a), (_, b) in zip(ours, ref):
        for k in a:
            assert a[k] == pytest.approx(b[k], abs=1e-5, rel=1e-5), (step, k)
    state = torch.load(run / "checkpoints" / "step_00000005" / "trainer.pt", weights_only=False)
    single_state = torch.load(single_sync / "checkpoints" / "step_00000005" / "trainer.pt", weights_only=False)
    assert state["reference"].keys() == single_state["reference"].keys()
    for name, value in single_state["reference"].items():
        torch.testing.assert_close(state["reference"][name], value, rtol=1e-5, atol=1e-6)
