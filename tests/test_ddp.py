"""compute.train under DistributedDataParallel: two gloo processes started the way torchrun starts them."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch(world: int, argv: list[str], timeout: float = 120) -> list[subprocess.CompletedProcess]:
    """Start ``world`` processes of ``python -m compute.train`` with torchrun's environment; wait for all."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        procs.append(subprocess.Popen([sys.executable, "-m", "compute.train", *argv], cwd=ROOT, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            raise
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


def test_two_gloo_ranks_train_one_model(tmp_path):
    from compute.data import synthscenes
    from compute.models import get_spec

    root = synthscenes.generate(tmp_path / "scenes", seed=0, train_per_class=4, val_per_class=2, progress=False)
    data_dir = tmp_path / "data"
    # demo-bn: batch norm is the part DDP treats specially (buffers broadcast from rank 0)
    runs = launch(2, ["--model", "demo", "--variant", "bn", "--epochs", "1", "--data", str(root),
                      "--data-dir", str(data_dir)])
    for rank, run in enumerate(runs):
        assert run.returncode == 0, f"rank {rank} failed:\n{run.stderr[-3000:]}"
    # rank 0 alone reports and saves; check_replicas (inside training) found identical parameters on both ranks,
    # otherwise the run would have failed
    assert "validation accuracy" in runs[0].stdout and "2 x cpu" in runs[0].stdout
    assert "validation accuracy" not in runs[1].stdout
    weights = sorted(p.name for p in (data_dir / "weights").iterdir())
    assert weights == ["demo-bn-seed0.pt"]
    model = get_spec("demo-bn").build()
    model.load_state_dict(torch.load(data_dir / "weights" / "demo-bn-seed0.pt", weights_only=True))
    trained = model.bn5.num_batches_tracked.item()
    assert trained == 96 // 64 + 1  # 96 training images in batches of 64: two steps, each rank takes half a batch
