"""Each attribute equals its formula on a hand-made case; under batch norm the L1 norm is the BN-folded one."""

from contextlib import contextmanager
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from compute.lib.attributes import (RunningMoments, class_correlation, class_selectivity, folded_l1_norm, l1_norm,
                                    unit_l1)
from compute.stages.attributes import run_stage
from compute.models import get_spec
from compute.models.registry import batch_norm_after
from store import StoreReader


def test_l1_norm_sums_absolute_weights():
    weight = np.array([[[1.0, -2.0], [0.5, 0.0]], [[-1.0, -1.0], [-1.0, 3.0]]])
    assert l1_norm(weight).tolist() == [3.5, 6.0]


def test_folded_l1_norm_hand_case():
    weight = np.array([[[1.0, -2.0], [0.5, 0.0]], [[-1.0, -1.0], [-1.0, 3.0]]])  # plain L1: 3.5, 6.0
    gamma, var, eps = np.array([-2.0, 0.5]), np.array([3.0, 0.99]), 1.0
    # |gamma| / sqrt(var + eps) * L1 = 2 / 2 * 3.5 and 0.5 / sqrt(1.99) * 6
    assert folded_l1_norm(weight, gamma, var, eps).tolist() == pytest.approx([3.5, 3.0 / np.sqrt(1.99)], abs=1e-12)
    assert folded_l1_norm(weight, None, np.array([0.0, 8.0]), 1.0).tolist() == pytest.approx([3.5, 2.0], abs=1e-12)


def _demo_bn(seed=0):
    spec = get_spec("demo-bn")
    torch.manual_seed(seed)
    model = spec.build().eval()
    for bn in (model.bn1, model.bn2, model.bn3, model.bn4, model.bn5):  # trained-looking statistics, not 0 and 1
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.2, 3.0)
    return spec, model


def test_folded_l1_is_invariant_to_rescaling_a_filter_under_batch_norm():
    """Scaling conv3's filter u (and bias) by s, running_mean by s and running_var + eps by s^2 changes nothing the
    network computes: the BN-folded L1 stays, the plain L1 grows by s."""
    spec, model = _demo_bn()
    images = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        before_logits = model(images)
    before, attrs = unit_l1(model, spec, "conv3")
    plain_before = l1_norm(model.conv3.weight.detach().numpy())
    assert attrs["folded_batch_norm"] == "bn3" and attrs["source"] == "conv3"
    assert "sqrt(running_var_u + eps)" in attrs["definition"]
    u, s, bn = 7, 3.0, model.bn3
    with torch.no_grad():
        model.conv3.weight[u] *= s
        model.conv3.bias[u] *= s
        bn.running_mean[u] *= s
        bn.running_var[u] = s * s * (bn.running_var[u] + bn.eps) - bn.eps
        after_logits = model(images)
    after, _ = unit_l1(model, spec, "conv3")
    plain_after = l1_norm(model.conv3.weight.detach().numpy())
    torch.testing.assert_close(after_logits, before_logits, rtol=1e-4, atol=1e-5)  # the same network
    assert plain_after[u] == pytest.approx(s * plain_before[u], rel=1e-6)
    assert after[u] == pytest.approx(before[u], rel=1e-6)
    assert np.array_equal(np.delete(after, u), np.delete(before, u))
    gamma = bn.weight.detach().double().numpy()
    var = bn.running_var.detach().double().numpy()
    expected = np.abs(gamma) / np.sqrt(var + bn.eps) * plain_after
    assert after == pytest.approx(expected, rel=1e-12)
    print(f"conv3 unit {u}: plain L1 {plain_before[u]:.6f} -> {plain_after[u]:.6f}, "
          f"BN-folded L1 {before[u]:.6f} -> {after[u]:.6f}")


