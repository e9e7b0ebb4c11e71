"""What researchers share: links with the page state in query parameters, search, side-by-side compare, downloads, and
the app's safety rules (only stores listed in its directory, nothing unpickled)."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest

from store import StoreReader, list_stores
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def two_stores(tiny_run, tmp_path, monkeypatch):
    """A store directory with the tiny store and a copy of it under another name."""
    directory = tmp_path / "stores"
    directory.mkdir()
    shutil.copy(tiny_run["store"], directory / "demo.h5")
    shutil.copy(tiny_run["store"], directory / "demo-copy.h5")
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(tiny_run["data_dir"]))
    return directory


@pytest.fixture()
def varied_store(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny store whose class drops vary (the tiny network is at chance, so its own drops are all 0)."""
    directory = tmp_path / "varied"
    directory.mkdir()
    path = directory / "demo.h5"
    shutil.copy(tiny_run["store"], path)
    rng = np.random.default_rng(0)
    with h5py.File(path, "a") as handle:
        for layer in handle["layers"]:
            drops = handle[f"layers/{layer}/ablation/class_drop"]
            drops[...] = rng.integers(-1, 4, size=drops.shape) / 6
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(tiny_run["data_dir"]))
    return path


def entry(**params):
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def test_matching_filters_by_concept_class_and_range():
    from app.search_index import matching

    frame = pd.DataFrame({"layer": ["a", "a", "b", "b"], "unit": [0, 1, 0, 1],
                          "concept": ["grass", "sky", "Grass-field", "tree"],
                          "most hurt class": ["beach", "forest", "beach", ""],
                          "best IoU": [0.02, 0.10, 0.07, 0.30]})
    assert list(matching(frame).index) == [0, 1, 2, 3]
    assert list(matching(frame, concept="GRASS").index) == [0, 2]
    assert list(matching(frame, target="beach").index) == [0, 2]
    assert list(matching(frame, attribute="best IoU", low=0.05, high=0.2).index) == [1, 2]
    assert list(matching(frame, concept="grass", target="beach", attribute="best IoU", low=0.05).index) == [2]


def test_search_page_reads_its_filters_from_the_link(varied_store):
    store = StoreReader(varied_store)
    drops = store.layer("conv5", "ablation", "class_drop")
    hurt = drops.max(1) > 0
    target = store.classes[int(np.bincount(drops.argmax(1)[hurt]).argmax())]
    at = open_view("search", varied_store, **{"class": target})
    found = at.dataframe[0].value
    expected = sum(int(((d := store.layer(layer, "ablation", "class_drop")).max(1) > 0)
                       [d.argmax(1) == store.classes.index(target)].sum()) for layer in store.layers)
    assert len(found) == expected > 0
    assert set(found["most hurt class"]) == {target}
    assert found["link"].iloc[0].startswith("unit?store=demo&layer=")
    assert at.query_params["class"] == target


def test_search_by_attribute_range_matches_the_store(store_env):
    store = StoreReader(store_env["store"])
    iou = np.concatenate([store.layer(layer, "dissection", "best_iou") for layer in store.layers])
    low = float(np.median(iou))
    at = open_view("search", store_env["store"], attribute="best IoU", low=str(low))
    assert len(at.dataframe[0].value) == int((iou >= low).sum())


def test_unit_link_restores_layer_unit_and_class(store_env):
    store = StoreReader(store_env["store"])
    target = store.classes[2]
    at = open_view("unit", store_env["store"], layer="conv4", unit="3", **{"class": target})
    assert at.selectbox(key="layer").value == "conv4"
    assert at.number_input[0].value == 3
    expected = 100 * store.layer("conv4", "ablation", "class_drop")[3, 2]
    metric = next(m for m in at.metric if m.label == f"Drop for {target}")
    assert metric.value == f"{expected:.1f} pts"


def test_greedy_link_restores_the_class(store_env):
    store = StoreReader(store_env["store"])
    classes = [store.classes[int(k)] for k in store.layer("conv5", "greedy", "classes")]
    at = entry()  # the greedy page links to the Unit page, which needs the entry point's navigation
    at.query_params.update({"store": "demo", "layer": "conv5", "class": classes[-1]})
    at.switch_page("views/greedy.py").run()
    assert not at.exception, at.exception
    assert at.selectbox(key="greedy_class").value == len(classes) - 1
    assert at.query_params["class"] == classes[-1]


