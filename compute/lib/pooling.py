"""Max pooling on the CPU as maxima of strided slices: the same numbers as ``nn.MaxPool2d``, several times faster.

torch's CPU max-pool kernel runs far below memory speed on the NCHW shapes of these networks (torch 2.14, 2-core
EPYC: 58 ms for a 2048 x 128 x 8 x 8 batch with a 2 x 2 window, 10 ms as strided slices; AlexNet's 3 x 3 / 2 pool
90 -> 47 ms; ``bench/pooling.py``). Every ablated row of a sweep, greedy step or rotation runs the pools of the
tail, so on the demo the stock kernel took a seventh of the whole pipeline's time.

A maximum does not depend on the order its operands are taken in, so the separable form (rows first, then columns)
gives every output exactly the value of the stock kernel, NaN included (both propagate it). Only the sign of a zero
may differ where +0 and -0 tie, which no later sum, comparison or softmax can see. Padding is -inf, as the stock
kernel's implicit padding. Anything else (indices, ceil mode, dilation, integer tensors, other devices, whose
kernels are fast) runs the stock kernel.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair


def _window_max(x: torch.Tensor, dim: int, kernel: int, stride: int) -> torch.Tensor:
    """Maximum over windows of ``kernel`` taken every ``stride`` along ``dim`` (no padding, floor mode)."""
    count = (x.shape[dim] - kernel) // stride + 1
    span = stride * (count - 1) + 1
    every = (slice(None),) * (dim % x.dim()) + (slice(None, None, stride),)
    out = x.narrow(dim, 0, span)[every]
    for offset in range(1, kernel):
        out = torch.maximum(out, x.narrow(dim, offset, span)[every])
    return out


def sliced_max_pool2d(x: torch.Tensor, kernel_size, stride=None, padding=0) -> torch.Tensor:
    """``F.max_pool2d(x, kernel_size, stride, padding)`` (dilation 1, floor mode) as maxima of strided slices."""
    kh, kw = _pair(kernel_size)
    sh, sw = _pair(stride if stride not in (None, ()) else kernel_size)
    ph, pw = _pair(padding)
    if ph or pw:
        x = F.pad(x, (pw, pw, ph, ph), value=float("-inf"))
    return _window_max(_window_max(x, -2, kh, sh), -1, kw, sw).contiguous()


def _sliceable(pool: nn.MaxPool2d, x: torch.Tensor) -> bool:
    # torch's kernel is fast on channels-last batches (the demo's 2 x 2 pool on 512 x 128 x 8 x 8: 1.3 ms, 23 ms NCHW)
    channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (x.device.type == "cpu" and x.is_floating_point() and x.dim() in (3, 4) and not pool.return_indices
            and not channels_last
            and not pool.ceil_mode and _pair(pool.dilation) == (1, 1))


class SlicedMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` whose CPU forward is ``sliced_max_pool2d`` (same outputs); a drop-in with the same state."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not _sliceable(self, x):
            return super().forward(x)
        return sliced_max_pool2d(x, self.kernel_size, self.stride, self.padding)


def with_sliced_pools(module: nn.Module) -> nn.Module:
    """Swap every ``nn.MaxPool2d`` inside ``module`` (in place) for a ``SlicedMaxPool2d`` of the same settings.

    For inference only: where windows tie, ``torch.maximum`` splits the gradient that the stock kernel gives to one
    input, so a model being trained keeps the stock pools.
    """
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.MaxPool2d:
                sliced = SlicedMaxPool2d(child.kernel_size, child.stride, child.padding, child.dilation,
                                         child.return_indices, child.ceil_mode)
                sliced.train(child.training)
                setattr(parent, name, sliced)
    if type(module) is nn.MaxPool2d:
        raise ValueError("with_sliced_pools swaps pools inside a module; wrap a lone pool in nn.Sequential")
    return module


def with_pools_before_relus(steps: nn.Sequential) -> nn.Sequential:
    """``steps`` with every ReLU that a max pool follows moved after it: the same numbers (a ReLU is monotone, so the
    largest rectified value of a window is the rectified largest value), with the ReLU on the pooled values only
    (a quarter of them after the demo's and AlexNet's pools; the demo's conv3 rows spent 3% of their time there).
    A new ``nn.Sequential`` of the same modules, named as before; ``steps`` is left as it is."""
    named = list(steps.named_children())
    for at in range(len(named) - 1):
        if isinstance(named[at][1], nn.ReLU) and isinstance(named[at + 1][1], nn.MaxPool2d):
            named[at], named[at + 1] = named[at + 1], named[at]
    return nn.Sequential(OrderedDict(named))
