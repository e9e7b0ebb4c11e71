"""compute.all under torchrun: two gloo ranks give the single-process store value for value, and a rank's finished
share is reused when a run is repeated."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch

from compute.distributed import Dist
from store import StoreReader

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ["images/probs", "images/predictions", "layers/conv5/activations/mean", "layers/conv5/activations/max",
            "layers/conv5/activations/moment_std", "layers/conv5/activations/sparsity",
            "layers/conv5/ablation/class_drop", "layers/conv5/ablation/overall_drop",
            "layers/conv5/ablation/baseline_class_acc"]


def test_two_ranks_equal_one_process(tiny_run, tmp_path):
    single = StoreReader(tiny_run["store"])
    args = [a for a in tiny_run["args"]]
    store = tmp_path / "ddp.h5"
    # Same thread count as this process (torchrun would set 1): BLAS blocking, hence rounding, depends on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "compute.all", *args, "--layers", "conv5", "--store", str(store), "--device", "cpu"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    double = StoreReader(store)
    for path in COMPARED:
        assert np.array_equal(single.read(path), double.read(path)), path
    assert not list(tmp_path.glob(".*parts"))


class _Writer:
    """Just enough of StoreWriter for run_sharded: parts in a dict."""

    def __init__(self):
        self.parts = {}

    def done(self, stage):
        return stage in self.parts

    def stage(self, stage):
        import contextlib

        import h5py

        @contextlib.contextmanager
        def opened():
            handle = h5py.File(f"mem-{len(self.parts)}-{os.getpid()}.h5", "w", driver="core", backing_store=False)
            yield handle
            self.parts[stage] = {name: handle[f"shard/{name}"][()] for name in handle["shard"]}
            handle.close()
        return opened()


def test_finished_share_is_reused(capsys, monkeypatch):
    from compute.context import RunContext

    calls = []
    ctx = RunContext.__new__(RunContext)
    ctx.writer = _Writer()
    ctx.dist = Dist(rank=1, world=2)
    monkeypatch.setattr(Dist, "barrier", lambda self: None)
    compute = lambda idx: calls.append(idx.tolist()) or {"value": idx * 10}  # noqa: E731
    assert ctx.run_sharded("ablation/conv5", 5, compute, lambda shares: shares) is None
    assert calls == [[1, 3]]
    assert ctx.writer.parts["ablation/conv5/shard-1-of-2"]["value"].tolist() == [10, 30]
    ctx.run_sharded("ablation/conv5", 5, compute, lambda shares: shares)
    assert calls == [[1, 3]]  # not recomputed
    assert "reusing" in capsys.readouterr().err
