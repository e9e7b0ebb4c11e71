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
import signal
import socket
import sys
import threading
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


def current() -> Dist:
    """This process's place in a process group already joined (training joins its own); a world of one otherwise."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return Dist(rank=torch.distributed.get_rank(), world=torch.distributed.get_world_size(),
                    local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return Dist()


def from_environment(device: torch.device) -> Dist:
    """Join the process group torchrun describes in the environment; a plain run is a world of one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, timeout=datetime.timedelta(minutes=60))
    return current()


def say_when_stopped(describe) -> None:
    """When torchrun stops this rank because another one died (it sends SIGTERM), print one line saying so and what
    to do, then exit. A rank blocked in a collective never returns to Python, so a plain signal handler would not run:
    the signal is delivered through a wakeup file descriptor to a watcher thread instead. ``describe()`` gives the
    stage in progress and where the finished shards are."""
    reader, writer = socket.socketpair()
    writer.setblocking(False)
    signal.signal(signal.SIGTERM, lambda *_: None)  # a Python handler must exist for the wakeup fd to be written
    signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)

    def watch(keep_open=writer):  # the write end must live as long as the watcher: closed, recv would return
        while signal.SIGTERM not in reader.recv(64):
            pass
        print(f"rank {os.environ.get('RANK', '?')} stopped by torchrun: another rank failed (torchrun's report names "
              f"it) {describe()}: rerun the same command to resume.", file=sys.stderr, flush=True)
        os._exit(128 + signal.SIGTERM)

    threading.Thread(target=watch, name="stop-watcher", daemon=True).start()
