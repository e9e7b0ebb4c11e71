"""compute.all under torchrun: two gloo ranks give the single-process store value for value, a rank that dies fails
the run with a one-line message, and a rerun resumes from the finished shares."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from compute.run.distributed import Dist
from store import StoreReader

ROOT = Path(__file__).resolve().parent.parent
COMPARED = ["images/probs", "images/predictions", "layers/conv5/activations/mean", "layers/conv5/activations/max",
            "layers/conv5/activations/moment_std", "layers/conv5/activations/sparsity",
            "layers/conv5/ablation/class_drop", "layers/conv5/ablation/overall_drop",
            "layers/conv5/ablation/baseline_class_acc"]
# Every dataset and attribute under these groups must be equal too (the stages sharded beyond the activations).
SECTIONS = ["layers/conv5/rotation", "layers/conv5/greedy", "layers/conv5/dissection", "concepts"]

# torchrun runs this script on each rank: compute.all, with rank 1 dying in FAIL_STAGE (a run_sharded stage name) once
# rank 0's share of it is finished, by an exception (FAIL_HOW=raise) or SIGKILL (FAIL_HOW=kill).
DYING_RANK = '''
import os, signal, sys, time

from compute.all import main
from compute.run.context import RunContext
from compute.errors import run_cli

run_sharded = RunContext.run_sharded


def dying(self, stage, *args, **kwargs):
    if stage == os.environ["FAIL_STAGE"] and self.dist.rank == 1:
        while not self.writer.done(self.shard_stage(stage, 0)):
            time.sleep(0.05)
        if os.environ["FAIL_HOW"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("injected failure")
    return run_sharded(self, stage, *args, **kwargs)


RunContext.run_sharded = dying
sys.exit(run_cli(main))
'''


def two_ranks(tiny_run, store: Path, program: list[str], **env) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node 2 <program> <the tiny run's options> --layers conv5``."""
    # Same thread count as this process (torchrun would set 1): BLAS blocking, hence rounding, depends on it.
    env = dict(os.environ, OMP_NUM_THREADS=str(torch.get_num_threads()), PYTHONPATH=str(ROOT), **env)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *program,
               *tiny_run["args"], "--layers", "conv5", "--store", str(store), "--device", "cpu"]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def section_contents(path: Path) -> dict:
    """Every dataset's values and every group's and dataset's attributes under SECTIONS, keyed by path."""
    contents = {}

    def add(name, item):
        contents[f"{item.name} attrs"] = dict(item.attrs)
        if isinstance(item, h5py.Dataset):
            contents[item.name] = item[()]

    with h5py.File(path, "r") as handle:
        for section in SECTIONS:
            add(section, handle[section])
            handle[section].visititems(add)
    return contents


def assert_equal_stores(single_path: Path, double_path: Path, paths: list[str]) -> None:
    single, double = StoreReader(single_path), StoreReader(double_path)
    for path in paths:
        assert np.array_equal(single.read(path), double.read(path)), path
    expected, got = section_contents(single_path), section_contents(double_path)
    assert got.keys() == expected.keys()
    datasets = [name for name in expected if not name.endswith(" attrs")]
    assert {"/layers/conv5/rotation/class_drop", "/layers/conv5/greedy/order", "/layers/conv5/greedy/random_class_acc",
            "/layers/conv5/dissection/thresholds", "/layers/conv5/dissection/iou"} <= set(datasets)
    for name, value in expected.items():
        if name.endswith(" attrs"):
            assert value.keys() == got[name].keys(), name
            for key in value:
                assert np.array_equal(value[key], got[name][key]), f"{name}: {key}"
        else:
            assert value.dtype == got[name].dtype and np.array_equal(value, got[name]), name


@pytest.fixture(scope="module")
def interrupted_run(tiny_run, tmp_path_factory) -> dict:
    """Two ranks on the tiny run, broken off twice by rank 1 and rerun each time until it completes.

    First rank 1 raises in dissection's second pass, then it is SIGKILLed in greedy (each time once rank 0 has
    finished its share), then the plain command finishes the run. Three launches instead of a clean run plus a
    faulty one keep the test short; the finished store still has every stage computed by two ranks.
    """
    tmp_path = tmp_path_factory.mktemp("ddp")
    script = tmp_path / "dying_rank.py"
    script.write_text(DYING_RANK)
    store, parts = tmp_path / "ddp.h5", tmp_path / ".ddp.parts"
    runs = []
    for program, env in (([str(script)], {"FAIL_STAGE": "dissection/conv5/iou", "FAIL_HOW": "raise"}),
                         ([str(script)], {"FAIL_STAGE": "greedy/conv5", "FAIL_HOW": "kill"}),
                         (["-m", "compute.all"], {})):
        done = two_ranks(tiny_run, store, program, **env)
        runs.append({"process": done, "store_exists": store.exists(),
                     "parts": {path.name for path in parts.glob("*.h5")}})
    return {"store": store, "parts": parts, "runs": runs}


