"""McNemar p-values and Benjamini-Hochberg q-values on hand-made cases (compute.analysis.significance)."""

import numpy as np
import pytest
import torch
from scipy import stats

from compute.analysis import significance


def test_paired_counts_by_class():
    base_right = torch.tensor([True, True, False, False, True])
    ablated = torch.tensor([[False, True, True, False, False],   # loses images 0 and 4, gains image 2
                            [True, True, False, False, True]])   # changes nothing
    onehot = torch.nn.functional.one_hot(torch.tensor([0, 0, 1, 1, 1]), 2).double()
    lost, gained = significance.paired_counts(base_right, ablated, onehot)
    assert lost.tolist() == [[1, 1], [0, 0]]
    assert gained.tolist() == [[0, 1], [0, 0]]


def test_mcnemar_equals_scipy_binomtest():
    lost, gained = np.meshgrid(np.arange(0, 13), np.arange(0, 13), indexing="ij")
    p = significance.mcnemar_p(lost, gained)
    for l, g in zip(lost.ravel(), gained.ravel()):
        expected = 1.0 if l + g == 0 else stats.binomtest(int(l), int(l + g), 0.5).pvalue
        assert p[l, g] == pytest.approx(expected, rel=1e-12), (l, g)
    # by hand: 5 lost, 0 gained -> 2 * 0.5^5 = 0.0625; 6 and 0 -> 0.03125
    assert p[5, 0] == pytest.approx(0.0625) and p[6, 0] == pytest.approx(0.03125)


def test_q_values_are_benjamini_hochberg():
    p = np.array([[0.01, 0.04], [0.03, 0.20]])
    # sorted 0.01, 0.03, 0.04, 0.20 with m = 4: 0.04, 0.06, 0.0533, 0.20 -> monotone from the top: .04 .0533 .0533 .2
    expected = np.array([[0.04, 0.16 / 3], [0.16 / 3, 0.20]])
    assert np.allclose(significance.q_values(p), expected, rtol=1e-12)
    assert np.array_equal(significance.q_values(p), stats.false_discovery_control(p.ravel()).reshape(2, 2))


def test_significant_drops_need_a_positive_drop():
    q = np.array([[0.01, 0.01, 0.5]])
    drop = np.array([[0.1, -0.1, 0.3]])
    assert significance.significant_drops(q, drop).tolist() == [[True, False, False]]


def test_one_flipped_image_per_class_is_never_significant():
    """With 50 images a class, one lost image is 2 points and p = 1: resolution, not evidence."""
    tests = significance.drop_tests(np.array([[1, 0], [0, 0]]), np.array([[0, 0], [0, 1]]))
    assert (tests["p_value"] == 1).all() and (tests["q_value"] == 1).all()
