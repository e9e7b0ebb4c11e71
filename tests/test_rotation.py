"""Random-direction ablation: the rotation is a change of basis, direction ablation is rotate-zero-rotate-back, and
with Q = identity it is unit ablation, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from compute.lib.rotation import random_rotation
from compute.stages.rotation import sweep
from compute.stages.ablation import drops
from store import StoreReader
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_ctx(tiny_run):
    """A RunContext on the tiny run's model and validation images (no writer: sweeps only)."""
    from compute.run.context import RunContext
    from compute.data.validation import load_validation
    from compute.run.imagecache import ImageCache
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
    from compute.stages.rotation import run_stage

    with pytest.raises(StageSkipped):
        run_stage(SimpleNamespace(option=lambda kind: kind(rotations=0)), "conv5")


def significant_copy(source, target: Path, layer: str = "conv5") -> Path:
    """A copy of a store in which some of ``layer``'s drops are significant (6 images per class cannot make one).

    Units 0-9 lose all images of class u % K (drop 1, q 0.01); unit 10 gains all images of class 3 (drop -1, q 0.01:
    significant, but a gain, not a drop); directions 0-2 of rotation 0 lose half the images of class 0 (drop 0.5,
    q 0.02); units 0-4 have overall q 0.01. Counts, drops and p-values agree (compute.analysis.significance); the q-values are
    set by hand, every other cell 1."""
    import shutil

    import h5py

    from compute.analysis.significance import mcnemar_p

    shutil.copy(source, target)
    with h5py.File(target, "r+") as h5:
        n = np.bincount(h5["images/labels"][()], minlength=len(h5["classes"])).astype(np.float64)
        units, k = h5[f"layers/{layer}/ablation/lost"].shape
        lost, gained, q = np.zeros((units, k), int), np.zeros((units, k), int), np.ones((units, k))
        for u in range(10):
            lost[u, u % k], q[u, u % k] = n[u % k], 0.01
        gained[10, 3], q[10, 3] = n[3], 0.01
        overall_q = np.ones(units)
        overall_q[:5] = 0.01
        rot_lost, rot_q = np.zeros((1, units, k), int), np.ones((1, units, k))
        rot_lost[0, :3, 0], rot_q[0, :3, 0] = n[0] // 2, 0.02
        for section, lost_, gained_, q_, overall_q_ in (("ablation", lost, gained, q, overall_q),
                                                        ("rotation", rot_lost, np.zeros_like(rot_lost), rot_q,
                                                         np.ones(rot_lost.shape[:2]))):
            group = h5[f"layers/{layer}/{section}"]
            for name, value in (("lost", lost_), ("gained", gained_), ("class_drop", (lost_ - gained_) / n),
                                ("overall_lost", lost_.sum(-1)), ("overall_gained", gained_.sum(-1)),
                                ("overall_drop", (lost_ - gained_).sum(-1) / n.sum()),
                                ("p_value", mcnemar_p(lost_, gained_)), ("q_value", q_),
                                ("overall_p_value", mcnemar_p(lost_.sum(-1), gained_.sum(-1))),
                                ("overall_q_value", overall_q_)):
                group[name][...] = value
    return target


def strip_tests(path: Path) -> Path:
    """The store as written before the significance tests: no counts, p- or q-values."""
    import h5py

    with h5py.File(path, "r+") as h5:
        for layer in h5["layers"]:
            for section in ("ablation", "rotation"):
                for name in ("lost", "gained", "overall_lost", "overall_gained", "p_value", "q_value",
                             "overall_p_value", "overall_q_value"):
                    if f"{section}/{name}" in h5[f"layers/{layer}"]:
                        del h5[f"layers/{layer}/{section}/{name}"]
    return path


def test_comparison_counts_shares_and_tests_like_scipy():
    """Hand-made drops: units [4, 3], random directions of two rotations [2, 4, 3]."""
    from scipy import stats

    from figures.rotation import EFFECT, comparison

    unit_drop = np.array([[0.5, 0, 0], [0, 0.25, 0], [0, 0, 0], [-0.5, 0, 0]])
    unit_q = np.array([[0.01, 1, 1], [1, 0.2, 1], [1, 1, 1], [0.001, 1, 1]])  # unit 3: significant, but a gain
    rot_drop = np.zeros((2, 4, 3))
    rot_q = np.ones((2, 4, 3))
    rot_drop[0, 0, 1], rot_q[0, 0, 1] = 0.25, 0.04
    rot_drop[1, 2, 0], rot_q[1, 2, 0] = 0.5, 0.01
    rot_drop[1, 3, 2], rot_q[1, 3, 2] = 0.25, 0.06
    unit_overall, rot_overall = unit_drop.mean(1), rot_drop.mean(2)
    row = comparison(unit_drop, unit_overall, rot_drop, rot_overall, unit_q, rot_q, level=0.05)
    assert (row["units"], row["rotations"], row["random directions"]) == (4, 2, 8)
    assert row["units with a significant class drop"] == 1 and row["units with a significant class drop (%)"] == 25
    assert row["random directions with a significant class drop"] == 2
    assert row["random directions with a significant class drop (%)"] == 25
    loose = comparison(unit_drop, unit_overall, rot_drop, rot_overall, unit_q, rot_q, level=0.25)
    assert loose["units with a significant class drop (%)"] == 50
    assert loose["random directions with a significant class drop (%)"] == 100 * 3 / 8
    for name, units, pooled in (("max class drop", unit_drop.max(1), rot_drop.max(2).ravel()),
                                ("overall drop", unit_overall, rot_overall.ravel())):
        expected = stats.mannwhitneyu(units, pooled, alternative="greater")
        assert row[f"{name}: p (units > random)"] == expected.pvalue
        assert row[f"{name}: Mann-Whitney U"] == expected.statistic
        assert row[f"{name}: {EFFECT}"] == pytest.approx(expected.statistic / (4 * 8))
    # drops tie (steps of one image): scipy's "auto" then takes the normal approximation, as the page says
    assert row["max class drop: p (units > random)"] == stats.mannwhitneyu(
        unit_drop.max(1), rot_drop.max(2).ravel(), alternative="greater", method="asymptotic").pvalue
    old = comparison(unit_drop, unit_overall, rot_drop, rot_overall)  # a store without q-values
    assert old["units with a significant class drop"] is None and old["random directions with a significant class "
                                                                       "drop (%)"] is None
    assert old["max class drop: p (units > random)"] == row["max class drop: p (units > random)"]


