"""Device, precision, seeding and the distributed set-up: all of prefopt's distributed code.

Rank and world size come from the launcher's environment through `prefopt.ranks` (torchrun's
RANK/WORLD_SIZE/LOCAL_RANK, or SLURM's SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID), the only module that reads them.
"""

from __future__ import annotations

import gc
import os
import random
import signal
import time
from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import psutil
import torch
import torch.distributed as dist
from submitit import JobEnvironment

from prefopt import ranks
from prefopt.errors import ConfigError


@dataclass
class Hardware:
    """`conf/hardware/*.yaml`: where and how the model runs."""

    device: str = "auto"  # auto | cpu | cuda
    strategy: str = "none"  # none | ddp | fsdp
    backend: str | None = None  # process-group backend; None = nccl on CUDA, gloo on CPU
    threads: int | str | None = None  # torch CPU threads; auto = the cores this process may use; None = torch's default
    mixed_precision: str | None = None  # fsdp: "bf16" computes in bf16 over fp32 master weights (upcast first)
    cpu_offload: bool = False  # fsdp: keep sharded parameters, gradients and optimizer state in CPU memory
    find_unused_parameters: bool = False  # ddp

    def __post_init__(self):
        if self.strategy not in ("none", "ddp", "fsdp"):
            raise ConfigError(f"hardware.strategy must be none, ddp or fsdp (got {self.strategy!r})")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ConfigError(f"hardware.device must be auto, cpu or cuda (got {self.device!r})")
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("hardware.device=cuda but no CUDA device is visible (use hardware=cpu)")
        if self.threads == "auto":
            self.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise ConfigError(f"hardware.threads must be a positive integer, auto or null (got {self.threads!r})")
        self.rank, self.world_size, self.local_rank = ranks.rank(), ranks.world_size(), ranks.local_rank()
        if self.world_size > 1 and self.strategy == "none":
            raise ConfigError(
                f"{self.world_size} processes were launched but hardware.strategy=none "
                f"(use hardware=ddp or hardware=fsdp)"
            )

    @property
    def torch_device(self) -> torch.device:
        use_cuda = self.device == "cuda" or (self.device == "auto" and torch.cuda.is_available())
        return torch.device("cuda", self.local_rank) if use_cuda else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """A process group and wrapping: more than one process, or FSDP (it shards even over a group of one)."""
        return self.world_size > 1 or self.strategy == "fsdp"

    def setup(self) -> Hardware:
        if self.threads:
            torch.set_num_threads(cast(int, self.threads))  # "auto" became a count in __post_init__
        if self.torch_device.type == "cuda":
            torch.cuda.set_device(self.torch_device)
        if self.distributed and not dist.is_initialized():
            backend = self.backend or ("nccl" if self.torch_device.type == "cuda" else "gloo")
            # one process (torchrun --nproc_per_node 1, or a plain launch with hardware=fsdp): an in-memory store,
            # no rendezvous address needed
            store: dict[str, Any] = {"store": dist.HashStore()} if self.world_size == 1 else {}
            dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size, **store)
        return self

    def teardown(self) -> None:
        """End the process group after a finished job, once the job's models are released: what still holds the
        group (FSDP's meshes in reference cycles, gloo's finished work) is collected, the group destroyed, and
        collected again while the interpreter is alive. Gloo's worker threads that outlive the group into
        interpreter shutdown abort the process ("terminate called without an active exception"). No barrier:
        rank 0 may still be evaluating alone for longer than a collective's timeout."""
        if self.distributed and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
            gc.collect()

    # -- wrapping and state dicts -------------------------------------------------------------------------
    def wrap(self, module: torch.nn.Module, trainable: bool = True) -> torch.nn.Module:
        """DDP or FSDP2 (`fully_shard`) around `module`: the policy (trainable) or a frozen reference."""
        if not self.distributed:
            return module
        if self.strategy == "ddp":
            if not trainable:
                return module  # a frozen reference needs no gradient sync: each rank keeps a copy
            ids = [self.local_rank] if self.torch_device.type == "cuda" else None
            return torch.nn.parallel.DistributedDataParallel(
                module, device_ids=ids, find_unused_parameters=self.find_unused_parameters
            )
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs: dict[str, Any] = {}
        if self.mixed_precision:
            if self.mixed_precision != "bf16":
                raise ConfigError(f"hardware.mixed_precision must be bf16 or null (got {self.mixed_precision!r})")
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
            # fp32 master weights (a bf16 checkpoint is upcast), bf16 compute: cast before sharding so each
            # rank keeps only its fp32 shard afterwards
            module.float()
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for block in _decoder_layers(module):  # one FSDP unit per decoder layer, then the rest as the root
            fully_shard(block, **kwargs)
        fully_shard(module, **kwargs)
        return module

    def full_state_dict(self, model: torch.nn.Module) -> dict:
        """The model's full, unsharded state on CPU (collective under FSDP; empty off rank 0 then)."""
        if not (self.distributed and self.strategy == "fsdp"):
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def load_full_state_dict(self, model: torch.nn.Module, state: dict) -> None:
        """Load a full (unsharded) state dict, e.g. from `full_state_dict`, into a possibly sharded model."""
        if not (self.distributed and self.strategy == "fsdp"):
            model.load_state_dict(state)
            return
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))

    def optimizer_state_dict(self, model: torch.nn.Module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )

    def load_optimizer_state_dict(self, model: torch.nn.Module, optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(
            model,
            optimizer,
            optim_state_dict=state,
            options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False),
        )  # every rank read the file

    def all_reduce_mean(self, values: dict[str, float]) -> dict[str, float]:
        """Average scalar metrics over ranks (every rank gets the same dict back)."""
        if not self.distributed or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=self.torch_device)
        dist.all_reduce(t)
        return {k: v / self.world_size for k, v in zip(keys, t.tolist())}

    def all_gather_list(self, items: list) -> list:
        """Every rank's `items` (picklable), concatenated in rank order; every rank gets the same list back."""
        if not self.distributed:
            return list(items)
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, items)
        return [x for part in gathered for x in part]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _decoder_layers(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (what FSDP shards one by one), found by the usual `layers` list."""
    for sub in module.modules():
        layers = getattr(sub, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def stop_signals() -> tuple[signal.Signals, ...]:
    """The signals that ask a run to checkpoint at the end of its step and stop.

    SIGTERM: `scancel`, `scontrol requeue`, preemption, torchrun shutting its workers down. And the signal the
    submitit launcher asks SLURM for before the time limit (`--signal=<sig>@<signal_delay_s>` in the sbatch
    script it writes): submitit's own setting, USR2 unless `SUBMITIT_PREEMPT_SIGNAL` names another.
    """
    launcher = getattr(signal, f"SIG{JobEnvironment.USR_SIG}", None)
    if launcher is None:
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={JobEnvironment.USR_SIG!r} names no signal (e.g. USR2)")
    return tuple(dict.fromkeys((signal.SIGTERM, launcher)))


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


def process_age_s() -> float:
    """Seconds since this process started (what a job spends on imports and set-up before its first step)."""
    return time.time() - psutil.Process().create_time()


def peak_memory_mb() -> float:
    """Peak resident memory of this process (CPU), or peak allocated CUDA memory when on a GPU."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
