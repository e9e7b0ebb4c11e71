"""store.check: a sound store passes, each kind of damage gets its own one-line message, random damage never slips
by."""

import json
import random

import h5py
import numpy as np
import pytest

from store import StoreError, StoreReader, StoreWriter
from store.check import check_store, main
from store.writer import write_array

N, K, U = 12, 3, 8
LAYERS = ("conv4", "conv5")


def make_store(path, layers=LAYERS):
    """A small but complete store, written stage by stage as compute.all writes one."""
    writer = StoreWriter(path, "key", {"model": "demo", "num_images": N, "num_classes": K,
                                       "config": {"layers": list(layers)}})
    rng = np.random.default_rng(0)
    with writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(["beach", "forest", "kitchen"], dtype=object))
        write_array(h5, "images/labels", np.arange(N) % K)
    with writer.stage("activations") as h5:
        write_array(h5, "images/probs", rng.random((N, K), dtype=np.float32))
        for layer in layers:
            write_array(h5, f"layers/{layer}/activations/mean", rng.random((N, U), dtype=np.float32))
            h5[f"layers/{layer}"].attrs["units"] = U
    for layer in layers:
        with writer.stage(f"ablation/{layer}") as h5:
            write_array(h5, f"layers/{layer}/ablation/class_drop", rng.random((U, K), dtype=np.float32))
            write_array(h5, f"layers/{layer}/ablation/overall_drop", rng.random(U, dtype=np.float32))
            write_array(h5, f"layers/{layer}/ablation/baseline_class_acc", rng.random(K, dtype=np.float32))
        with writer.stage(f"attributes/{layer}") as h5:
            for name in ("l1",):
                write_array(h5, f"layers/{layer}/attributes/{name}", rng.random(U, dtype=np.float32))
            for name in ("selectivity", "correlation"):
                write_array(h5, f"layers/{layer}/attributes/{name}", rng.random((U, K), dtype=np.float32))
    with writer.stage("rotation/conv5") as h5:
        write_array(h5, "layers/conv5/rotation/class_drop", rng.random((2, U, K), dtype=np.float32))
    return writer.commit()


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "demo.h5")


def edit(path, change):
    with h5py.File(path, "a") as handle:
        change(handle)


def only(problems):
    assert len(problems) == 1, problems
    return problems[0]


