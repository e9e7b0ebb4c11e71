"""Random-direction ablation: the rotation is a change of basis, direction ablation is rotate-zero-rotate-back, and
with Q = identity it is unit ablation, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compute.rotation import random_rotation, sweep
from compute.single_unit import drops
from store import StoreReader
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_ctx(tiny_run):
    """A RunContext on the tiny run's model and validation images (no writer: sweeps only)."""
    from compute.context import RunContext
    from compute.data.validation import load_validation
    from compute.imagecache import ImageCache
    from compute.models import get_spec

    spec = get_spec("demo")
    model, _ = spec.load(None, tiny_run["data_dir"])
    val = load_validation("synthscenes", tiny_run["dataset"], spec.preprocess)
    return RunContext(spec=spec, model=model, images=ImageCache(val.dataset, spec.preprocess),
                      class_names=list(val.class_names), layers=["conv3", "conv4", "conv5"], device=torch.device("cpu"),
                      writer=None, config={}, data_dir=tiny_run["data_dir"], batch_size=72)


def layer_batch(ctx, layer):
    acts, labels, _ = next(ctx.activations([layer]))
    return acts[layer], labels


def test_random_rotation_is_orthogonal_and_seeded():
    q = random_rotation(96, 3).double()
    assert torch.allclose(q.T @ q, torch.eye(96, dtype=torch.float64), atol=1e-5)
    assert torch.equal(random_rotation(96, 3), random_rotation(96, 3))
    assert not torch.allclose(random_rotation(96, 3), random_rotation(96, 4))
    assert not torch.allclose(q.abs(), torch.eye(96, dtype=torch.float64))  # really mixes channels


@pytest.mark.parametrize("layer", ["conv3", "conv5"])
def test_round_trip_without_zeroing_keeps_predictions(tiny_ctx, layer):
    acts, labels = layer_batch(tiny_ctx, layer)
    engine = tiny_ctx.engine(layer)
    q = random_rotation(acts.shape[1], 0)
    z = torch.einsum("bchw,cd->bdhw", acts, q)  # z = Q^T a at every position
    back = torch.einsum("bdhw,cd->bchw", z, q)  # a = Q z
    assert (back - acts).abs().max() < 1e-4
    assert torch.equal(engine.baseline(back, labels).pred, engine.baseline(acts, labels).pred)


@pytest.mark.parametrize("layer", ["conv3", "conv5"])
def test_direction_ablation_is_rotate_zero_rotate_back(tiny_ctx, layer):
    acts, labels = layer_batch(tiny_ctx, layer)
    engine = tiny_ctx.engine(layer)
    q = random_rotation(acts.shape[1], 1)
    chosen = torch.tensor([0, 5, acts.shape[1] - 1])
    outcome = engine.evaluate_directions(acts, labels, q, chosen)
    z = torch.einsum("bchw,cd->bdhw", acts, q)
    for row, j in enumerate(chosen.tolist()):
        zeroed = z.clone()
        zeroed[:, j] = 0
        edited = torch.einsum("bdhw,cd->bchw", zeroed, q)
        assert torch.equal(outcome.pred[row], engine.baseline(edited, labels).pred)
    assert outcome.pred.shape == (3, len(labels))


@pytest.mark.parametrize("layer", ["conv4", "conv5"])  # conv4: the full tail; conv5: the units' pool shortcut
def test_identity_rotation_reproduces_single_unit_ablation(tiny_ctx, tiny_run, layer):
    store = StoreReader(tiny_run["store"])
    channels = store.layer(layer, "ablation", "overall_drop").shape[0]
    result = drops(sweep(tiny_ctx, layer, [torch.eye(channels)])[0])
    assert np.array_equal(result["class_drop"], store.layer(layer, "ablation", "class_drop"))
    assert np.array_equal(result["overall_drop"], store.layer(layer, "ablation", "overall_drop"))


def test_a_share_of_directions_equals_those_rows_of_the_full_sweep(tiny_ctx):
    """What one of two torchrun ranks computes: every other direction, value for value (of the first 32, for time)."""
    rotation = random_rotation(128, 0)
    whole, = sweep(tiny_ctx, "conv5", [rotation], directions=np.arange(32))
    part, = sweep(tiny_ctx, "conv5", [rotation], directions=np.arange(1, 32, 2))
    assert np.array_equal(part["lost"], whole["lost"][1::2])
    assert np.array_equal(part["gained"], whole["gained"][1::2])
    assert np.array_equal(part["base_correct"], whole["base_correct"])


def test_stage_stores_every_direction_of_every_seed(tiny_run):
    store = StoreReader(tiny_run["store"])
    for layer in ("conv3", "conv4", "conv5"):
        units = store.layer(layer, "ablation", "class_drop")
        class_drop = store.layer(layer, "rotation", "class_drop")
        overall = store.layer(layer, "rotation", "overall_drop")
        assert class_drop.shape == (1,) + units.shape and overall.shape == (1, units.shape[0])
        assert store.layer(layer, "rotation", "seeds").tolist() == [0]
        assert np.allclose(class_drop.mean(2), overall, atol=1e-6)  # balanced classes
        # a drop is a whole number of images out of 6 per class
        assert np.allclose(class_drop * 6, np.round(class_drop * 6), atol=1e-5)


def test_rotations_zero_skips_the_stage():
    from types import SimpleNamespace

    from compute.errors import StageSkipped
    from compute.rotation import run_stage

    with pytest.raises(StageSkipped):
        run_stage(SimpleNamespace(extra={"args": SimpleNamespace(rotations=0)}), "conv5")


def test_rotation_page_shows_curves_and_summary(store_env):
    at = open_view("rotation", store_env["store"])
    labels = [metric.label for metric in at.metric]
    assert "Median max class drop, units" in labels and "Units / random" in labels
    assert len(at.get("vega_lite_chart")) == 2
    table = at.dataframe[0].value
    assert list(table.index) == ["conv3", "conv4", "conv5"]
    store = StoreReader(store_env["store"])
    units_median = 100 * np.median(store.layer("conv5", "ablation", "class_drop").max(1))
    assert table.loc["conv5", "median max class drop, units"] == pytest.approx(units_median)