def metric_values(at) -> dict:
    """label -> (value, the gray second line)."""
    return {metric.label: (metric.value, metric.delta) for metric in at.metric}


def test_rotation_page_shows_shares_tests_and_curves(store_env):
    from scipy import stats

    at = open_view("rotation", store_env["store"])
    shown = metric_values(at)
    # the tiny network is at chance: no ablation changes any prediction, so nothing is significant and nothing differs
    assert shown["Significant class drop, units"] == ("0.0%", "0 of 128 units")
    assert shown["Significant class drop, random"] == ("0.0%", "0 of 128 directions")
    assert shown["Max class drop, units > random"] == ("p = 1", "Mann-Whitney U = 8192.0")  # 128 x 128 / 2: all tie
    assert shown["Overall drop, units > random"][0] == "p = 1"
    assert len(at.get("vega_lite_chart")) == 2
    tests = at.dataframe[0].value
    store = StoreReader(store_env["store"])
    units = store.layer("conv5", "ablation", "class_drop").max(1)
    pooled = store.layer("conv5", "rotation", "class_drop").max(2).ravel()
    expected = stats.mannwhitneyu(np.float64(units), np.float64(pooled), alternative="greater")
    assert tests.loc[0, "Mann-Whitney U"] == expected.statistic
    assert tests.loc[0, "p (one-sided, units > random)"] == expected.pvalue
    table = at.dataframe[1].value
    assert list(table.index) == ["conv3", "conv4", "conv5"]
    assert table.loc["conv5", "median max class drop, units"] == pytest.approx(100 * np.median(units))
    assert table.loc["conv5", "max class drop: p (units > random)"] == expected.pvalue
    assert (table["units with a significant class drop (%)"] == 0).all()
    captions = " ".join(caption.value for caption in at.caption)
    assert "Mann-Whitney" in captions and "one image per class" in captions and "normal approximation" in captions


def test_rotation_page_counts_significant_drops_at_the_chosen_level(store_env, tmp_path, monkeypatch):
    from scipy import stats

    from figures.rotation import format_p

    path = significant_copy(store_env["store"], tmp_path / "demo.h5")
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(tmp_path))
    at = open_view("rotation", path, layer="conv5")
    shown = metric_values(at)
    assert shown["Significant class drop, units"] == ("7.8%", "10 of 128 units")
    assert shown["Significant class drop, random"] == ("2.3%", "3 of 128 directions")
    store = StoreReader(path)
    # in float64, as the page computes it (scipy keeps float32 input in float32)
    expected = {name: stats.mannwhitneyu(np.float64(units), np.float64(pooled), alternative="greater").pvalue
                for name, units, pooled in (
        ("max class drop", store.layer("conv5", "ablation", "class_drop").max(1),
         store.layer("conv5", "rotation", "class_drop").max(2).ravel()),
        ("overall drop", store.layer("conv5", "ablation", "overall_drop"),
         store.layer("conv5", "rotation", "overall_drop").ravel()))}
    assert 0 < expected["max class drop"] < 0.05  # ten units lose a whole class, three directions half of one
    tests = at.dataframe[0].value.set_index("drop")
    for name in ("max class drop", "overall drop"):
        assert shown[f"{name.capitalize()}, units > random"] == (
            f"p = {format_p(expected[name])}", f"Mann-Whitney U = {tests.loc[name, 'Mann-Whitney U']:.1f}")
        assert tests.loc[name, "p (one-sided, units > random)"] == expected[name]
    table = at.dataframe[1].value
    assert table.loc["conv5", "units with a significant class drop (%)"] == pytest.approx(100 * 10 / 128)
    assert table.loc["conv5", "random directions with a significant class drop (%)"] == pytest.approx(100 * 3 / 128)
    assert table.loc["conv4", "units with a significant class drop"] == 0
    strict = metric_values(open_view("rotation", path, layer="conv5", fdr="0.01"))  # q 0.01 is not below 0.01
    assert strict["Significant class drop, units"] == ("0.0%", "0 of 128 units")
    assert strict["Significant class drop, random"] == ("0.0%", "0 of 128 directions")


def test_rotation_page_on_a_store_without_the_tests(store_env, tmp_path, monkeypatch):
    path = strip_tests(significant_copy(store_env["store"], tmp_path / "demo.h5"))
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(tmp_path))
    at = open_view("rotation", path, layer="conv5")
    shown = metric_values(at)
    assert shown["Significant class drop, units"][0] == "—"
    assert shown["Significant class drop, random"][0] == "—"
    assert shown["Max class drop, units > random"][0].startswith("p = ")  # the test needs only the drops
    captions = " ".join(caption.value for caption in at.caption)
    assert "not in this store, recompute with `python -m compute.all --model demo --force`" in captions
