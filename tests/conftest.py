"""Shared fixtures: one tiny but real run of the whole pipeline, computed once per test session.

Tiny SynthScenes (8 training and 6 validation images per class), a demo CNN trained for two epochs, and
``compute.all`` with small settings. Tests that need a store read this one instead of computing their own.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before any test imports torch: see compute/__init__.py

import pytest

TINY = {"train_per_class": 8, "val_per_class": 6}
TINY_ARGS = ["--greedy-steps", "3", "--random-orders", "2", "--rotations", "1", "--rotation-layers", "conv3", "conv4",
             "conv5", "--top-k", "3"]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    from compute.all import main as compute_all
    from compute.data import synthscenes
    from compute.train import train_demo

    data_dir = tmp_path_factory.mktemp("tiny-data")
    root = synthscenes.generate(data_dir / "datasets" / "synthscenes-seed0", seed=0, **TINY)
    train_demo("demo", seed=0, data_dir=data_dir, epochs=2, dataset_root=root)
    args = ["--model", "demo", "--data-dir", str(data_dir), "--data", str(root), *TINY_ARGS]
    assert compute_all(args) == 0
    store = data_dir / "stores" / "demo.h5"
    assert store.exists()
    return {"data_dir": data_dir, "dataset": root, "store": store, "args": args}


ROOT = Path(__file__).resolve().parent.parent
CONCEPT_IMAGES = 24  # a concept set small enough for runs of seconds


def small_run_options(tiny_run, data_dir: Path) -> list[str]:
    """Copy the tiny run's data set and weights into ``data_dir`` with a CONCEPT_IMAGES-image concept set, and
    return compute.all options for a one-layer run of seconds (the runs fault and hardening tests kill or starve)."""
    for part in ("datasets", "weights"):
        shutil.copytree(Path(tiny_run["data_dir"]) / part, data_dir / part)
    root = data_dir / "datasets" / Path(tiny_run["dataset"]).name
    concepts = data_dir / "concepts"
    concepts.mkdir()
    for table in root.glob("*.csv"):
        shutil.copy(table, concepts / table.name)
    rows = (root / "index.csv").read_text().splitlines()[: CONCEPT_IMAGES + 1]
    (concepts / "index.csv").write_text("\n".join(rows) + "\n")
    (concepts / "images").symlink_to(root / "images")
    return ["--model", "demo", "--data", str(root), *TINY_ARGS, "--layers", "conv5", "--greedy-steps", "0",
            "--rotations", "0", "--per-class", "2", "--concepts", str(concepts)]


def load_script(name: str):
    """A module of scripts/ (not a package), imported by file."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture()
def store_env(tiny_run, monkeypatch):
    """Point the app at the tiny run's store directory."""
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(Path(tiny_run["store"]).parent))
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(tiny_run["data_dir"]))
    return tiny_run
