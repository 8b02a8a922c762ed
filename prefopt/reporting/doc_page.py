"""Results pages of the documentation site, written by the scripts that measure them.

A measuring script (`scripts/speed_vs_trl.py --doc docs/results/speed_vs_trl.md`, `scripts/dcr_study.py --doc ...`,
`scripts/rm_agreement.py --doc ...`) hands its table to `write_doc_page`, which puts a header above it: the UTC date,
the machine (platform, CPU and cores, torch version, GPU if any) and the exact command, so every figure on the site
says when, where and how it was measured. Rerunning the command replaces the page.
"""

from __future__ import annotations

import os
import platform
import shlex
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

from prefopt.io import atomic_write_text


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, str]:
    """What a figure was measured on: platform, CPU and core count, torch version, GPU name ('none' without CUDA)."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return {
        "platform": platform.platform(),
        "CPU": f"{cpu_name()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "GPU": gpu,
    }


def command_line(argv: list[str] | None = None) -> str:
    """The command that is running, as it can be typed again: `python <script> <arguments>`."""
    return shlex.join(["python", *(sys.argv if argv is None else argv)])


def render_page(
    title: str, body: str, command: str, when: datetime | None = None, machine_info: dict[str, str] | None = None
) -> str:
    """The page: a title, the header (date, command, machine) and the script's Markdown body."""
    when = when or datetime.now(timezone.utc)
    rows = [("date", f"{when:%Y-%m-%d %H:%M} UTC"), ("command", f"`{command}`"), *(machine_info or machine()).items()]
    header = "\n".join(f"| {key} | {value} |" for key, value in rows)
    return (
        f"# {title}\n\n"
        "This page is written by the command in its header; rerunning that command measures again and replaces "
        "the page.\n\n"
        f"| measured | |\n|---|---|\n{header}\n\n{body.strip()}\n"
    )


def write_doc_page(
    path: str | Path, title: str, body: str, command: str | None = None, when: datetime | None = None
) -> Path:
    """Write the results page atomically (`prefopt.io`) and return its path."""
    return atomic_write_text(path, render_page(title, body, command or command_line(), when), what="results page")
