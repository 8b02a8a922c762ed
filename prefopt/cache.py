"""Cache keys and entries for the verified-math loop's stages (`prefopt.pipeline`).

A key is a sha256 of everything that made an artifact (model weights, data, settings); an entry is built
under a temporary name and renamed into place, and a lock file keeps concurrent runs from building it twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from prefopt.errors import ConfigError
from prefopt.models import ModelSpec


def cache_key(payload: dict) -> str:
    """sha256 of the canonical JSON of `payload` (first 16 hex digits: a directory name, not a password)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@contextlib.contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (a sibling `.lock` file) while computing what will be cached there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def with_weights(spec: ModelSpec, path: str | os.PathLike) -> ModelSpec:
    """`spec` loading its weights from the saved policy `path` (tokenizer: the char one stays, else the saved one)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"policy={str(path)!r}: not a directory with a saved model (config.json missing)")
    return dataclasses.replace(spec, name_or_path=str(path), arch=None, revision=None,
                               config={} if spec.arch is not None else dict(spec.config),
                               tokenizer="char" if spec.tokenizer == "char" else None)


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
    return {"weights": weights_id(spec), "dtype": spec.dtype, "tokenizer": spec.tokenizer,
            "tokenizer_family": spec.tokenizer_family, "completion_eos": spec.completion_eos,
            **({"chat_template": spec.chat_template} if spec.chat_template else {})}


def data_fingerprint(data) -> Any:
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
