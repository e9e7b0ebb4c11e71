"""compute.lib.pooling: the sliced max pool equals torch's kernel, and is swapped in only where it applies."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compute.lib.pooling import SlicedMaxPool2d, sliced_max_pool2d, with_sliced_pools
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
