"""Data parallelism over the meta-batch with torch.distributed (NCCL on GPUs, gloo on CPU).

    torchrun --nproc-per-node 2 run.py --mode FULL --k 20 --meta-batch 64

Every rank samples the same global meta-batch from the run's seed and keeps its own
contiguous slice of tasks, so the tasks (and the result) do not depend on the number
of ranks. Each rank takes the meta-gradient of the mean query loss over its slice; one
all-reduce of all gradients and metrics, flattened into a single buffer, averages them
(equal slices: the average of the slice means is the global mean), and Adam then steps
identically on every rank. Only rank 0 prints and writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from phase12.config import ConfigError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    def check_divides(self, meta_batch: int) -> None:
        """ConfigError unless `meta_batch` splits into equal shares over the ranks."""
        if meta_batch % self.size:
            raise ConfigError(
                f"meta_batch {meta_batch} does not divide over {self.size} ranks; "
                f"use a multiple of {self.size}",
                "meta_batch",
            )

    def task_slice(self, meta_batch: int) -> slice:
        """This rank's contiguous share of a meta-batch (which must divide evenly)."""
        share = meta_batch // self.size
        return slice(self.rank * share, (self.rank + 1) * share)


SINGLE_PROCESS = World()


def torchrun_world_size() -> int:
    """How many ranks torchrun launched (1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_by_torchrun() -> bool:
    return torchrun_world_size() > 1


def local_device(device: str) -> str:
    """Under torchrun, 'auto'/'cuda' mean this rank's GPU (LOCAL_RANK); otherwise unchanged."""
    if launched_by_torchrun() and torch.cuda.is_available() and device in ("auto", "cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device


def init_world(device: torch.device) -> World:
    """Join the process group torchrun set up (NCCL for CUDA, gloo for CPU), if any."""
    if not launched_by_torchrun():
        return SINGLE_PROCESS
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def all_reduce_mean(tensors: list[torch.Tensor], world: World) -> None:
    """Average `tensors` in place over all ranks with one all-reduce of one flat buffer."""
    if world.size == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    flat.div_(world.size)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))
