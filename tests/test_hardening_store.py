"""Issue 16, the store's half: one damaged file never takes the app down, and no damaged byte goes unnoticed.

Malformed content (a scalar `classes`, a `layer_order` that is no JSON list, text where a number belongs, shapes that
disagree with the schema) is refused by StoreReader with one StoreError line and reported by store.check, which never
raises; the store listing shows such a file as unusable and goes on; stores are written in HDF5's 1.10 format, whose
metadata carries checksums, so a flipped metadata byte fails the read instead of returning wrong numbers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest

from store import StoreError, StoreReader, list_stores
from store.check import check_store, main
from store.writer import amend, write_array
from tests.conftest import ROOT, load_script
from tests.test_store_check import K, N, U, make_store
from tests.views import open_view



def edit(path: Path, change) -> Path:
    with h5py.File(path, "a") as handle:
        change(handle)
    return path


def one_line(text: str) -> str:
    assert text and "\n" not in text, text
    return text


def refused(path: Path) -> str:
    """The reader's one line for a store it refuses."""
    with pytest.raises(StoreError) as error:
        StoreReader(path)
    return one_line(str(error.value))


@pytest.fixture()
def store(tmp_path):
    return make_store(tmp_path / "demo.h5")


# -- 1. malformed content: one line from the reader, refused by store.check ----------------------------------------
MALFORMED = {
    "scalar text classes": (lambda h: write_array(h, "classes", np.array("beach", dtype=object)),
                            "'classes' has shape (), expected 1 dimensions (K)"),
    "scalar number classes": (lambda h: write_array(h, "classes", np.array(3)),
                              "'classes' has shape (), expected 1 dimensions (K)"),
    "numbers as classes": (lambda h: write_array(h, "classes", np.arange(K)),
                           "'classes' holds int64 values, expected text"),
    "layer_order 5": (lambda h: h.attrs.__setitem__("layer_order", "5"),
                      "attribute layer_order is text '5', expected a JSON list of names"),
    "layer_order not JSON": (lambda h: h.attrs.__setitem__("layer_order", "conv4, conv5"),
                             "attribute layer_order is text 'conv4, conv5', expected a JSON list of names"),
    "config a list": (lambda h: h.attrs.__setitem__("config", "[1, 2]"),
                      "attribute config is text '[1, 2]', expected a JSON object"),
    "float indices": (lambda h: write_array(h, "images/labels", np.arange(N) / 2),
                      "'images/labels' holds float64 values, expected int64"),
    "units as text": (lambda h: h["layers/conv5"].attrs.__setitem__("units", "eight"),
                      "layers/conv5 attribute units is text 'eight', expected an integer"),
    "map_shape as text": (lambda h: h["layers/conv4"].attrs.__setitem__("map_shape", "8x8"),
                          "layers/conv4 attribute map_shape is text '8x8', expected integers"),
}


@pytest.mark.parametrize("kind", list(MALFORMED))
def test_malformed_content_is_one_line_from_the_reader_and_refused_by_check(kind, store):
    damage, says = MALFORMED[kind]
    edit(store, damage)
    assert refused(store).startswith(f"demo.h5: {says}")
    problems = check_store(store)
    assert any(problem.startswith(says) for problem in problems), problems
    assert all(one_line(problem) for problem in problems)


def test_layer_order_is_still_followed(store):
    edit(store, lambda h: h.attrs.__setitem__("layer_order", '["conv5", "conv4"]'))
    assert StoreReader(store).layers == ["conv5", "conv4"]


def tiny_copy(tiny_run, directory: Path, name: str, damage=None) -> Path:
    directory.mkdir(exist_ok=True)
    path = directory / f"{name}.h5"
    shutil.copy(tiny_run["store"], path)
    return edit(path, damage) if damage else path


def test_listing_shows_a_malformed_store_as_unusable_and_goes_on(tiny_run, tmp_path, monkeypatch):
    """A store that broke every page for every store: now one line in the picker, and the others open."""
    from streamlit.testing.v1 import AppTest

    directory = tmp_path / "stores"
    tiny_copy(tiny_run, directory, "good")
    tiny_copy(tiny_run, directory, "scalar", lambda h: write_array(h, "classes", np.array(3)))
    tiny_copy(tiny_run, directory, "order", lambda h: h.attrs.__setitem__("layer_order", "5"))
    (directory / "folder.h5").mkdir()
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(tiny_run["data_dir"]))
    for chosen in ("good", "scalar", "order"):
        app = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
        app.query_params["store"] = chosen
        app.run()
        assert not app.exception, [e.value for e in app.exception]
        picker = app.sidebar.selectbox(key="store_select")
        labels = {label.split("  ·  ")[0]: label for label in picker.options}  # as shown
        assert set(labels) == {"good", "scalar", "order"}  # the folder named folder.h5 is no store
        assert "unusable" not in labels["good"]
        assert labels["scalar"].startswith("scalar  ·  unusable: scalar.h5: 'classes' has shape ()")
        assert labels["order"].startswith("order  ·  unusable: order.h5: attribute layer_order is text '5'")
        errors = [one_line(message.value) for message in (*app.error, *app.sidebar.error)]
        assert bool(errors) == (chosen != "good"), errors


