"""The loop's stages as jobs of their own: `python -m prefopt.sft`, `prefopt.pairs` and `prefopt.evaluate`.

Each takes the loop (`MathLoop`), the model spec, the data source and the hardware from the composition
root's plan, runs one stage on the starting policy (`policy=DIR` or the model's own weights) and writes its
results into `run_dir`.
"""

from __future__ import annotations

from pathlib import Path

from prefopt.mathloop.fingerprints import weights_id, with_weights
from prefopt.mathloop.loop import MathLoop
from prefopt.mathloop.policy_kl import KLEstimator
from prefopt.tracking import RunLog


def sft_job(loop: MathLoop, spec, data, hardware, run_dir: Path, wandb=None) -> dict:
    """Warm up, write run_dir/final, evaluate it (when `mathloop.evaluate`); returns the summary."""
    hardware.setup()
    spec = loop.start_spec(spec)
    run_log = RunLog(run_dir, {"warmup": vars(loop.warmup)}, wandb, enabled=hardware.is_main)
    model, tokenizer, result = loop.run_warmup(spec, data, hardware, run_dir, run_log=run_log)
    metrics = dict(result["metrics"])
    details: dict = {}
    if loop.switches.evaluate and hardware.is_main:
        verified, details = loop.run_eval(model, tokenizer, spec, data, run_dir / "verified", "eval/verified")
        metrics.update(verified)
        run_log.log(loop.warmup.steps, verified)
    summary = {
        "status": "complete",
        "stage": "warmup",
        "policy": str(run_dir / "final"),
        "metrics": metrics,
        "verified": {"after": details},
        "wall_time_s": result["wall_time_s"],
    }
    run_log.finish(summary)
    hardware.teardown()
    return summary


def pairs_job(loop: MathLoop, spec, data, hardware, run_dir: Path) -> dict:
    """Sample from the policy, verify, write the pairs file and its provenance; returns the provenance."""
    hardware.setup()
    spec = loop.start_spec(spec)
    model, tokenizer = loop.load(spec, hardware)
    path = Path(loop.pairs.output) if loop.pairs.output else run_dir / "pairs.jsonl"
    record = loop.run_pairs(model, tokenizer, spec, data, path)
    print(f"prefopt: {record['num_pairs']} pairs -> {path} (provenance: {path}.provenance.json)")
    return record


def evaluate_job(loop: MathLoop, spec, data, hardware, run_dir: Path, wandb=None) -> dict:
    """Verified accuracy of the policy on `evaluation.benchmarks`; writes summary.json and prints the metrics.
    With `evaluation.kl_reference`, also KL(π‖π_ref) on the policy's answers (`eval/kl/*`)."""
    hardware.setup()
    base = spec
    spec = loop.start_spec(spec)
    model, tokenizer = loop.load(spec, hardware)
    kl = kl_against(loop, model, tokenizer, base, hardware)
    metrics, details = loop.run_eval(model, tokenizer, spec, data, run_dir / "verified", "eval/verified", kl)
    run_log = RunLog(run_dir, {"evaluation": vars(loop.evaluation)}, wandb, enabled=hardware.is_main)
    run_log.log(0, metrics)
    summary = {
        "status": "complete",
        "stage": "evaluate",
        "policy": weights_id(spec),
        "metrics": metrics,
        "verified": {"after": details},
    }
    run_log.finish(summary)
    for name, value in metrics.items():
        print(f"{name}: {value:.4f}")
    return summary


def kl_against(loop: MathLoop, policy, tokenizer, base, hardware) -> KLEstimator | None:
    """The KL estimator against `evaluation.kl_reference`: `model` (the model preset's own weights, `base`) or a
    saved policy directory, loaded as a second, frozen copy; None when it is not set."""
    chosen = loop.evaluation.kl_reference
    if not chosen:
        return None
    reference = loop.load(base if chosen == "model" else with_weights(base, chosen), hardware)[0]
    reference.requires_grad_(False)
    return KLEstimator(policy, reference, tokenizer, chunk_elements=loop.chunk_elements)
