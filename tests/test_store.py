"""The store: atomic commit, resumable stages, clear errors, readable with h5py alone."""

import h5py
import numpy as np
import pytest

from store import StoreError, StoreReader, StoreWriter, list_stores
from store.writer import amend, write_array


def make_store(path, key="k1", stages=("setup", "ablation/conv5")):
    writer = StoreWriter(path, key, {"model": "demo", "config": {"a": 1}})
    for stage in stages:
        if writer.done(stage):
            continue
        with writer.stage(stage) as h5:
            if stage == "setup":
                write_array(h5, "classes", np.array(["a", "b"], dtype=object))
                write_array(h5, "images/labels", np.array([0, 1, 0, 1]))
            else:
                write_array(h5, "layers/conv5/ablation/class_drop", np.arange(200, dtype=np.float32).reshape(100, 2))
                write_array(h5, "layers/conv5/ablation/overall_drop", np.zeros(100, np.float32))
    return writer


def test_commit_makes_a_readable_store(tmp_path):
    path = tmp_path / "run.h5"
    writer = make_store(path)
    assert not path.exists()
    writer.commit()
    reader = StoreReader(path)
    assert reader.classes == ["a", "b"]
    assert reader.layers == ["conv5"]
    assert reader.layer("conv5", "ablation", "class_drop", 3).tolist() == [6.0, 7.0]
    assert reader.attrs["model"] == "demo"
    assert set(reader.stages) == {"setup", "ablation/conv5"}
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # parts cleaned up
    with h5py.File(path, "r") as handle:  # the contract: plain h5py paths
        assert handle["layers/conv5/ablation/class_drop"].fletcher32
        assert handle["images/labels"].shape == (4,)


def test_killed_stage_is_redone_and_finished_ones_kept(tmp_path):
    path = tmp_path / "run.h5"
    writer = StoreWriter(path, "k1", {})
    with writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(["a"], dtype=object))
    with pytest.raises(RuntimeError):
        with writer.stage("ablation/conv5") as h5:
            write_array(h5, "layers/conv5/ablation/class_drop", np.ones((100, 2)))
            raise RuntimeError("killed")
    writer.close()
    assert list_stores(tmp_path) == []
    again = StoreWriter(path, "k1", {})
    assert again.completed_stages() == ["setup"]
    again.close()


def test_parts_of_another_run_are_discarded(tmp_path):
    path = tmp_path / "run.h5"
    make_store(path, key="old", stages=("setup",)).close()
    writer = StoreWriter(path, "new", {})
    assert writer.completed_stages() == []
    writer.close()


def test_second_writer_is_refused(tmp_path):
    writer = StoreWriter(tmp_path / "run.h5", "k", {})
    with pytest.raises(StoreError, match="another process"):
        StoreWriter(tmp_path / "run.h5", "k", {})
    writer.close()


def test_reader_errors_are_one_line(tmp_path):
    with pytest.raises(StoreError, match="not found"):
        StoreReader(tmp_path / "none.h5")
    (tmp_path / "junk.h5").write_bytes(b"not hdf5 at all")
    with pytest.raises(StoreError, match="not an HDF5 store"):
        StoreReader(tmp_path / "junk.h5")
    path = tmp_path / "run.h5"
    make_store(path).commit()
    with h5py.File(path, "a") as handle:
        handle.attrs["schema_version"] = 0
    with pytest.raises(StoreError, match="schema version 0"):
        StoreReader(path)


def test_missing_section_names_the_command(tmp_path):
    path = tmp_path / "run.h5"
    make_store(path).commit()
    reader = StoreReader(path)
    with pytest.raises(StoreError, match="compute.all"):
        reader.require("conv5", "attributes")
    with pytest.raises(StoreError, match="holds conv5"):
        reader.require("conv9", "ablation")


def test_flipped_byte_is_detected(tmp_path):
    path = tmp_path / "run.h5"
    make_store(path).commit()
    with h5py.File(path, "r") as handle:
        offset = handle["layers/conv5/ablation/class_drop"].id.get_offset() or None
        chunk = handle["layers/conv5/ablation/class_drop"].id.get_chunk_info(0)
    raw = bytearray(path.read_bytes())
    raw[chunk.byte_offset + 5] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match="damaged"):
        StoreReader(path).read("layers/conv5/ablation/class_drop")
    assert offset is None or offset >= 0


def test_amend_replaces_atomically(tmp_path):
    path = tmp_path / "run.h5"
    make_store(path).commit()
    with amend(path) as handle:
        write_array(handle, "extra/value", np.arange(3))
    assert StoreReader(path).read("extra/value").tolist() == [0, 1, 2]
    assert [p.name for p in tmp_path.iterdir()] == ["run.h5"]
