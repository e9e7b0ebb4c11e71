"""Several processes on one run: ``torchrun --nproc-per-node N -m compute.all ...``.

torchrun sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT; every process runs the same pipeline and
shards the expensive stages (images of the activation pass, units of the single-unit sweep, directions of the rotation
baseline, classes of greedy ablation, concept images of both dissection passes). Each rank writes its shard as a part file of the run; rank 0 waits for all of
them, combines them in item order and writes the stage, so the store is value for value the one a single process
writes. Finished shards survive a failed run: rerunning the same command recomputes only the missing ones.
NCCL on GPUs, gloo on CPUs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def shard(self, items: int) -> np.ndarray:
        """This rank's items: every world-th one, starting at the rank (balanced when costs vary smoothly)."""
        return np.arange(items)[self.rank::self.world]

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.active and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def from_environment(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                local_rank=int(os.environ.get("LOCAL_RANK", "0")))
