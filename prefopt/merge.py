"""A LoRA run's trained weights as one loadable directory: the adapters merged into a fresh copy of the base.

A LoRA policy's `final/` holds only its adapters (`adapter_config.json`, `adapter_model.safetensors`), which
neither vLLM nor `from_pretrained` of a plain causal LM reads. `merge_adapters` loads the base the run started
from again, in the model's own dtype (bf16 for the real models; never the 4-bit copy QLoRA trained on, whose
rounding the merge would carry into the saved weights), applies the adapters with peft, merges them
(`merge_and_unload`) and saves the result with the tokenizer: what the BPO paper's evaluation script does
(sunlin-ai/BPO, sh/evaluate_all_bench.sh:30-34) before it scores the merged directory with vLLM. The merge
runs on the CPU, beside whatever the GPU holds (the trained policy, a vLLM engine).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

from prefopt.errors import ConfigError
from prefopt.io import atomic_dir
from prefopt.mathloop.fingerprints import with_weights
from prefopt.models import ModelSpec, load_model
from prefopt.tokenizer import save_tokenizer

log = logging.getLogger("prefopt")

ADAPTER_CONFIG = "adapter_config.json"


def base_spec(spec: ModelSpec) -> ModelSpec:
    """`spec` without adapters: the base weights in `spec.dtype`, full precision (no 4-bit), no checkpointing."""
    return dataclasses.replace(spec, lora={"r": 0}, gradient_checkpointing=False)


def has_adapters(path: Path | str) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def merge_adapters(spec: ModelSpec, adapters: Path | str, out: Path | str, tokenizer) -> Path:
    """Merge the LoRA adapters saved in `adapters` into a fresh copy of `spec`'s base; save it (with `tokenizer`)
    to `out`, atomically. `spec` is the spec the run trained from (its LoRA settings are ignored). Returns `out`."""
    from peft import PeftModel

    adapters, out = Path(adapters), Path(out)
    if not has_adapters(adapters):
        raise ConfigError(f"{adapters}: no LoRA adapters to merge ({ADAPTER_CONFIG} missing)")
    t0 = time.perf_counter()
    base = load_model(base_spec(spec), vocab_size=len(tokenizer)).eval()
    merged = PeftModel.from_pretrained(base, adapters).merge_and_unload()
    with atomic_dir(out, "the merged policy") as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tokenizer, tmp)
    log.info(
        "merged the LoRA adapters of %s into the %s base (%s) -> %s in %.0f s",
        adapters,
        spec.dtype,
        spec.name_or_path or spec.identity,
        out,
        time.perf_counter() - t0,
    )
    return out


def merged_spec(spec: ModelSpec, merged: Path | str) -> ModelSpec:
    """`spec` loading the merged weights in `merged`: no adapters, not 4-bit."""
    return with_weights(base_spec(spec), merged)


MERGED = "final_merged"


def trained_weights(spec: ModelSpec, run_dir: Path | str, tokenizer) -> tuple[ModelSpec, Path | None]:
    """(the spec that loads a finished run's trained weights from disk, a directory to remove once scored or None).

    `spec` is what the run trained from. A LoRA run: its adapters (`final/`) merged into a fresh copy of the
    base, written to `final_merged/` (replacing any copy there; removed after use unless
    `model.lora.merge_on_export` asked to keep it); a full fine-tune: `final/`; no export: `spec` itself.
    """
    run_dir = Path(run_dir)
    final, merged = run_dir / "final", run_dir / MERGED
    if spec.uses_lora and has_adapters(final):
        merge_adapters(spec, final, merged, tokenizer)
        return merged_spec(spec, merged), None if spec.lora["merge_on_export"] else merged
    if (final / "config.json").is_file():
        return with_weights(spec, final), None
    return spec, None