def test_a_sound_store_passes_and_every_chunk_is_verified(store, capsys):
    assert check_store(store) == []
    assert main([str(store)]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"{store}: ok: schema 1, 2 layers, 18 datasets, 17 checksummed chunks verified"
    with h5py.File(store) as handle:  # even a 3-element array carries a checksum
        assert handle["layers/conv5/ablation/baseline_class_acc"].fletcher32


def test_the_pipeline_store_passes(tiny_run):
    assert check_store(tiny_run["store"]) == []


def test_truncated_file(store):
    raw = store.read_bytes()
    store.write_bytes(raw[: len(raw) // 2])
    assert only(check_store(store)).startswith(f"truncated: {len(raw) // 2} of its {len(raw)} bytes are there")


def test_flipped_byte_in_a_chunk_names_the_dataset(store):
    with h5py.File(store) as handle:
        chunk = handle["layers/conv4/ablation/class_drop"].id.get_chunk_info(0)
    raw = bytearray(store.read_bytes())
    raw[chunk.byte_offset + chunk.size // 2] ^= 0x04
    store.write_bytes(bytes(raw))
    message = only(check_store(store))
    assert message.startswith("'layers/conv4/ablation/class_drop': 1 of 1 chunks fail their fletcher32 checksum")


def test_not_hdf5_and_empty_files(tmp_path):
    (tmp_path / "notes.h5").write_text("unit,drop\n3,0.5\n")
    (tmp_path / "empty.h5").write_bytes(b"")
    assert only(check_store(tmp_path / "notes.h5")).startswith("not an HDF5 file (16 bytes")
    assert only(check_store(tmp_path / "empty.h5")).startswith("empty file (0 bytes)")
    assert only(check_store(tmp_path / "none.h5")) == "no such file"


def test_missing_section_and_missing_path(store):
    edit(store, lambda h: h.__delitem__("layers/conv5/attributes"))
    edit(store, lambda h: h.__delitem__("layers/conv4/ablation/overall_drop"))
    assert check_store(store) == [
        "'layers/conv4/ablation/overall_drop' is missing from the ablation section; recompute it with "
        "`python -m compute.all --model demo --force`",
        "layers/conv5 has no attributes section: compute it with `python -m compute.all --model demo`",
    ]


def test_recorded_stage_without_its_section(store):
    edit(store, lambda h: h.__delitem__("layers/conv5/rotation"))
    assert only(check_store(store)).startswith("stage rotation/conv5 is recorded as finished but "
                                               "'layers/conv5/rotation' is missing")


def test_configured_layer_without_results(tmp_path):
    path = make_store(tmp_path / "demo.h5", layers=("conv5",))
    edit(path, lambda h: h.attrs.__setitem__("config", json.dumps({"layers": ["conv4", "conv5"]})))
    assert only(check_store(path)).startswith("layer conv4 was asked for (config) but has no results")


@pytest.mark.parametrize("version, expected", [
    (0, "schema version 0, this tool reads version 1: recompute it with `python -m compute.all --model demo --force`"),
    (2, "schema version 2, this tool reads version 1: update this tool to read it (git pull)"),
])
def test_other_schema_versions(store, version, expected):
    edit(store, lambda h: h.attrs.__setitem__("schema_version", version))
    assert check_store(store) == [expected]
    with pytest.raises(StoreError, match=f"schema version {version}"):
        StoreReader(store)


def test_unfinished_store(store):
    edit(store, lambda h: h.attrs.__delitem__("completed"))
    assert only(check_store(store)).startswith("not finished (no 'completed' attribute)")


def test_inconsistent_shapes_name_the_dimension_and_its_source(store):
    def replace(handle):
        del handle["layers/conv5/ablation/class_drop"]
        write_array(handle, "layers/conv5/ablation/class_drop", np.zeros((U, K + 1), np.float32))
        del handle["layers/conv4/activations/mean"]
        write_array(handle, "layers/conv4/activations/mean", np.zeros((N, U + 1), np.float32))
    edit(store, replace)
    assert check_store(store) == [
        "'layers/conv4/activations/mean' has shape (12, 9), but U = 8 (from layers/conv4 attribute 'units'): "
        "the store is inconsistent; recompute it with `python -m compute.all --model demo --force`",
        "'layers/conv5/ablation/class_drop' has shape (8, 4), but K = 3 (from classes): the store is inconsistent; "
        "recompute it with `python -m compute.all --model demo --force`",
    ]


def test_provenance_counts_and_label_range(store):
    def damage(handle):
        handle.attrs["num_images"] = N + 1
        del handle["images/labels"]
        write_array(handle, "images/labels", np.full(N, K))
    edit(store, damage)
    problems = check_store(store)
    assert problems[0].startswith("attribute num_images = 13 but 'images/labels' has 12")
    assert problems[1].startswith("'images/labels' holds values in [3, 3], outside [0, 3) (K, from classes)")


def test_command_line_exit_codes(store, tmp_path, capsys):
    bad = tmp_path / "bad.h5"
    bad.write_text("not a store")
    assert main([str(tmp_path)]) == 1  # a directory: each finished store in it
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(f"{bad}: not an HDF5 file") and lines[1].startswith(f"{store}: ok")
    assert main([str(tmp_path / "missing.h5")]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    with pytest.raises(SystemExit) as usage:
        main([])
    assert usage.value.code == 2
    empty = tmp_path / "empty-dir"
    empty.mkdir()
    assert main([str(empty)]) == 1


def _numbers(path) -> dict:
    """The numeric arrays of a store, which the checksums vouch for (strings and attributes carry none)."""
    with h5py.File(path, "r") as handle:
        found = {}
        handle.visititems(lambda name, item: found.__setitem__(name, item[()])
                          if isinstance(item, h5py.Dataset) and item.dtype.kind in "iufb" else None)
    return found


def test_random_byte_flips_never_slip_by_or_raise(store, tmp_path):
    """Flip one bit at random, 60 times, half of them in metadata: check_store and StoreReader never raise
    anything but their own messages, the reader never fails where check_store saw nothing, and a store that passes
    holds exactly the numbers it was written with."""
    original, raw = _numbers(store), store.read_bytes()
    with h5py.File(store) as handle:
        data = np.zeros(len(raw), bool)
        handle.visititems(lambda name, item: [data.__setitem__(slice(c.byte_offset, c.byte_offset + c.size), True)
                                              for c in map(item.id.get_chunk_info, range(item.id.get_num_chunks()))]
                          if isinstance(item, h5py.Dataset) and item.chunks else None)
    metadata, chunks = np.flatnonzero(~data), np.flatnonzero(data)
    rng = random.Random(0)
    damaged = tmp_path / "damaged.h5"
    outcomes = {"reported": 0, "harmless": 0}
    for trial in range(60):
        position = int(rng.choice(metadata if trial % 2 else chunks))
        flipped = bytearray(raw)
        flipped[position] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(flipped))
        problems = check_store(damaged)
        try:
            reader = StoreReader(damaged)
            for name in sorted(reader.datasets):
                reader.read(name)
            readable = True
        except StoreError:
            readable = False
        if problems:
            outcomes["reported"] += 1
            continue
        outcomes["harmless"] += 1
        assert readable, f"byte {position}: the reader failed on a store check_store passed"
        now = _numbers(damaged)
        assert now.keys() == original.keys() and all(np.array_equal(now[k], original[k]) for k in now), position
    assert outcomes["reported"] >= 30  # every flip inside a checksummed chunk, and some in metadata