def test_listing_survives_whatever_the_reader_raises(tmp_path, monkeypatch):
    from app import loaders

    def broken(path):
        raise TypeError("'int' object is not iterable")

    monkeypatch.setattr(loaders, "StoreReader", broken)
    assert loaders._label(tmp_path / "odd.h5") == ("odd  ·  unusable: damaged (TypeError: 'int' object is not "
                                                   "iterable): recompute it")


# -- 2. the checksummed format, and store.check compares filters and types with the writer's ------------------------
def object_header_versions(path: Path) -> set[int]:
    versions = set()
    with h5py.File(path, "r") as handle:
        versions.add(h5py.h5o.get_info(handle.id).hdr.version)
        handle.visititems(lambda name, item: versions.add(h5py.h5o.get_info(item.id).hdr.version))
        superblock = handle.id.get_create_plist().get_version()[0]
    return versions | {("superblock", superblock)}


def test_stores_and_amends_are_written_in_the_checksummed_format(store):
    # superblock version 3 and version 2 object headers (both checksummed) are HDF5 1.10's format
    assert object_header_versions(store) == {2, ("superblock", 3)}
    with amend(store) as handle:
        write_array(handle, "extra/value", np.arange(3))
    assert object_header_versions(store) == {2, ("superblock", 3)}
    assert check_store(store) == []


FORMATS = {
    "no filters": (lambda h: h.create_dataset("layers/conv5/ablation/class_drop", data=np.zeros((U, K), np.float32)),
                   "'layers/conv5/ablation/class_drop' is stored with no filters, not the writer's shuffle, gzip level "
                   "4 and fletcher32 checksum"),
    "no checksum": (lambda h: h.create_dataset("layers/conv5/ablation/class_drop", data=np.zeros((U, K), np.float32),
                                               compression="gzip", compression_opts=4, shuffle=True),
                    "'layers/conv5/ablation/class_drop' is stored with shuffle(4,), deflate(4,), not the writer's"),
    "gzip level 9": (lambda h: h.create_dataset("layers/conv5/ablation/class_drop", data=np.zeros((U, K), np.float32),
                                                compression="gzip", compression_opts=9, shuffle=True, fletcher32=True),
                     "'layers/conv5/ablation/class_drop' is stored with shuffle(4,), deflate(9,), fletcher32(), not"),
    "float64 drops": (lambda h: write_array(h, "layers/conv5/ablation/class_drop", np.zeros((U, K))),
                      "'layers/conv5/ablation/class_drop' holds float64 values, expected float32"),
}


@pytest.mark.parametrize("kind", list(FORMATS))
def test_check_compares_filters_and_types_with_the_writers(kind, store):
    change, says = FORMATS[kind]
    edit(store, lambda h: (h.__delitem__("layers/conv5/ablation/class_drop"), change(h)))
    problems = check_store(store)
    assert len(problems) == 1 and problems[0].startswith(says), problems
    StoreReader(store)  # the reader only minds the kind of values, and these are numbers


def test_scalars_empty_arrays_and_text_need_no_checksum(store):
    edit(store, lambda h: (write_array(h, "extra/scalar", np.float32(1.5)), write_array(h, "extra/empty", np.zeros(0)),
                           write_array(h, "layers/conv5/greedy/classes", np.zeros(0))))  # numpy's empty is float64
    assert check_store(store) == []


def test_check_says_when_metadata_carries_no_checksums(tmp_path):
    """Stores of the earliest format (written before, or edited with plain h5py) pass, with a note beside "ok"."""
    from store.check import inspect

    flips = load_script("metadata_flips")
    assert inspect(flips.make_small_store(tmp_path / "new.h5")).summary() == (
        "ok: schema 1, 1 layers, 9 datasets, 8 checksummed chunks verified")
    old = inspect(flips.make_small_store(tmp_path / "old.h5", libver=("earliest", "latest")))
    assert old.problems == [] and old.summary().endswith(
        "; 17 metadata blocks without checksums (HDF5's earliest format: written by an older version of this tool, or "
        "edited outside store.writer): recompute it to have them checked")