@pytest.mark.parametrize("page", ["overview", "dissection", "rotation"])
def test_compare_shows_both_stores_side_by_side(two_stores, page):
    at = open_view(page, two_stores / "demo.h5", two_stores / "demo-copy.h5")
    headers = [h.value for h in at.subheader]
    assert "demo" in headers and "demo-copy" in headers


def test_a_compare_link_picks_both_stores(two_stores):
    at = entry(store="demo-copy", compare="demo")
    assert at.session_state["store_path"] == str(two_stores / "demo-copy.h5")
    assert at.session_state["compare_path"] == str(two_stores / "demo.h5")
    headers = [h.value for h in at.subheader]
    assert headers[:2] == ["demo-copy", "demo"]
    assert len(at.get("vega_lite_chart")) == 2


def test_compare_on_attributes_adds_the_other_store(two_stores):
    at = open_view("attributes", two_stores / "demo.h5", two_stores / "demo-copy.h5")
    assert any("demo-copy" in h.value for h in at.header)
    assert len(at.get("vega_lite_chart")) == 2


def test_every_chart_has_image_and_csv_downloads(store_env):
    at = open_view("overview", store_env["store"], layer="conv5")
    buttons = {b.proto.label: b.proto for b in at.get("download_button")}
    assert {"PNG", "SVG", "CSV"} <= set(buttons)
    assert buttons["PNG"].deferred_file_id or buttons["PNG"].url  # rendered only when clicked


def test_a_store_named_in_the_link_must_be_listed(store_env, tmp_path):
    outside = tmp_path / "secret.h5"
    shutil.copy(store_env["store"], outside)
    at = entry(store="../" * 6 + str(outside.with_suffix("")).lstrip("/"))
    assert any("No store named" in w.value for w in at.sidebar.warning)
    assert at.session_state["store_path"] == str(Path(store_env["store"]).resolve())


def test_links_out_of_the_store_directory_are_not_listed(tiny_run, tmp_path):
    directory = tmp_path / "stores"
    directory.mkdir()
    shutil.copy(tiny_run["store"], directory / "inside.h5")
    (directory / "escape.h5").symlink_to(tiny_run["store"])
    assert [path.name for path in list_stores(directory)] == ["inside.h5"]


class Trap:
    """Unpickling this sets a flag: a reader that unpickled store bytes would spring it."""

    sprung = False

    def __reduce__(self):
        return (Trap._spring, ())

    @staticmethod
    def _spring():
        Trap.sprung = True


def test_pickled_bytes_in_a_store_are_never_unpickled(tiny_run, tmp_path):
    path = tmp_path / "trapped.h5"
    shutil.copy(tiny_run["store"], path)
    payload = pickle.dumps(Trap())
    with h5py.File(path, "a") as handle:
        handle["layers/conv5/ablation"].attrs["note"] = np.void(payload)
        handle["extra/blob"] = np.void(payload)
    store = StoreReader(path)
    raw = store.read("extra/blob")
    assert bytes(raw) == payload and not Trap.sprung
    store.read_attrs("layers/conv5/ablation")
    assert not Trap.sprung


def test_unit_compare_shows_the_same_unit_only_for_the_same_weights(two_stores):
    at = open_view("unit", two_stores / "demo.h5", two_stores / "demo-copy.h5", layer="conv5", unit="4")
    headers = [h.value for h in at.subheader]
    assert headers.index("demo") < headers.index("demo-copy")
    assert len(at.get("vega_lite_chart")) == 2
    with h5py.File(two_stores / "demo-copy.h5", "a") as handle:
        handle.attrs["weights_sha256"] = "0" * 64
    at = open_view("unit", two_stores / "demo.h5", two_stores / "demo-copy.h5", layer="conv5", unit="4")
    assert len(at.get("vega_lite_chart")) == 1
    assert any("units of separately trained networks do not correspond" in i.value for i in at.info)


def test_variants_link_picks_its_stores(two_stores):
    at = open_view("variants", two_stores / "demo.h5", stores="demo-copy,nonexistent,demo")
    assert at.multiselect(key="variant_stores").value == ["demo-copy", "demo"]
    assert at.query_params["stores"] == "demo-copy,demo"
    assert len(at.get("vega_lite_chart")) == 6  # Fig. 8 curves and Fig. 9 counts, a chart per layer (conv3..conv5)


def test_the_chosen_layer_carries_over_to_another_page(store_env):
    at = entry()
    at.selectbox(key="layer").select("conv4").run()
    assert at.query_params["layer"] == "conv4"
    at.switch_page("views/unit.py").run()
    assert not at.exception, at.exception
    assert at.title[0].value == "conv4 · unit 0"
