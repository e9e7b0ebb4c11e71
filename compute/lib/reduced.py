"""Reduced precision with a proof: one linear step of a row run in bfloat16 where its error cannot change the answer.

A row the certificates could not settle runs the rest of the tail. Its first linear step after the row's state (demo
conv3 rows: conv5, 7.1 of the 7.8 M multiply-adds left) is linear in the row's change from the baseline, so
``step(state) = step(first) + W (state - first)``: ``step(first)`` is computed once per image in float32 and the
product with the change ``d`` in bfloat16, which a CPU with AVX-512 BF16 runs 2.2-2.7 times as fast (BENCHMARKS.md).
The rest of the tail runs in float32 on the sum. The bfloat16 product's error is bounded for every row, in the
Euclidean norm of the step's output (u = 2^-9, bfloat16's unit roundoff, round to nearest even):

    ||e|| <= (||W~ - W||_op (1 + u) + ||W||_op (u + 2^-23) + gamma_n ||W~||_F sqrt(P) (1 + u)
              + u (||W||_op + ||W~ - W||_op + gamma_n ||W~||_F sqrt(P)) (1 + u)) ||d|| + 1e-30

- ``W~ - W``: the weight's own rounding to bfloat16, known exactly; its certified operator norm (``certificates``).
- ``||W||_op (u + 2^-23)``: the change's rounding to bfloat16, and its float32 subtraction from the baseline.
- ``gamma_n ||W~||_F sqrt(P)``: float32 accumulation of the exact bfloat16 products (8-bit significands multiply
  exactly in float32), a length-n dot product per output, any summation order (Higham); P is the most outputs one
  input feeds (kh kw for a convolution, 1 for a Linear), so by Cauchy-Schwarz the per-output bounds sum to this.
- the last term: the product's output is rounded to bfloat16 once, by at most u times its norm, which the
  first three terms bound.
- ``1e-30``: denormals, which the BF16 instructions flush to zero (each below 2^-126).

A ``Certificate`` of the steps after the linear one (``lead=False``: the bound is on their input) then turns ||e||
into a radius: where ||e|| is inside it, the exact row's top class wins by more than the engine's near-tie band, so
the prediction is the argmax of these logits, as the float32 computation gives it. Measured on the trained demo (480
images, every unit): 96.5% of computed conv3 rows, 99.0% of conv4's, 99.6% of conv5's are decided so; the others run
the float32 tail as before. The float32 roundings of ``step(first)`` and of the final sum are those of every
incremental update in the engine (the near-tie band is there for them).

Only on the CPU, where the kernels (oneDNN, AVX-512 BF16) accumulate bfloat16 products in float32 and round the
output once, as the bound assumes; on a GPU, cuBLAS may reduce in bfloat16 (PyTorch's
``allow_bf16_reduced_precision_reduction``), so the float32 tail runs there. Where bfloat16 is not faster than
float32 on this CPU (no native BF16: it is emulated), a timing on the first use turns it off: the predictions are
the same either way, only the time differs.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from compute.lib.sequence import run_in_place
from compute.lib.certificates import CHANGE_SAFETY, NORM_SAFETY, Certificate, conv_norm, plain_conv, spectral_norm

BF16_ROUNDOFF = 2.0 ** -9
FP32_ROUNDOFF = 2.0 ** -24
_DENORMALS = 1e-30
# bfloat16 must beat float32 by this much on the first timing to be used: it adds the change's subtraction, its
# conversion and the bound's norms, which a bare product does not show.
_FASTER = 1.3
# ... and the step must cost at least this many multiply-adds per row: below it those passes over the row's memory
# cost what the product saves (demo: conv4 rows' fc6, 0.5 M, and conv5 rows' fc7, 65 k, were no faster; conv3 rows'
# conv5, 7.1 M, was).
_LEAST_WORK = 1 << 21
_TIMED: dict = {}  # (step's kind, weight shape, input shape) -> whether bfloat16 was faster, once per process


class ReducedStep:
    """``flatten -> step -> post``: a leading Flatten (or none), one Linear or convolution ``step``, the ``post``
    steps (ending in a Linear), with the coefficient of ||d|| in the error bound above and a certificate of ``post``."""

    def __init__(self, flatten: bool, step: nn.Module, post: nn.Sequential, certificate: Certificate,
                 coefficient: float):
        self.flatten, self.step, self.post = flatten, step, post
        self.certificate, self.coefficient = certificate, coefficient
        self.weight = step.weight.detach().to(torch.bfloat16)
        if self.weight.dim() == 4:  # oneDNN's fast bfloat16 kernels read channels-last operands as they are
            self.weight = self.weight.contiguous(memory_format=torch.channels_last)

    @classmethod
    def of(cls, after: nn.Sequential, example: torch.Tensor) -> ReducedStep | None:
        """The reduced step of ``after`` on states shaped like ``example`` (one row), or None: ``after`` does not
        start with a Linear or a plain convolution (past Flatten, Dropout, Identity), nothing follows it, or what
        follows has no certificate."""
        steps = list(after.children())
        flatten = False
        while steps and isinstance(steps[0], (nn.Flatten, nn.Dropout, nn.Identity)):
            flatten |= isinstance(steps[0], nn.Flatten)
            if isinstance(steps[0], nn.Flatten) and (steps[0].start_dim, steps[0].end_dim) != (1, -1):
                return None
            steps.pop(0)
        if len(steps) < 2 or not (isinstance(steps[0], nn.Linear) or plain_conv(steps[0])):
            return None
        step, post = steps[0], nn.Sequential(*steps[1:])
        state = example.flatten(1) if flatten else example
        certificate = Certificate.of(post, step(state), lead=False)
        if certificate is None:
            return None
        return cls(flatten, step, post, certificate, _coefficient(step, state))

    def bind(self, first: torch.Tensor, margin_tol: float):
        """``decide(images, state, sizes=None, change=None) -> (pred, proven)`` for rows of these images (indices
        into ``first``, the baseline's state per image [B, ...]): the prediction of each row and whether the bound
        proves it. ``sizes`` [R]: the rows' ||state - first|| where a certificate's check has computed them; with
        ``change``, that check's ``state - first`` already rounded to bfloat16 (``state`` is then not read)."""
        first = first.flatten(1) if self.flatten else first
        base = self.step(first)

        def decide(images: torch.Tensor, state: torch.Tensor | None, sizes: torch.Tensor | None = None,
                   change: torch.Tensor | None = None):
            if change is None:  # the float32 difference, rounded once to bfloat16, as a check's change is
                change = (state.flatten(1) if self.flatten else state) - first[images]  # first's layout, as the state's
                if sizes is None:
                    sizes = change.flatten(1).norm(dim=1).double()
                change = change.to(torch.bfloat16)
            else:
                change = change.flatten(1) if self.flatten else change
            product = self._product(change)
            logits = run_in_place(self.post, base[images].add_(product))
            pred = logits.argmax(1)
            radius = self.certificate.radius(logits, pred, margin_tol)
            return pred, (self.coefficient * sizes + _DENORMALS) * (1 + CHANGE_SAFETY) < radius

        return decide

    def faster(self, example: torch.Tensor) -> bool:
        """Whether the bfloat16 product beats the float32 step on rows like ``example`` on this machine, timed once
        per process and shape (best of three on 512 rows), for a step with enough work per row (``_LEAST_WORK``)."""
        state = example.flatten(1) if self.flatten else example
        key = (type(self.step).__name__, tuple(self.weight.shape), tuple(state.shape[1:]))
        if key not in _TIMED and self.step(state[:1]).numel() * self.weight[0].numel() < _LEAST_WORK:
            _TIMED[key] = False
        if key not in _TIMED:
            rows = state[:1].expand(512, *state.shape[1:]).contiguous()
            reduced = rows.to(torch.bfloat16)
            full, half = _best_time(lambda: self.step(rows)), _best_time(lambda: self._product(reduced))
            _TIMED[key] = full > _FASTER * half
        return _TIMED[key]

    def _product(self, change: torch.Tensor) -> torch.Tensor:
        if isinstance(self.step, nn.Linear):
            return F.linear(change, self.weight)
        step = self.step
        return F.conv2d(change, self.weight, None, step.stride, step.padding, step.dilation)


def _coefficient(step: nn.Module, state: torch.Tensor) -> float:
    """The coefficient of ||d|| in the module's error bound, from certified operator norms in float64."""
    weight = step.weight.detach().double()
    rounded = step.weight.detach().to(torch.bfloat16).double()
    if isinstance(step, nn.Linear):
        norm, rounding = spectral_norm(weight), spectral_norm(rounded - weight)
        length, fan = weight.shape[1], 1
    else:
        difference = nn.Conv2d(weight.shape[1], weight.shape[0], tuple(weight.shape[2:]), step.stride, step.padding,
                               step.dilation, bias=False).double()
        difference.weight.data = rounded - weight
        norm, rounding = conv_norm(step, state.shape[-2:]), conv_norm(difference, state.shape[-2:])
        length, fan = weight[0].numel(), weight.shape[2] * weight.shape[3]
    gamma = length * FP32_ROUNDOFF / (1 - length * FP32_ROUNDOFF)
    accumulation = gamma * float(rounded.norm()) * math.sqrt(fan) * (1 + NORM_SAFETY)
    product = (norm + rounding + accumulation) * (1 + BF16_ROUNDOFF)  # ||y^|| per unit of ||d||
    return (rounding * (1 + BF16_ROUNDOFF) + norm * (BF16_ROUNDOFF + 2 * FP32_ROUNDOFF)
            + accumulation * (1 + BF16_ROUNDOFF) + BF16_ROUNDOFF * product)

def _best_time(work) -> float:
    best = math.inf
    for _ in range(3):
        start = time.perf_counter()
        work()
        best = min(best, time.perf_counter() - start)
    return best
