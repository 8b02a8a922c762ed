"""Device, precision, seeding and the distributed set-up: the one module that knows about ranks.

Rank and world size come from the launcher's environment (torchrun's RANK/WORLD_SIZE/LOCAL_RANK, or
SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID); nothing else in prefopt reads them.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from prefopt.errors import ConfigError


def _env_int(*names: str, default: int) -> int:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return default


@dataclass
class Hardware:
    """`conf/hardware/*.yaml`: where and how the model runs."""

    device: str = "auto"  # auto | cpu | cuda
    strategy: str = "none"  # none | ddp | fsdp
    backend: str | None = None  # process-group backend; None = nccl on CUDA, gloo on CPU
    threads: int | None = None  # torch CPU threads; None = torch's default

    def __post_init__(self):
        if self.strategy not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"hardware.strategy must be none, ddp or fsdp (got {self.strategy!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"hardware.device must be auto, cpu or cuda (got {self.device!r})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("hardware.device=cuda but no CUDA device is visible (use hardware=cpu)")
        self.rank = _env_int("RANK", "SLURM_PROCID", default=0)
        self.world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS", default=1)
        self.local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID", default=0)
        if self.world_size > 1 and self.strategy == "none":
            raise ConfigError(f"{self.world_size} processes were launched but hardware.strategy=none "
                              f"(use hardware=ddp or hardware=fsdp)")

    @property
    def torch_device(self) -> torch.device:
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(self) -> "Hardware":
        if self.threads:
            torch.set_num_threads(self.threads)
        if self.torch_device.type == "cuda":
            torch.cuda.set_device(self.torch_device)
        if self.distributed and not dist.is_initialized():
            backend = self.backend or ("nccl" if self.torch_device.type == "cuda" else "gloo")
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)
        return self

    def teardown(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (every rank gets the same dict back)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.torch_device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
