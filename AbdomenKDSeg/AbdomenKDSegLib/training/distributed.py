"""Multi-process training helpers (``torchrun`` + DistributedDataParallel; NCCL on GPU, gloo on CPU)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any, List

import torch
import torch.distributed as dist

from ..engine.inference import resolve_device


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(device_type: str) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, ...).

    A single process (no WORLD_SIZE or WORLD_SIZE=1) returns ``DistInfo()`` and initialises nothing.
    An already initialised group (e.g. a test that spawned processes) is reused.
    """
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistInfo()
    backend = "nccl" if device_type == "cuda" else "gloo"
    # preprocessing and coarse predictions run on rank 0 while the others wait at a barrier
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(hours=12))
    return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def all_gather_object(info: DistInfo, obj: Any) -> List[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (``[obj]`` when not distributed)."""
    if not info.enabled:
        return [obj]
    out: List[Any] = [None] * info.world_size
    dist.all_gather_object(out, obj)
    return out


def pick_device(device: str, info: DistInfo) -> torch.device:
    """"auto" -> this rank's GPU if CUDA is available, else the CPU; "cuda" without CUDA is an error."""
    chosen = torch.device(resolve_device(device, fallback=False))
    if chosen.type == "cuda" and chosen.index is None:
        torch.cuda.set_device(info.local_rank)
        return torch.device("cuda", info.local_rank)
    return chosen
