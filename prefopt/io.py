"""Files that appear whole or not at all: content keys, locks and atomic writes for caches and run files.

Every writer in prefopt (pairs files, per-problem evaluation rows, logs, summaries, cache entries) goes
through `write_text_atomic` or `replace_dir`: the bytes are written under a temporary name beside the target
and renamed into place, so an interrupted run leaves the old file or the new one, never half of either.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path


def cache_key(payload: dict, length: int = 16) -> str:
    """sha256 of the canonical JSON of `payload`: its first `length` hex digits (a name, not a password)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


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


def temp_path(path: Path) -> Path:
    """A hidden sibling of `path`, unique to this process."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike):
    """Yields a temporary sibling of `path` to write; on success it is renamed to `path`, else removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write `text` (UTF-8) to `path` through a temporary sibling and a rename."""
    with atomic_target(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def replace_dir(build: Path, final: Path) -> None:
    """Move the completed directory `build` to `final`, replacing what was there."""
    if build != final:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(build, final)
