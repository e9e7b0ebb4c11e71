"""bench.paper_store at a reduced size: a store that store.check passes, that holds the paper's kind of numbers,
and on which every app page renders without an exception (bench.app_pages' way of driving the app)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.paper_store import NAME, Shape, build

SMALL = Shape(units={"conv3": 30, "conv4": 20, "conv5": 20}, classes=20, per_class=10, concepts=40, top_k=4,
              thumb=32, greedy_steps=5, random_orders=2, rotations=2, n_resamples=0)


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    return build(tmp_path_factory.mktemp("paper-store"), SMALL, seed=0, log=lambda *_: None)


def test_store_passes_check_and_has_the_asked_shape(small_store):
    from store import StoreReader
    from store.check import check_store

    assert small_store.name == f"{NAME}.h5"
    assert check_store(small_store) == []
    reader = StoreReader(small_store)
    assert reader.layers == ["conv3", "conv4", "conv5"]
    assert reader.attrs["num_images"] == 200 and reader.attrs["model"] == "alexnet-places"
    assert reader.config["top_k"] == 4 and reader.config["rotations"] == 2
    assert reader.layer("conv3", "ablation", "class_drop").shape == (30, 20)
    assert reader.layer("conv5", "greedy", "all_class_acc").shape == (20, 6, 20)
    assert reader.layer("conv4", "topimages", "thumbs").shape == (20, 4, 32, 32, 3)
    assert reader.layer("conv5", "rotation", "class_drop").shape == (2, 20, 20)
    assert not reader.has("layers/conv5/live")


def test_numbers_follow_the_real_definitions(small_store):
    from store import StoreReader

    reader = StoreReader(small_store)
    labels, predicted = reader.read("images/labels"), reader.read("images/predictions")
    base = reader.layer("conv5", "ablation", "baseline_class_acc")
    expected = np.bincount(labels[labels == predicted], minlength=20) / 10
    np.testing.assert_allclose(base, expected, atol=1e-6)
    drop = reader.layer("conv5", "ablation", "class_drop")
    np.testing.assert_allclose(drop * 10, np.round(drop * 10), atol=1e-4)  # whole images of 10 per class
    np.testing.assert_allclose(reader.layer("conv5", "ablation", "overall_drop"), drop.mean(1), atol=1e-6)
    curve = reader.layer("conv5", "greedy", "class_acc")
    assert (np.diff(curve, axis=1) <= 0).all()
    np.testing.assert_allclose(curve[:, 0], base, atol=1e-6)
    iou = reader.layer("conv3", "dissection", "iou")
    np.testing.assert_array_equal(reader.layer("conv3", "dissection", "best_concept"), iou.argmax(1))
    indices = reader.layer("conv4", "topimages", "indices")
    maxes = reader.layer("conv4", "activations", "max")
    np.testing.assert_array_equal(indices[:, 0], maxes.argmax(0))


def test_every_page_renders(small_store, monkeypatch):
    from bench import app_pages

    monkeypatch.setenv("UNIT_ABLATION_STORES", str(small_store.parent))  # restored after the test
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(small_store.parent))
    with app_pages.instrumented(app_pages.Recorder()) as recorder:
        for page in app_pages.page_files():
            result = app_pages.measure_page(page, small_store.parent, recorder)
            for run in result["runs"]:
                assert not run["problems"], (page, run["label"], run["problems"])
    reads = [event for event in recorder.events if event["kind"] == "read"]
    charts = [event for event in recorder.events if event["kind"] == "altair_chart"]
    assert reads and charts and all(event["rows"] > 0 for event in charts)
