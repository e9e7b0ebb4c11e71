"""Top images: the ranking is the activation pass's map maxima, thumbnails are the model's crops, masks are the
upsampled maps above the unit's threshold; the Unit page shows them and the unit's concept."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from compute.lib.sequence import run_to
from compute.lib.topimages import thumbnail, top_indices
from compute.stages.topimages import validation_thresholds
from store import StoreReader
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent


def test_top_indices_rank_by_maximum_ties_by_index():
    maxes = np.array([[0.1, 5.0], [0.9, 5.0], [0.5, 1.0]], np.float32)  # 3 images x 2 units
    order, scores = top_indices(maxes, 2)
    assert order.tolist() == [[1, 2], [0, 1]]
    np.testing.assert_allclose(scores, [[0.9, 0.5], [5.0, 5.0]], rtol=1e-6)


def test_thumbnail_keeps_small_crops_and_shrinks_large_ones():
    small = np.random.default_rng(0).integers(0, 256, (3, 64, 64), dtype=np.uint8)
    assert np.array_equal(thumbnail(small, 64), small.transpose(1, 2, 0))
    flat = np.full((3, 224, 224), 200, np.uint8)
    flat[0] = 10
    shrunk = thumbnail(flat, 96)
    assert shrunk.shape == (96, 96, 3) and shrunk[..., 0].max() == 10 and shrunk[..., 1].min() == 200


def test_validation_thresholds_equal_numpy():
    maps = torch.relu(torch.randn(10, 3, 4, 5, generator=torch.Generator().manual_seed(0)))
    batches = [({"L": maps[i:i + 4]}, None, torch.arange(i, min(i + 4, 10))) for i in range(0, 10, 4)]
    ctx = SimpleNamespace(activations=lambda layers, desc=None: iter(batches), images=[None] * 10)
    expected = np.quantile(maps.transpose(0, 1).reshape(3, -1).double().numpy(), 0.95, axis=1)
    assert validation_thresholds(ctx, "L", 0.05) == pytest.approx(expected, rel=1e-6)


@pytest.fixture(scope="module")
def validation(tiny_run):
    from compute.data.validation import load_validation
    from compute.run.imagecache import ImageCache
    from compute.models import get_spec

    spec = get_spec("demo")
    val = load_validation("synthscenes", tiny_run["dataset"], spec.preprocess)
    model, _ = spec.load(None, tiny_run["data_dir"])
    return SimpleNamespace(images=ImageCache(val.dataset, spec.preprocess), sequence=spec.to_sequence(model))


def test_store_top_images_are_consistent(tiny_run, validation):
    store = StoreReader(tiny_run["store"])
    for layer in ("conv3", "conv5"):
        maxes = store.layer(layer, "activations", "max")
        indices = store.layer(layer, "topimages", "indices")
        scores = store.layer(layer, "topimages", "scores")
        thumbs = store.layer(layer, "topimages", "thumbs")
        masks = store.layer(layer, "topimages", "masks")
        units = maxes.shape[1]
        assert indices.shape == scores.shape == (units, 3)  # --top-k 3 in the tiny run
        assert thumbs.shape == (units, 3, 64, 64, 3) and thumbs.dtype == np.uint8
        assert masks.shape == (units, 3, 64, 64) and masks.dtype == bool
        assert np.array_equal(scores, np.take_along_axis(maxes.T, indices, 1))
        assert np.all(scores[:, :-1] >= scores[:, 1:])
        assert np.all(scores[:, -1] >= np.sort(maxes, 0)[-3])  # nothing outside the top 3 scores higher
        assert np.array_equal(thumbs[5, 0], validation.images.images[indices[5, 0]].transpose(1, 2, 0))
        assert store.read_attrs(f"layers/{layer}/topimages")["threshold_source"].startswith("dissection")
        assert np.array_equal(store.layer(layer, "topimages", "thresholds"),
                              store.layer(layer, "dissection", "thresholds"))


def test_store_masks_are_upsampled_maps_above_threshold(tiny_run, validation):
    store = StoreReader(tiny_run["store"])
    indices = store.layer("conv5", "topimages", "indices")
    masks = store.layer("conv5", "topimages", "masks")
    thresholds = store.layer("conv5", "topimages", "thresholds")
    for unit in (0, 17, 101):
        images, _, _ = next(validation.images.batches(3, "cpu", indices[unit]))
        maps = run_to(validation.sequence, images, ["relu5"])["relu5"][:, unit:unit + 1]
        expected = F.interpolate(maps, size=(64, 64), mode="bilinear", align_corners=False)[:, 0] > thresholds[unit]
        assert np.array_equal(masks[unit], expected.numpy())


def test_unit_page_shows_concept_and_top_images(store_env):
    at = open_view("unit", store_env["store"])
    labels = [m.label for m in at.metric]
    assert {"Best concept", "Category", "IoU"} <= set(labels)
    assert len(at.get("image")) == 3  # the unit's top 3 images
    assert any("detector" in m.value for m in at.markdown)
    assert {"category", "best concept", "IoU"} <= set(at.dataframe[-1].value.columns)


def test_unit_sections_name_the_command_when_results_are_missing(tiny_run, tmp_path, monkeypatch):
    """A store without dissection or top images shows one line each, not a traceback."""
    import shutil

    import h5py

    copy = Path(shutil.copy(tiny_run["store"], tmp_path / "demo.h5"))
    with h5py.File(copy, "a") as handle:
        for layer in ("conv3", "conv4", "conv5"):
            del handle[f"layers/{layer}/dissection"], handle[f"layers/{layer}/topimages"]
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(tmp_path))
    at = open_view("unit", copy)
    notes = " ".join(c.value for c in at.caption)
    assert "no dissection results for conv5" in notes and "no topimages results for conv5" in notes
