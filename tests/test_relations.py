"""Attribute-drop relations equal scipy's statistics; the pipeline stores them; the Attributes page renders them."""

import warnings
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from compute.relations import drop_targets, relation_table, scalar_attributes
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
