"""A changed setting recomputes only the stages it touches; everything else is taken over value for value."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import small_run_options


def contents(path: Path) -> dict:
    """Every dataset of a store by path."""
    found = {}
    with h5py.File(path, "r") as handle:
        handle.visititems(lambda name, item: found.__setitem__(name, item[()]) if isinstance(item, h5py.Dataset)
                          else None)
    return found


def same(a, b) -> bool:
    if isinstance(a, np.ndarray) and a.dtype.kind == "f":
        return a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
    return np.array_equal(a, b)


def plan_lines(compute_all, args, capsys) -> dict:
    capsys.readouterr()
    assert compute_all([*args, "--plan"]) == 0
    lines = capsys.readouterr().out.splitlines()[1:-1]
    return {line.split()[1]: line.split()[0] for line in lines}


@pytest.fixture()
def small_store(tiny_run, tmp_path):
    from compute.all import main as compute_all

    args = [*small_run_options(tiny_run, tmp_path), "--data-dir", str(tmp_path), "--layers", "conv4", "conv5",
            "--rotations", "1", "--rotation-layers", "conv5"]
    assert compute_all(args) == 0
    return {"args": args, "store": tmp_path / "stores" / "demo.h5"}


def test_more_rotations_recompute_only_the_rotation_stage(small_store, capsys):
    from compute.all import main as compute_all

    args = small_store["args"]
    before = contents(small_store["store"])
    rotated = [*args, "--rotations", "2"]
    plan = plan_lines(compute_all, rotated, capsys)
    assert {name for name, verb in plan.items() if verb == "compute"} == {"rotation/conv5"}
    assert compute_all(rotated) == 0
    assert "reusing" in capsys.readouterr().out
    after = contents(small_store["store"])
    rotation = "layers/conv5/rotation/"
    assert after[rotation + "class_drop"].shape[0] == 2
    assert after[rotation + "seeds"].tolist() == [0, 1]
    # the first rotation is the same computation again; every other dataset is taken over unchanged
    assert np.array_equal(after[rotation + "class_drop"][0], before[rotation + "class_drop"][0])
    others = [name for name in before if not name.startswith(rotation)]
    assert others and set(others) <= set(after)
    assert all(same(before[name], after[name]) for name in others)
    with h5py.File(small_store["store"], "r") as handle:
        record = json.loads(handle["stages"].attrs["rotation/conv5"])
    assert record["options"] == {"rotations": 2}
    assert "layers/conv5/rotation/class_drop" in record["contents"]["datasets"]
    assert plan_lines(compute_all, rotated, capsys) == {name: "reuse" for name in plan}


def test_adding_a_layer_computes_that_layer_only(small_store, capsys):
    from compute.all import main as compute_all

    args = small_store["args"]
    before = contents(small_store["store"])
    wider = [*args, "--layers", "conv3", "conv4", "conv5"]
    plan = plan_lines(compute_all, wider, capsys)
    computed = {name for name, verb in plan.items() if verb == "compute"}
    assert computed and all(name.endswith("/conv3") for name in computed)
    assert {"ablation/conv3", "activations/conv3", "attributes/conv3", "dissection/conv3"} <= computed
    assert compute_all(wider) == 0
    after = contents(small_store["store"])
    assert "layers/conv3/ablation/class_drop" in after
    assert all(same(before[name], after[name]) for name in before)


def test_plan_names_the_changed_option(small_store, capsys):
    from compute.all import main as compute_all

    capsys.readouterr()
    assert compute_all([*small_store["args"], "--quantile", "0.01", "--plan"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if " dissection/conv5 " in line)
    assert line.split()[0] == "compute" and "option --quantile changed (0.005 -> 0.01)" in line
    assert "reads dissection/conv5, which is recomputed" in next(
        line for line in out.splitlines() if " relations/conv5 " in line)
    assert next(line for line in out.splitlines() if " ablation/conv5 " in line).split()[0] == "reuse"
    assert not Path(small_store["store"]).with_name(".demo.parts").exists()  # --plan computes nothing


def test_additions_are_kept_where_their_inputs_are_unchanged(small_store, capsys):
    from compute.all import main as compute_all
    from store.writer import amend, write_array

    with amend(small_store["store"]) as handle:
        write_array(handle, "prediction/conv5/accuracy", np.arange(3.0))
        write_array(handle, "prediction/conv4/accuracy", np.arange(2.0))
    assert compute_all([*small_store["args"], "--rotations", "2"]) == 0
    kept = contents(small_store["store"])
    assert kept["prediction/conv5/accuracy"].tolist() == [0.0, 1.0, 2.0]  # rotation is not an input of the table
    assert compute_all([*small_store["args"], "--rotations", "2", "--per-class", "1"]) == 0
    assert "dropped prediction/conv5/accuracy" in capsys.readouterr().out
    assert "prediction/conv5/accuracy" not in contents(small_store["store"])


def test_a_typo_fails_before_the_first_stage(tiny_run, tmp_path, capsys):
    from compute.all import main as compute_all
    from compute.errors import run_cli

    args = [*small_run_options(tiny_run, tmp_path), "--data-dir", str(tmp_path)]
    for bad, message in ((["--greedy-classes", "nowhere"], "unknown class 'nowhere' in --greedy-classes"),
                         (["--greedy-layers", "conv9"], "--greedy-layers conv9: demo has no such layer"),
                         (["--top-k", "-1"], "--top-k -1 is out of range")):
        capsys.readouterr()
        assert run_cli(compute_all, [*args, *bad]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
        assert not (tmp_path / "stores" / ".demo.parts").exists()


def test_a_stage_that_shards_must_be_declared_sharded():
    """Every stage module that shares work between ranks is declared so in the table, and an undeclared call fails."""
    from compute.run import pipeline
    from compute.run.context import RunContext

    for stage in pipeline.stages():
        source = Path(stage.run.__code__.co_filename).read_text()
        calls = {node.func.attr for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)}
        assert ("run_sharded" in calls) == stage.sharded, stage.section
    ctx = RunContext.__new__(RunContext)
    ctx.sharded = frozenset({"ablation"})
    with pytest.raises(RuntimeError, match="not declared sharded"):
        ctx.run_sharded("rotation/conv5", 4, lambda items: {}, lambda shares: None)


def test_keys_follow_their_inputs():
    from compute.run import pipeline
    from compute.run.options import DissectionOptions, GreedyOptions, RotationOptions

    table = pipeline.stages()
    options = {kind: kind() for kind in pipeline.option_types(table)}
    inputs = {"model": "m", "weights": "w", "data": "d", "concepts": "c"}
    base = {s.name: s.key for s in pipeline.plan(table, ["conv4", "conv5"], options, inputs)}
    changed = options | {DissectionOptions: DissectionOptions(quantile=0.01)}
    keys = {s.name: s.key for s in pipeline.plan(table, ["conv4", "conv5"], changed, inputs)}
    assert {name for name in base if base[name] != keys[name]} == {
        "dissection/conv4", "dissection/conv5", "topimages/conv4", "topimages/conv5", "relations/conv4",
        "relations/conv5"}
    # choosing where greedy runs is not part of what it computes
    elsewhere = options | {GreedyOptions: GreedyOptions(greedy_layers=("conv4", "conv5"))}
    keys = {s.name: s.key for s in pipeline.plan(table, ["conv4", "conv5"], elsewhere, inputs)}
    assert keys["greedy/conv5"] == base["greedy/conv5"] and "greedy/conv4" in keys
    none = options | {RotationOptions: RotationOptions(rotation_layers=())}
    assert not any(s.name.startswith("rotation/") for s in pipeline.plan(table, ["conv4", "conv5"], none, inputs))
    other_concepts = dict(inputs, concepts="c2")
    keys = {s.name: s.key for s in pipeline.plan(table, ["conv5"], options, other_concepts)}
    assert keys["ablation/conv5"] == base["ablation/conv5"] and keys["dissection/conv5"] != base["dissection/conv5"]
