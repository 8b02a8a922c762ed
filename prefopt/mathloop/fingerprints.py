"""Fingerprints for the verified-math loop's cache keys: weights, model specs, data and optimizers.

A key (`prefopt.io.cache_key`) is a sha256 of everything that made an artifact; these functions say what
"everything" is for a model, a data source and an optimizer factory.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefopt.errors import ConfigError
from prefopt.models import ModelSpec


def with_weights(spec: ModelSpec, path: str | os.PathLike) -> ModelSpec:
    """`spec` loading its weights from the saved policy `path` (tokenizer: the char one stays, else the saved one)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"policy={str(path)!r}: not a directory with a saved model (config.json missing)")
    return dataclasses.replace(
        spec,
        name_or_path=str(path),
        arch=None,
        gguf_file=None,
        revision=None,
        config={} if spec.arch is not None else dict(spec.config),
        tokenizer="char" if spec.tokenizer == "char" else None,
    )


def weights_id(spec: ModelSpec) -> str:
    """A string that changes when the weights `spec` loads change: a cached warm-up's key; other local
    directories, their files' sizes and times; else the spec's identity (hub id and revision, or tiny config)."""
    if spec.name_or_path and (Path(spec.name_or_path).parent / "warmup.json").is_file():
        return "warmup:" + json.loads((Path(spec.name_or_path).parent / "warmup.json").read_text())["key"]
    if spec.name_or_path and Path(spec.name_or_path).is_dir():
        files = sorted(p for p in Path(spec.name_or_path).iterdir() if p.suffix in (".safetensors", ".json", ".bin"))
        stamp = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        return f"{Path(spec.name_or_path).resolve()}:{stamp}"
    return spec.identity


def spec_fingerprint(spec: ModelSpec) -> dict:
    return {
        "weights": weights_id(spec),
        "dtype": spec.dtype,
        "tokenizer": spec.tokenizer,
        "tokenizer_family": spec.tokenizer_family,
        "completion_eos": spec.completion_eos,
        **({"chat_template": spec.chat_template} if spec.chat_template else {}),
    }


def data_fingerprint(data, training: bool = False) -> Any:
    """What `data` is; `training=True`: only what its training and held-out pairs depend on (`train_fingerprint`)."""
    if training and hasattr(data, "train_fingerprint"):
        return data.train_fingerprint()
    fp = data.fingerprint() if hasattr(data, "fingerprint") else repr(data)
    path = getattr(data, "path", None)  # a local file: its size and time too, so an edited file is new data
    if isinstance(path, str) and Path(path).is_file():
        st = Path(path).stat()
        fp = [fp, st.st_size, st.st_mtime_ns]
    return fp


def optimizer_fingerprint(factory: Callable) -> dict:
    func = getattr(factory, "func", factory)
    keywords = {k: v for k, v in getattr(factory, "keywords", {}).items() if k != "lr"}
    return {"target": f"{getattr(func, '__module__', '')}.{getattr(func, '__qualname__', repr(func))}", **keywords}
