"""compute.lib.pooling: the sliced max pool equals torch's kernel, and is swapped in only where it applies."""

from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compute.lib.pooling import (SlicedMaxPool2d, _sliceable, sliced_max_pool2d, with_pools_before_relus,
                                 with_sliced_pools)
from compute.models import zoo
from compute.models.demo import build_demo


def test_a_hand_made_window():
    x = torch.tensor([[[[1., 5., 2., 0.],
                        [3., -1., 7., 4.],
                        [-2., -3., 6., 6.],
                        [8., 0., -9., float("nan")]]]])
    got = sliced_max_pool2d(x, 2)
    assert got[0, 0, 0].tolist() == [5.0, 7.0]
    assert got[0, 0, 1, 0].item() == 8.0
    assert torch.isnan(got[0, 0, 1, 1])  # NaN propagates, as in the stock kernel


@pytest.mark.parametrize("shape, kernel, stride, padding", [
    ((7, 16, 8, 8), 2, None, 0),          # the demo's pools
    ((3, 8, 13, 13), 3, 2, 0),            # AlexNet's overlapping pools
    ((2, 4, 15, 11), (3, 2), (2, 1), 1),  # unequal sides, padding, odd sizes
    ((5, 9, 9), 3, 3, 1),                 # an unbatched map
])
def test_equals_torch_on_every_setting(shape, kernel, stride, padding):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=generator)
    x[..., 0, 0] = float("nan")
    x[..., 1, :] = x[..., 2, :]  # ties
    for dtype in (torch.float32, torch.float64):
        y = x.to(dtype)
        want = F.max_pool2d(y, kernel, stride, padding)
        got = sliced_max_pool2d(y, kernel, stride, padding)
        assert got.shape == want.shape and got.dtype == dtype and got.is_contiguous()
        assert torch.equal(got.isnan(), want.isnan())
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))


def test_falls_back_where_it_does_not_apply():
    x = torch.arange(64.0).view(1, 1, 8, 8)
    for pool in (SlicedMaxPool2d(2, return_indices=True), SlicedMaxPool2d(3, 2, ceil_mode=True),
                 SlicedMaxPool2d(2, dilation=2)):
        stock = nn.MaxPool2d(pool.kernel_size, pool.stride, pool.padding, pool.dilation, pool.return_indices,
                             pool.ceil_mode)
        got, want = pool(x), stock(x)
        if isinstance(want, tuple):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
        else:
            assert torch.equal(got, want)


def test_swaps_every_pool_and_keeps_the_outputs():
    torch.manual_seed(0)
    demo = build_demo().eval()
    x = torch.randn(4, 3, 64, 64)
    want = demo(x)
    assert with_sliced_pools(demo) is demo
    pools = [m for m in demo.modules() if isinstance(m, nn.MaxPool2d)]
    assert len(pools) == 3 and all(type(m) is SlicedMaxPool2d for m in pools)
    assert torch.equal(demo(x), want)
    assert list(demo.state_dict()) == list(build_demo().state_dict())

    resnet = zoo.ARCHS["resnet18"]["build"](num_classes=5).eval()  # a pool with padding, nested in the stem
    x = torch.randn(2, 3, 64, 64)
    want = resnet(x)
    with_sliced_pools(resnet)
    assert type(resnet.maxpool) is SlicedMaxPool2d and torch.equal(resnet(x), want)


def test_channels_last_batches_take_the_stock_kernel():
    """On a channels-last batch torch's own kernel is the fast one: the pool hands it over, with the same values."""
    torch.manual_seed(1)
    x = torch.randn(6, 5, 9, 9).contiguous(memory_format=torch.channels_last)
    pool = SlicedMaxPool2d(3, 2, padding=1)
    assert not _sliceable(pool, x) and _sliceable(pool, x.contiguous())
    assert torch.equal(pool(x), F.max_pool2d(x.contiguous(), 3, 2, 1))


def test_pools_move_before_the_relus_they_follow():
    """ReLU -> max pool becomes max pool -> ReLU, with the same outputs to the bit, a hand-made window included; an
    average pool (which a ReLU does not commute with) keeps its place, and the sequence given is not changed."""
    window = torch.tensor([[[[-3.0, -1.0], [-2.0, -5.0]]]])  # all negative: 0 either way
    swapped = with_pools_before_relus(nn.Sequential(nn.ReLU(), nn.MaxPool2d(2)))
    assert [type(m) for m in swapped] == [nn.MaxPool2d, nn.ReLU]
    assert torch.equal(swapped(window), torch.zeros(1, 1, 1, 1))

    steps = nn.Sequential(OrderedDict([("relu4", nn.ReLU()), ("pool4", nn.AvgPool2d(2)), ("conv", nn.Conv2d(3, 3, 1)),
                                       ("relu5", nn.ReLU(inplace=True)), ("pool5", nn.MaxPool2d(3, 2, 1))]))
    moved = with_pools_before_relus(steps)
    assert [name for name, _ in moved.named_children()] == ["relu4", "pool4", "conv", "pool5", "relu5"]
    assert [name for name, _ in steps.named_children()] == ["relu4", "pool4", "conv", "relu5", "pool5"]
    torch.manual_seed(2)
    x = torch.randn(3, 3, 12, 12)
    assert torch.equal(moved(x.clone()), steps(x.clone()))
