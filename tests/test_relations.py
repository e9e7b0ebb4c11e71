"""Attribute-drop relations equal scipy's statistics; the pipeline stores them; the Attributes page renders them."""

import shutil
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from scipy import stats

from compute.analysis.relations import (FOLDED_L1, SIGN_NOTE, drop_targets, in_paper_sign, name_folded_l1,
                                        relation_table, scalar_attributes)
from figures.attributes import coefficient_frame
from store import StoreReader
from tests.views import open_view

ROOT = Path(__file__).resolve().parents[1]


def _vectors(n=80, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random(n)
    return {"a": x, "b": rng.random(n)}, {"t": 0.6 * x + 0.4 * rng.random(n), "u": np.round(rng.random(n), 1)}


def test_coefficients_equal_scipy():
    attributes, targets = _vectors()
    table = relation_table(attributes, targets, n_resamples=99)
    assert list(table["attributes"]) == ["a", "b"] and list(table["targets"]) == ["t", "u"]
    for i, x in enumerate(attributes.values()):
        for j, y in enumerate(targets.values()):
            pearson, spearman = stats.pearsonr(x, y), stats.spearmanr(x, y)
            assert table["pearson_r"][i, j] == pytest.approx(pearson.statistic, abs=1e-12)
            assert table["pearson_p"][i, j] == pytest.approx(pearson.pvalue, rel=1e-9)
            assert table["spearman_r"][i, j] == pytest.approx(spearman.statistic, abs=1e-12)
            assert table["spearman_p"][i, j] == pytest.approx(spearman.pvalue, rel=1e-9)
    assert table["pearson_r"][0, 0] > 0.7  # built to correlate


def test_bootstrap_intervals_are_scipys_and_seeded():
    attributes, targets = _vectors(seed=1)
    table = relation_table(attributes, targets, n_resamples=199, seed=3)
    x, y = attributes["a"], targets["t"]
    expected = stats.bootstrap((x, y), lambda a, b, axis=-1: stats.pearsonr(a, b, axis=axis).statistic,
                               paired=True, vectorized=True, n_resamples=199, rng=np.random.default_rng(3))
    assert table["pearson_ci"][0, 0] == pytest.approx([expected.confidence_interval.low,
                                                       expected.confidence_interval.high], abs=1e-12)
    low, high = table["spearman_ci"][0, 0]
    assert low < table["spearman_r"][0, 0] < high
    again = relation_table(attributes, targets, n_resamples=199, seed=3)
    assert np.array_equal(table["spearman_ci"], again["spearman_ci"])


def test_constant_attribute_has_no_coefficient():
    attributes, targets = _vectors()
    attributes["dead"] = np.zeros(80)
    table = relation_table(attributes, targets, n_resamples=0)
    assert np.isnan(table["pearson_r"][2]).all() and np.isnan(table["spearman_ci"]).all()


def test_scalar_attributes_take_the_max_over_classes():
    arrays = {("attributes", "selectivity"): np.array([[0.1, 0.5], [0.3, -0.2]]),
              ("attributes", "l1"): np.array([2.0, 3.0]),
              ("ablation", "class_drop"): np.array([[0.0, 0.2], [0.1, 0.04]]),
              ("ablation", "overall_drop"): np.array([0.1, 0.05])}
    read = lambda section, name: arrays.get((section, name))  # noqa: E731
    found = scalar_attributes(read)
    assert list(found) == ["max selectivity", "L1"]  # absent attributes (no dissection) are left out
    assert found["max selectivity"].tolist() == [0.5, 0.3]
    assert drop_targets(read)["max class drop"].tolist() == [0.2, 0.1]


def test_paper_sign_is_the_negation_computed_for_display():
    """The paper's Fig. 5 drop is ablated minus baseline, this tool's baseline minus ablated: the paper's
    "negative correlation" with the max class drop is a positive r here."""
    attributes, targets = _vectors()
    table = relation_table(attributes, targets, n_resamples=0)
    stored = {key: np.array(value, copy=True) for key, value in table.items()}
    frame = coefficient_frame(table, 0.95)
    assert list(frame.columns[:4]) == ["attribute", "against", "Pearson r", "paper's sign"]
    assert np.array_equal(frame["paper's sign"].to_numpy(), -table["pearson_r"].reshape(-1))
    assert table["pearson_r"][0, 0] > 0.7 and frame["paper's sign"][0] < -0.7
    assert in_paper_sign(0.25) == -0.25 and np.isnan(in_paper_sign(np.nan))
    assert all(np.array_equal(stored[key], table[key]) for key in ("pearson_r", "spearman_r"))  # stored: unchanged
    assert "baseline minus ablated" in SIGN_NOTE and "paper's sign" in SIGN_NOTE


def test_folded_l1_is_named_so():
    attributes, targets = _vectors()
    attributes = {"L1": attributes["a"], "sparsity": attributes["b"]}
    table = relation_table(attributes, targets, n_resamples=0)
    named, renamed = name_folded_l1(attributes, table)
    assert list(named) == [FOLDED_L1, "sparsity"] and list(renamed["attributes"]) == [FOLDED_L1, "sparsity"]
    assert list(table["attributes"]) == ["L1", "sparsity"]  # the original table is left as it was


def test_pipeline_stores_the_relations_table(tiny_run):
    store = StoreReader(tiny_run["store"])
    for layer in store.layers:
        relations = lambda name: store.layer(layer, "relations", name)  # noqa: E731
        names = list(relations("attributes"))
        assert names == ["max selectivity", "max correlation", "max concept IoU", "L1", "sparsity",
                         "activation mean", "activation std"]
        assert list(relations("targets")) == ["overall drop", "max class drop"]
        assert relations("pearson_ci").shape == (len(names), 2, 2)
        read = lambda section, name: store.layer(layer, section, name)  # noqa: E731
        targets = drop_targets(read)
        for i, x in enumerate(scalar_attributes(read).values()):
            for j, y in enumerate(targets.values()):
                with warnings.catch_warnings():  # the tiny model's drops may all be 0: no coefficient, as scipy says
                    warnings.simplefilter("ignore", stats.ConstantInputWarning)
                    expected = stats.spearmanr(x, y).statistic
                np.testing.assert_allclose(relations("spearman_r")[i, j], expected, atol=1e-6, equal_nan=True)


def test_attributes_page_renders(store_env):
    at = open_view("attributes", store_env["store"])
    assert at.get("vega_lite_chart"), "the scatterplots are missing"
    assert len(at.dataframe) >= 2  # coefficients and the ranking
    assert at.dataframe[-1].value["max class drop"].is_monotonic_decreasing  # the ranking, by default
    assert at.get("download_button")
    at.selectbox(key="rank_by").set_value("L1")
    at.toggle(key="rank_ascending").set_value(True).run()
    ranking = at.dataframe[-1].value
    assert ranking["L1"].is_monotonic_increasing and ranking["rank"].tolist() == list(range(1, len(ranking) + 1))
    coefficients = at.dataframe[0].value
    assert set(coefficients["against"]) == {"overall drop", "max class drop"}
    assert "max concept IoU" in set(coefficients["attribute"])
    np.testing.assert_array_equal(coefficients["paper's sign"], -coefficients["Pearson r"])
    captions = [c.value for c in at.caption]
    assert SIGN_NOTE in captions
    assert "L1" in set(coefficients["attribute"]) and not any(FOLDED_L1 in c for c in captions)  # demo: no BN


def test_attributes_page_marks_a_bn_folded_l1(store_env, tmp_path, monkeypatch):
    """A store whose L1 array says it is BN-folded shows it as such; stores without the attr (older) do not."""
    directory = tmp_path / "stores"
    directory.mkdir()
    store = directory / "folded.h5"
    shutil.copy(store_env["store"], store)
    with h5py.File(store, "r+") as h5:
        for layer in h5["layers"]:
            h5[f"layers/{layer}/attributes/l1"].attrs["folded_batch_norm"] = "bn" + layer[-1]
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    at = open_view("attributes", store)
    coefficients = at.dataframe[0].value
    assert FOLDED_L1 in set(coefficients["attribute"]) and "L1" not in set(coefficients["attribute"])
    assert FOLDED_L1 in at.dataframe[-1].value.columns  # the ranking
    note = next(c.value for c in at.caption if c.value.startswith(FOLDED_L1))
    assert "batch norm bn5" in note and "|γ| / √(running var + ε)" in note