@pytest.mark.parametrize("name, layer, expected", [
    ("demo", "conv3", None), ("demo-bn", "conv3", "bn3"), ("demo-bn", "conv1", "bn1"),
    ("alexnet-places", "conv5", None), ("alexnet-places-bn", "conv2", "features.5"),
    ("alexnet-imagenet-dropout", "conv5", None),
    ("resnet18-places", "layer1", "layer1.1.bn2"), ("resnet18-imagenet", "layer4", "layer4.1.bn2"),
])
def test_batch_norm_after_each_models_unit_conv(name, layer, expected):
    spec = get_spec(name)
    with torch.device("meta"):  # the layout only
        model = spec.build()
    assert batch_norm_after(model, spec.unit_weights[layer]) == expected


def test_batch_norm_after_an_untraceable_model_reads_its_layout():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.ReLU())

        def forward(self, x):
            if x.sum() > 0:  # data-dependent: torch.fx cannot trace it
                x = -x
            return self.body(x)

    model = Branchy()
    assert batch_norm_after(model, "body.0") == "body.1" and batch_norm_after(model, "body.3") is None


def test_a_conv_feeding_more_than_its_batch_norm_is_not_folded():
    class Tapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) + y

    assert batch_norm_after(Tapped(), "conv") is None


def test_resnet_l1_folds_the_last_blocks_bn2():
    spec = get_spec("resnet18-places")
    torch.manual_seed(1)
    model = spec.build().eval()
    bn = model.layer2[1].bn2
    with torch.no_grad():
        bn.weight.uniform_(-1, 1)
        bn.running_var.uniform_(0.1, 2.0)
    values, attrs = unit_l1(model, spec, "layer2")
    assert attrs["folded_batch_norm"] == "layer2.1.bn2" and attrs["source"] == "layer2.1.conv2"
    weight = model.layer2[1].conv2.weight.detach().double().numpy()
    expected = (np.abs(bn.weight.detach().double().numpy()) / np.sqrt(bn.running_var.detach().double().numpy() + bn.eps)
                * np.abs(weight).reshape(len(weight), -1).sum(1))
    assert values == pytest.approx(expected, rel=1e-12)


def test_stage_stores_the_folded_norm_with_what_it_is(tmp_path):
    """The attributes stage writes the BN-folded norm at attributes/l1 and says so in its attrs."""
    spec, model = _demo_bn(seed=2)
    units, images, classes = 96, 10, 24
    rng = np.random.default_rng(0)
    parts = {"layers/conv3/activations/mean": rng.random((images, units)),
             "images/probs": rng.dirichlet(np.ones(classes), images)}
    for name in ("sparsity", "moment_mean", "moment_std"):
        parts[f"layers/conv3/activations/{name}"] = rng.random(units)
    path = tmp_path / "part.h5"

    @contextmanager
    def stage(name):
        with h5py.File(path, "w") as h5:
            yield h5

    writer = SimpleNamespace(read_part=lambda stage_name, name: parts[name], stage=stage)
    ctx = SimpleNamespace(writer=writer, labels=rng.integers(0, classes, images), num_classes=classes, model=model,
                          spec=spec)
    run_stage(ctx, "conv3")
    with h5py.File(path, "r") as h5:
        l1 = h5["layers/conv3/attributes/l1"]
        attrs = {key: value.decode() if isinstance(value, bytes) else value for key, value in l1.attrs.items()}
        stored = l1[()]
    assert attrs["folded_batch_norm"] == "bn3" and attrs["source"] == "conv3"
    assert attrs["definition"].startswith("BN-folded L1 norm")
    assert np.allclose(stored, unit_l1(model, spec, "conv3")[0], rtol=1e-6)
    assert not np.allclose(stored, l1_norm(model.conv3.weight.detach().numpy()), rtol=1e-2)


def test_the_demo_stores_plain_l1_and_says_no_batch_norm(tiny_run):
    store = StoreReader(tiny_run["store"])
    for layer in store.layers:
        attrs = store.read_attrs(f"layers/{layer}/attributes/l1")
        assert attrs["folded_batch_norm"] == "" and attrs["source"] == layer
        assert "no batch norm" in attrs["definition"]


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