def test_two_ranks_equal_one_process(tiny_run, interrupted_run):
    done = interrupted_run["runs"][-1]["process"]
    assert done.returncode == 0, done.stderr[-3000:]
    assert_equal_stores(tiny_run["store"], interrupted_run["store"], COMPARED)
    assert not interrupted_run["parts"].exists()


def test_a_dying_rank_fails_the_run_and_a_rerun_resumes_from_finished_shares(interrupted_run):
    raised, killed, finished = interrupted_run["runs"]
    # Rank 1 raised in dissection's second pass: one line says so and what to do; the first pass's shares stay.
    assert raised["process"].returncode != 0 and not raised["store_exists"]
    message = [line for line in raised["process"].stderr.splitlines() if line.startswith("rank 1 failed")]
    assert message == [f"rank 1 failed in stage dissection/conv5: RuntimeError: injected failure. Finished shards are "
                       f"kept in {interrupted_run['parts']}: rerun the same command to resume."]
    shards = {"dissection__conv5__thresholds__shard-0-of-2.h5", "dissection__conv5__thresholds__shard-1-of-2.h5",
              "dissection__conv5__iou__shard-0-of-2.h5"}
    assert shards <= raised["parts"]

    # The rerun reused them (and dropped them once dissection was written); then rank 1 was killed in greedy.
    stderr = killed["process"].stderr
    assert killed["process"].returncode != 0 and not killed["store_exists"]
    for rank, stage in ((0, "thresholds"), (1, "thresholds"), (0, "iou")):
        assert f"rank {rank}: reusing its finished share of dissection/conv5/{stage}" in stderr
    assert "rank 1: reusing its finished share of dissection/conv5/iou" not in stderr
    assert "exitcode  : -9" in stderr  # torchrun's report names the killed rank
    # The survivor says where it stood and what to do: on gloo its collective fails at once ("connection closed by
    # peer"); where a collective blocks instead (NCCL), torchrun's SIGTERM makes it say so (distributed.say_when_stopped).
    assert "rank 0 failed in stage greedy/conv5" in stderr or "rank 0 stopped by torchrun" in stderr
    assert "rerun the same command to resume" in stderr
    assert {"dissection__conv5.h5", "greedy__conv5__shard-0-of-2.h5"} <= killed["parts"]
    assert not shards & killed["parts"]

    assert "rank 0: reusing its finished share of greedy/conv5" in finished["process"].stderr


class _Writer:
    """Just enough of StoreWriter for run_sharded: parts in a dict."""

    def __init__(self):
        self.parts = {}

    def done(self, stage):
        return stage in self.parts

    def stage(self, stage):
        import contextlib

        @contextlib.contextmanager
        def opened():
            handle = h5py.File(f"mem-{len(self.parts)}-{os.getpid()}.h5", "w", driver="core", backing_store=False)
            yield handle
            self.parts[stage] = {name: handle[f"shard/{name}"][()] for name in handle["shard"]}
            handle.close()
        return opened()

    def read_part_group(self, stage, group):
        return dict(self.parts[stage])


def test_finished_share_is_reused(capsys, monkeypatch):
    from compute.run.context import RunContext

    calls = []
    ctx = RunContext.__new__(RunContext)
    ctx.writer = _Writer()
    ctx.dist = Dist(rank=1, world=2)
    ctx.sharded = frozenset({"ablation"})
    monkeypatch.setattr(Dist, "barrier", lambda self: None)
    compute = lambda idx: calls.append(idx.tolist()) or {"value": idx * 10}  # noqa: E731
    combine = lambda shares: RunContext.in_item_order(shares, ["value"])["value"].tolist()  # noqa: E731
    assert ctx.run_sharded("ablation/conv5", 5, compute, combine) is None
    assert calls == [[1, 3]]
    assert ctx.writer.parts["ablation/conv5/shard-1-of-2"]["value"].tolist() == [10, 30]
    ctx.run_sharded("ablation/conv5", 5, compute, combine)
    assert calls == [[1, 3]]  # not recomputed
    assert "reusing" in capsys.readouterr().err
    # A pass whose result the next one needs: every rank combines every share, in item order.
    ctx.writer.parts["ablation/conv5/shard-0-of-2"] = {"indices": np.array([0, 2, 4]), "value": np.array([0, 20, 40])}
    assert ctx.run_sharded("ablation/conv5", 5, compute, combine, everywhere=True) == [0, 10, 20, 30, 40]


STOPPED = r'''
import threading
from compute.run.distributed import say_when_stopped
say_when_stopped(lambda: "during stage greedy/conv5; finished shards are kept in PARTS")
print("ready", flush=True)
threading.Event().wait()  # blocked, as a rank waiting in an NCCL collective never returns to Python
'''


def test_a_rank_blocked_when_torchrun_stops_it_says_why_in_one_line():
    import signal

    env = dict(os.environ, RANK="3", PYTHONPATH=str(ROOT))
    process = subprocess.Popen([sys.executable, "-c", STOPPED], env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout.readline().strip() == "ready"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM
    assert stderr.strip().splitlines() == [
        "rank 3 stopped by torchrun: another rank failed (torchrun's report names it) during stage greedy/conv5; "
        "finished shards are kept in PARTS: rerun the same command to resume."]
