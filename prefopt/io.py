"""Writes that complete or leave the previous state, and fail as one line naming the path and the errno text.

Every file or directory is written under a temporary name in its own directory (`.tmp-<name>`), flushed, then
renamed into place with `os.replace`, so a kill or a full disk at any moment leaves the old version or the new
one. A failed write removes its temporary (the space a full disk needs back) and raises `StorageError`:
`cannot write checkpoint /run/checkpoints/step_00000006: No space left on device [ENOSPC]; the last complete
checkpoint is ...`. Leftovers of a killed write are removed by `remove_leftovers` at the next start. Caches also get
their
content keys (`cache_key`) and locks (`locked`) here.
Libraries that hide the OSError are seen through: safetensors' `... (os error 28)` and torch's
`[enforce fail at inline_container.cc ...]` (whose OSError is its context when it wrote to a Python file).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from prefopt.errors import StorageError

log = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
# Temporary names this project wrote before this module (summary.json.tmp, metrics.jsonl.tmp).
_LEGACY_TMP = re.compile(r".+\.jsonl?\.tmp$")
# An errno a library spelled out in its message: Rust's `(os error 28)`, Python's `[Errno 28]`.
_ERRNO_IN_TEXT = re.compile(r"\(os error (\d+)\)|\[Errno (\d+)\]")

Note = str | Callable[[], str] | None


def os_error_of(exc: BaseException, path: Path | str | None = None) -> OSError | None:
    """The operating-system error behind `exc` (itself, or one a library wrapped), else None."""
    if isinstance(exc, OSError) and exc.errno:
        return exc
    match = _ERRNO_IN_TEXT.search(str(exc))
    if match:
        code = int(match.group(1) or match.group(2))
        return OSError(code, os.strerror(code))
    if "inline_container" in str(exc):  # torch.save's zip writer: the write that failed is its context
        context = exc.__context__
        if isinstance(context, OSError) and context.errno:
            return context
        if path is not None and _free_bytes(path) == 0:  # it wrote to a path itself: a full disk says so
            return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return None


def _free_bytes(path: Path | str) -> int | None:
    p = Path(path)
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        st = os.statvfs(p)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def storage_error(
    err: OSError, path: Path | str, what: str = "", action: str = "write", note: Note = None
) -> StorageError:
    """One line: `cannot write <what> <path>: <errno text> [<ENAME>]; <note>`."""
    code = err.errno or 0
    text = os.strerror(code) if code else str(err)
    name = errno.errorcode.get(code, str(code))
    where = f"{what} {path}" if what else str(path)
    message = f"cannot {action} {where}: {text} [{name}]"
    failed = getattr(err, "filename", None)
    if failed and Path(failed) != Path(path):
        message += f" (at {failed})"
    note = note() if callable(note) else note
    return StorageError(f"{message}; {note}" if note else message)


@contextmanager
def named_errors(path: Path | str, what: str = "", action: str = "write", note: Note = None) -> Iterator[None]:
    """Turn an OSError (or a library's wrapped one) raised inside the block into one StorageError."""
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        err = os_error_of(exc, path)
        if err is None:
            raise
        raise storage_error(err, path, what, action, note) from exc


def temp_path(final: Path | str) -> Path:
    """The temporary name `final` is written under: `.tmp-<name>` in the same directory (same filesystem)."""
    final = Path(final)
    return final.with_name(f"{TMP_PREFIX}{final.name}")


def fsync_dir(path: Path | str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not every filesystem lets a directory be synced; the rename is still atomic


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def atomic_write_bytes(path: Path | str, data: bytes, what: str = "", note: Note = None) -> Path:
    """Write `data` to `path` atomically; a failure removes the temporary and raises StorageError."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with named_errors(path, what, note=note):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: Path | str, text: str, what: str = "", note: Note = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), what, note)


def atomic_write_json(path: Path | str, payload: Any, what: str = "", note: Note = None, **dumps: Any) -> Path:
    return atomic_write_text(path, json.dumps(payload, **dumps), what, note)


def append_text(path: Path | str, text: str, what: str = "", note: Note = None) -> None:
    """Append `text` to `path`; a failed append is cut back to the old length (no torn last line)."""
    path = Path(path)
    data = text.encode("utf-8")
    with named_errors(path, what, note=note), open(path, "ab", buffering=0) as fh:  # unbuffered: no retry at close
        size = fh.seek(0, os.SEEK_END)
        try:
            view = memoryview(data)
            while view:
                view = view[fh.write(view) :]
        except BaseException:
            try:
                os.ftruncate(fh.fileno(), size)
            except OSError:
                pass
            raise


@contextmanager
def atomic_dir(final: Path | str, what: str = "directory", note: Note = None) -> Iterator[Path]:
    """Yield a fresh temporary directory; when the block ends it replaces `final` in one rename.

    If the block (or the rename) fails, the temporary is removed and an OSError, also one a library wrapped,
    becomes a StorageError naming `final`; `final` and everything beside it are left as they were.
    """
    final = Path(final)
    tmp = temp_path(final)
    with named_errors(final, what, note=note):
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove(tmp)
        tmp.mkdir()
    try:
        with named_errors(final, what, note=note):
            yield tmp
            fsync_dir(tmp)
            if final.exists():  # re-writing the same name: the old one goes only once the new one is complete
                _remove(final)
            os.replace(tmp, final)
    except BaseException:
        _remove(tmp)
        raise
    fsync_dir(final.parent)


@contextmanager
def atomic_target(path: Path | str, what: str = "", note: Note = None) -> Iterator[Path]:
    """Yield a temporary path for a library to write (`save_file(..., tmp)`); renamed to `path` when complete."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    with named_errors(path, what, note=note):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield tmp
            os.replace(tmp, path)
        except BaseException:
            _remove(tmp)
            raise
    fsync_dir(path.parent)


def replace_dir(build: Path | str, final: Path | str, what: str = "cache entry") -> None:
    """Move the completed directory `build` to `final` in one rename, replacing what was there."""
    build, final = Path(build), Path(final)
    if build == final:
        return
    with named_errors(final, what):
        _remove(final)
        os.replace(build, final)
    fsync_dir(final.parent)


def cache_key(payload: dict, length: int = 16) -> str:
    """sha256 of the canonical JSON of `payload`: its first `length` hex digits (a name, not a password)."""
    text = json.dumps(payload, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:length]


@contextmanager
def locked(path: Path):
    """An exclusive lock on `path` (a sibling `.lock` file) while computing what will be cached there."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def remove_leftovers(directory: Path | str) -> list[Path]:
    """Remove what interrupted writes left in `directory` (`.tmp-*`, old `*.json.tmp`); the removed paths.

    Only for a directory this process alone writes to (a run directory, its checkpoints): a concurrent
    writer's temporary would be taken for a leftover.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = []
    for entry in directory.iterdir():
        if entry.name.startswith(TMP_PREFIX) or _LEGACY_TMP.match(entry.name):
            _remove(entry)
            removed.append(entry)
            log.info("removed %s, left by an interrupted write", entry)
    return removed
