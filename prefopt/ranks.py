"""Which process this is: rank, world size and job identity, from torchrun's or SLURM's environment.

The only module that reads `RANK`, `WORLD_SIZE`, `LOCAL_RANK`, `SLURM_*` and `TORCHELASTIC_RUN_ID`; it has no
torch import, so the run-directory resolver and the report callback can ask it too.
"""

from __future__ import annotations

import datetime
import os


def env_int(*names: str, default: int) -> int:
    """The first of `names` that is set, as an integer."""
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


def rank() -> int:
    return env_int("RANK", "SLURM_PROCID", default=0)


def world_size() -> int:
    return env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)


def local_rank() -> int:
    return env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)


def run_stamp() -> str:
    """The default run directory's name: the same in every process of one distributed launch.

    A timestamp for a single process; the job id under SLURM (so a requeued job finds its own run directory
    and resumes) and the rendezvous id under torchrun (so all ranks agree on one directory).
    """
    if os.environ.get("SLURM_JOB_ID"):
        return f"slurm-{os.environ['SLURM_JOB_ID']}"
    if world_size() > 1:
        return f"torchrun-{os.environ.get('TORCHELASTIC_RUN_ID', 'none')[:8]}"
    return datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S")
