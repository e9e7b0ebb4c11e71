"""Each attribute equals its formula on a hand-made case."""

import numpy as np
import pytest
from scipy import stats

from compute.attributes import RunningMoments, class_correlation, class_selectivity, l1_norm


def test_l1_norm_sums_absolute_weights():
    weight = np.array([[[1.0, -2.0], [0.5, 0.0]], [[-1.0, -1.0], [-1.0, 3.0]]])
    assert l1_norm(weight).tolist() == [3.5, 6.0]


def test_class_selectivity_hand_case():
    # unit 0 fires only for class 0; unit 1 fires equally for all; unit 2 is dead.
    labels = np.array([0, 0, 1, 1, 2, 2])
    acts = np.array([[4, 1, 0], [2, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0], [0, 1, 0]], dtype=float)
    sel = class_selectivity(acts, labels, 3)
    assert sel[0, 0] == pytest.approx(1.0)  # mu_c = 3, mu_not = 0
    assert sel[0, 1] == pytest.approx(-1.0)  # mu_c = 0, mu_not = 1.5 -> (0-1.5)/(0+1.5)
    assert np.allclose(sel[1], 0.0)
    assert np.allclose(sel[2], 0.0)
    # a mixed case by the formula
    acts2 = np.array([[3.0], [1.0], [2.0], [2.0], [1.0], [1.0]])
    mu_c, mu_not = 2.0, 1.5
    assert class_selectivity(acts2, labels, 3)[0, 0] == pytest.approx((mu_c - mu_not) / (mu_c + mu_not))


def test_class_correlation_matches_scipy():
    rng = np.random.default_rng(0)
    acts = rng.random((50, 4))
    probs = rng.dirichlet(np.ones(3), size=50)
    probs[:, 0] = 0.2 * acts[:, 1] + 0.01 * rng.random(50)
    corr = class_correlation(acts, probs)
    for u in range(4):
        for c in range(3):
            assert corr[u, c] == pytest.approx(stats.pearsonr(acts[:, u], probs[:, c]).statistic, abs=1e-12)
    assert corr[1, 0] > 0.99


def test_class_correlation_constant_unit_is_zero():
    acts = np.zeros((10, 1))
    probs = np.random.default_rng(1).random((10, 2))
    assert np.array_equal(class_correlation(acts, probs), np.zeros((1, 2)))


def test_running_moments_match_numpy():
    rng = np.random.default_rng(2)
    data = np.maximum(rng.normal(size=(30, 3, 4, 5)), 0)
    moments = RunningMoments(3)
    for start in range(0, 30, 7):
        moments.update(data[start:start + 7])
    flat = np.moveaxis(data, 1, -1).reshape(-1, 3)
    assert np.allclose(moments.mean, flat.mean(0))
    assert np.allclose(moments.std, flat.std(0))
    assert np.allclose(moments.sparsity, (flat == 0).mean(0))
