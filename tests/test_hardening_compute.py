"""Hardening (issue 16), compute side: a full disk, out-of-range options, checkpoints that are no state dict, and links
that ask the app for what a store does not have. Each gets one line that says what to do, never a traceback."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from compute.all import main as compute_all
from compute.all import parse_args
from compute.errors import UserError, no_space_left, run_cli
from compute.models.registry import get_spec
from store import StoreReader, StoreWriter
from tests.conftest import ROOT, small_run_options
from tests.views import open_view

HDF5_FULL = ("Disable slist on flush dest failure failed (file write failed: time = Mon Nov 30 15:49:55 2026\n, "
             "filename = '{}', file descriptor = 4, errno = 28, error message = 'No space left on device', buf = "
             "0x55d813e6e230, total write size = 4096, bytes this sub-write = 4096, offset = 7192)")


# --- 3. a full disk -----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_run(tiny_run, tmp_path_factory) -> dict:
    """A copy of the tiny run's data set and weights, a 24-image concept set and options for a run of seconds."""
    data_dir = tmp_path_factory.mktemp("hardening-data")
    options = [*small_run_options(tiny_run, data_dir), "--data-dir", str(data_dir)]
    return {"data_dir": data_dir, "options": options}


def full_disk_at(monkeypatch, failing: str, error: Exception) -> None:
    """Stage ``failing`` meets a full disk after its part file was opened (the writer then discards the part)."""
    real_stage = StoreWriter.stage

    @contextmanager
    def stage(self, name):
        with real_stage(self, name) as handle:
            if name == failing:
                raise error
            yield handle

    monkeypatch.setattr(StoreWriter, "stage", stage)


def one_error_line(err: str) -> str:
    """The error line of a run's stderr; progress bars and 'skipped' notes may come before it, tracebacks may not."""
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


def visible_stores(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.suffix == ".h5" and not p.name.startswith("."))


@pytest.mark.parametrize("kind", ["OSError", "HDF5 RuntimeError"])
def test_a_full_disk_in_a_stage_is_one_line_and_the_rerun_resumes(small_run, tmp_path, monkeypatch, capsys, kind):
    stores = tmp_path / "stores"
    options = small_run["options"] + ["--store", str(stores)]
    parts = stores / ".demo.parts"
    error = (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(parts / "topimages__conv5.h5.tmp"))
             if kind == "OSError" else RuntimeError(HDF5_FULL.format(parts / "topimages__conv5.h5.tmp")))
    full_disk_at(monkeypatch, "topimages/conv5", error)
    assert run_cli(compute_all, options) == 2
    line = one_error_line(capsys.readouterr().err)
    mount = Path(stores)
    while not os.path.ismount(mount):
        mount = mount.parent
    assert line == (f"error: no space left on {mount} while writing topimages/conv5: free space and rerun the same "
                    f"command to resume")
    done = sorted(p.name for p in parts.iterdir())
    assert {"setup.h5", "baseline.h5", "activations__conv5.h5", "ablation__conv5.h5", "dissection__conv5.h5"} <= set(done)
    assert not [name for name in done if name.startswith("topimages") or name.endswith(".tmp")]
    assert visible_stores(stores) == []

    monkeypatch.undo()
    assert run_cli(compute_all, options) == 0
    out = capsys.readouterr().out
    assert "resuming demo.h5" in out and visible_stores(stores) == ["demo.h5"]
    assert StoreReader(stores / "demo.h5").has_section("conv5", "topimages")


def test_a_full_disk_while_assembling_keeps_the_parts(small_run, tmp_path, monkeypatch, capsys):
    stores = tmp_path / "stores"
    options = small_run["options"] + ["--store", str(stores)]

    def full(*_):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(StoreWriter, "_assemble", full)
    assert run_cli(compute_all, options) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "no space left on " in line and "while writing demo.h5 (assembling the finished stages)" in line
    assert "rerun the same command to resume" in line
    assert sorted(p.name for p in stores.iterdir()) == [".demo.parts"]  # no store, no half-assembled file
    assert (stores / ".demo.parts" / "live__conv5.h5").exists()
    monkeypatch.undo()
    assert run_cli(compute_all, options) == 0
    assert visible_stores(stores) == ["demo.h5"]


