"""A small real filesystem for tests of full and read-only disks: a tmpfs mounted for one test (root only)."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def tmpfs(directory: Path, size: str = "16m") -> Iterator[Path]:
    """Mount a tmpfs of `size` on `directory` (created), unmount it afterwards; skip the test if not permitted."""
    directory.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here: the real full-disk test needs a small tmpfs")
    out = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)], capture_output=True, text=True
    )
    if out.returncode != 0:
        pytest.skip(f"mounting a {size} tmpfs is not permitted here ({out.stderr.strip() or out.returncode})")
    try:
        yield directory
    finally:
        subprocess.run(["umount", str(directory)], capture_output=True)


def remount_read_only(directory: Path) -> None:
    out = subprocess.run(["mount", "-o", "remount,ro", str(directory)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"remounting the tmpfs read-only is not permitted here ({out.stderr.strip()})")


def fill(directory: Path, leave: int = 0) -> Path:
    """Fill the filesystem of `directory` with one file, leaving about `leave` bytes free."""

    st = os.statvfs(directory)
    filler = directory / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))
    return filler