def test_metadata_byte_flips_never_hand_out_wrong_numbers(tmp_path):
    """Every byte of a complete 9 KB store outside its checksummed chunks, flipped one at a time (XOR 0xFF): no read
    through StoreReader and no store that store.check passes holds a wrong number, and nothing raises but StoreError.

    Text lives in HDF5's global heap, which has no checksum in any format: a flip there may return a wrong class name
    or make HDF5 loop or die; those flips are counted, and must lie in the global heap or a string's heap reference.
    The bytes of the global heap's free space (never parsed) are skipped, which keeps the sweep under a minute."""
    flips = load_script("metadata_flips")
    path = flips.make_small_store(tmp_path / "small.h5")
    assert check_store(path) == []
    offsets = flips.parsed_metadata_offsets(path)
    counts = flips.sweep(path, offsets, work=tmp_path, log=lambda line: None, hang_seconds=2)
    print(counts.report())
    assert counts.flipped == len(offsets) > 4000
    assert counts.reader_wrong_numbers == counts.check_wrong_numbers == 0, counts.examples
    assert counts.reader_crashes == counts.check_crashes == 0, counts.examples
    text = flips.text_region(path)
    assert all(text[where] for where in counts.lost), [where for where in counts.lost if not text[where]]


# -- 5. damaged but openable stores: one line on every page -----------------------------------------------------------
def deepest(handle) -> str:
    return sorted(handle["layers"])[-1]


def wrong_class_drop(handle) -> None:
    path = f"layers/{deepest(handle)}/ablation/class_drop"
    write_array(handle, path, handle[path][()].T.copy())


def short_overall_drop(handle) -> None:
    path = f"layers/{deepest(handle)}/ablation/overall_drop"
    write_array(handle, path, handle[path][:-1])


DAMAGED = {  # damage: (what the reader and every page say, what store.check says)
    "classes deleted": (lambda h: h.__delitem__("classes"), "has no 'classes'", "'classes' is missing"),
    "class_drop of the wrong shape": (wrong_class_drop, "/ablation/class_drop' has shape", None),
    "overall_drop of the wrong length": (short_overall_drop, "/ablation/overall_drop' has shape", None),
    "num_images abc": (lambda h: h.attrs.__setitem__("num_images", "abc"),
                       "attribute num_images is text 'abc', expected an integer", None),
}
PAGES = ("overview", "unit", "greedy", "attributes", "search")


@pytest.fixture(scope="module")
def damaged_stores(tiny_run, tmp_path_factory) -> dict[str, Path]:
    directory = tmp_path_factory.mktemp("damaged")
    return {kind: tiny_copy(tiny_run, directory / kind.replace(" ", "-"), "demo", damage)
            for kind, (damage, _, _) in DAMAGED.items()}


@pytest.mark.parametrize("kind", list(DAMAGED))
def test_damaged_store_is_one_line_on_every_page(kind, damaged_stores, store_env):
    path, (_, says, check_says) = damaged_stores[kind], DAMAGED[kind]
    assert says in refused(path)
    assert any((check_says or says) in problem for problem in check_store(path))
    for page in PAGES:
        at = open_view(page, path)
        shown = [one_line(message.value) for message in at.error]
        assert len(shown) == 1 and says in shown[0], (page, shown)


# -- 6. attributes of the wrong type: one line from store.check, never an exception ----------------------------------
@pytest.mark.parametrize("key, value", [("schema_version", "one"), ("schema_version", "1"), ("num_images", "abc"),
                                        ("num_classes", 2.5), ("seed", "0"), ("model", 7)])
def test_check_reports_an_attribute_of_the_wrong_type(key, value, store, capsys):
    edit(store, lambda h: h.attrs.__setitem__(key, value))
    problem = one_line(check_store(store)[0])
    assert problem.startswith(f"attribute {key} is ") and "expected" in problem
    assert len(check_store(store)) == 1
    assert main([str(store)]) == 1
    assert f"attribute {key} is" in capsys.readouterr().out
    assert f"attribute {key} is" in refused(store)


# -- 8. only files are stores ----------------------------------------------------------------------------------------
def test_a_directory_named_like_a_store_is_not_listed(store, tmp_path, capsys):
    (tmp_path / "x.h5").mkdir()
    (tmp_path / "x.h5" / "inner.h5").write_bytes(b"")
    assert list_stores(tmp_path) == [store]
    assert main([str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip() == f"{store}: {check_summary(store)}"


def check_summary(path: Path) -> str:
    from store.check import inspect

    return inspect(path).summary()