def test_no_space_left_reads_python_and_hdf5_errors():
    assert no_space_left(OSError(errno.ENOSPC, "No space left on device"))
    assert no_space_left(RuntimeError(HDF5_FULL.format("/x/part.h5.tmp")))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("Can't decrement id ref count")
    except RuntimeError as chained:
        assert no_space_left(chained)
    assert not no_space_left(OSError(errno.EACCES, "Permission denied"))
    assert not no_space_left(RuntimeError("errno = 2, error message = 'No such file or directory'"))


@pytest.fixture()
def small_tmpfs(tmp_path):
    """A 1 MiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mount = tmp_path / "full"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_a_full_tmpfs_exits_2_in_one_line_and_resumes(small_run, small_tmpfs):
    """A real full disk: HDF5 fails inside writes and closes; nothing may crash, the next run resumes."""
    command = [sys.executable, "-m", "compute.all", *small_run["options"], "--store", str(small_tmpfs)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_error_line(done.stderr)
    assert line.startswith(f"error: no space left on {small_tmpfs} while writing ")
    assert line.endswith(": free space and rerun the same command to resume")
    parts = small_tmpfs / ".demo.parts"
    finished = [p.name for p in parts.glob("*.h5")]
    assert "setup.h5" in finished and not list(parts.glob("*.tmp"))
    assert visible_stores(small_tmpfs) == [] and not list(small_tmpfs.glob(".*.assembling"))

    grown = subprocess.run(["mount", "-o", "remount,size=64m", str(small_tmpfs)], capture_output=True)
    if grown.returncode != 0:
        return
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming demo.h5: {len(finished)} stages already done" in done.stdout
    assert visible_stores(small_tmpfs) == ["demo.h5"]


# --- 4. options out of range --------------------------------------------------------------------------------------

@pytest.mark.parametrize("option, value, expected", [
    ("--per-class", "0", "at least 1 image per class"),
    ("--per-class", "-3", "at least 1 image per class"),
    ("--top-k", "-1", "0 or more top images per unit"),
    ("--quantile", "0", "a quantile between 0 and 1"),
    ("--quantile", "1.5", "a quantile between 0 and 1"),
    ("--quantile", "nan", "a quantile between 0 and 1"),
    ("--iou-threshold", "-0.1", "an IoU from 0 to 1"),
    ("--iou-threshold", "2", "an IoU from 0 to 1"),
    ("--greedy-steps", "-1", "0 or more units per class"),
    ("--random-orders", "-2", "0 or more random orders"),
    ("--rotations", "-1", "0 or more rotations"),
    ("--batch-size", "0", "a batch size of at least 1"),
    ("--max-memory", "0", "a positive number of GiB"),
    ("--max-memory", "inf", "a positive number of GiB"),
    ("--seed", "-1", "a seed of 0 or more"),
])
def test_options_out_of_range_are_refused_up_front(option, value, expected, tmp_path, capsys):
    with pytest.raises(UserError, match=f"^{option} {value} is out of range: pass {expected}"):
        parse_args([option, value])
    # through the command line: one line, exit 2, before anything is loaded or written
    assert run_cli(compute_all, ["--data-dir", str(tmp_path), option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option} {value} is out of range") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_options_at_the_edges_of_their_ranges_are_taken():
    args = parse_args(["--per-class", "1", "--top-k", "0", "--quantile", "0.5", "--iou-threshold", "0",
                       "--greedy-steps", "0", "--random-orders", "0", "--rotations", "0", "--batch-size", "1",
                       "--max-memory", "0.01", "--seed", "0"])
    assert args.per_class == 1 and args.iou_threshold == 0 and args.max_memory == 0.01
    assert parse_args(["--iou-threshold", "1"]).iou_threshold == 1
    assert parse_args([]).per_class is None


# --- 7. checkpoints that hold no state dict -----------------------------------------------------------------------

NOT_STATE_DICTS = {
    "tensor": (torch.zeros(3), "a single tensor of shape (3,)"),
    "list": ([torch.zeros(2), torch.zeros(2)], "a list of 2 items"),
    "wrapped list": ({"state_dict": [torch.zeros(3)], "epoch": 3}, "a dict whose 'state_dict' holds a list of 1 item"),
    "numbers": ({"epoch": 3, "arch": "alexnet"}, "a dict with keys 'epoch', 'arch'"),
    "empty": ({}, "an empty dict"),
}
LOADERS = ["demo", "demo-bn", "alexnet-places", "resnet18-places", "alexnet-imagenet", "resnet18-imagenet",
           "alexnet-places-bn", "alexnet-imagenet-dropout"]


@pytest.mark.parametrize("model", LOADERS)
@pytest.mark.parametrize("content", list(NOT_STATE_DICTS))
def test_a_checkpoint_that_is_no_state_dict_is_refused_in_one_line(model, content, tmp_path):
    payload, described = NOT_STATE_DICTS[content]
    path = tmp_path / "t.pt"
    torch.save(payload, path)
    with pytest.raises(UserError) as error:
        get_spec(model).load(path, tmp_path)
    message = str(error.value)
    assert message == (f"weights file {path} holds no state dict but {described}: expected a mapping of parameter "
                       f"names to tensors, optionally wrapped as {{'state_dict': ...}}; save one with "
                       f"torch.save(model.state_dict(), FILE)")


def test_a_wrapped_demo_state_dict_still_loads(tmp_path):
    spec = get_spec("demo")
    state = spec.build().state_dict()
    for wrapper in ("state_dict", "model_state_dict"):
        path = tmp_path / f"{wrapper}.pt"
        torch.save({wrapper: state, "epoch": 3}, path)
        model, provenance = spec.load(path, tmp_path)
        assert torch.equal(model.state_dict()["conv1.weight"], state["conv1.weight"])
        assert provenance["weights_path"] == str(path)


# --- 8. links that ask for what the store does not have ------------------------------------------------------------

def warnings(at) -> list[str]:
    return [w.value for w in at.warning]


@pytest.mark.parametrize("asked, shown, why", [
    ("999999", 127, "outside this layer's units 0 to 127"),
    ("-1", 0, "outside this layer's units 0 to 127"),
    ("abc", 0, "which is not a unit number"),
    ("3.7", 0, "which is not a unit number"),
])
def test_a_unit_link_out_of_range_or_malformed_says_what_is_shown(store_env, asked, shown, why):
    at = open_view("unit", store_env["store"], layer="conv5", unit=asked)
    assert at.number_input[0].value == shown
    assert at.title[0].value == f"conv5 · unit {shown}"
    assert warnings(at) == [f"The link asks for unit '{asked}', {why}: showing unit {shown} instead."]
    assert at.query_params["unit"] == str(shown)


def test_an_unknown_layer_or_class_in_a_link_says_what_is_shown(store_env):
    at = open_view("unit", store_env["store"], layer="conv9", unit="3", **{"class": "no-such-class"})
    assert at.selectbox(key="layer").value == "conv5"
    assert warnings(at) == [
        "The link asks for layer 'conv9', which is not among this page's layer choices: showing layer conv5 instead.",
        "The link asks for class 'no-such-class', which is not among this page's class choices: showing no class "
        "instead.",
    ]
    assert at.number_input[0].value == 3


def test_a_valid_link_shows_no_notice(store_env):
    store = StoreReader(store_env["store"])
    at = open_view("unit", store_env["store"], layer="conv4", unit="95", **{"class": store.classes[1]})
    assert at.number_input[0].value == 95 and warnings(at) == []
