"""Certificates: proofs, from operator norms, that an ablation leaves a row's prediction alone.

The engine (``compute.lib.engine``) asks a ``Certificate`` how far the first activation after an ablation's entry may
move with the prediction kept (``radius``); a row that moved less keeps the baseline's prediction and the rest of the
tail does not run for it. The bounds here are certified upper bounds (exact eigenvalues and Fourier transforms in
float64, enlarged for their own rounding), never estimates: power iteration approaches a norm from below.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

_ELEMENTWISE = (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.BatchNorm1d, nn.BatchNorm2d)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)
# Steps right after the entry that a certificate applies exactly to both the baseline and the ablated row (its
# ``lead``): cheap, per channel (in eval mode), so the change it measures is that of their output. After a max pool
# that is often far smaller than before it (it passes one change per window, none that stays below the window's max,
# and an overlapping pool's factor, sqrt 4 for AlexNet's, leaves the bound): demo conv4 certified 25% -> 34%.
LEAD = _ELEMENTWISE + _POOLS
# Relative allowance on a computed operator norm for its own rounding: a float64 eigenvalue or singular value of an
# n x n product is within about n^2 * 2^-53 of the exact one relative to the largest (backward stability), under 3e-8
# for n <= 16384.
NORM_SAFETY = 1e-6
# Relative allowance on the float32 norm of a row's change for its rounding (n 2^-24 for a sum of n squares, 6e-4 at
# n = 9216 in the worst case, far less in practice; the near-tie band takes the rest, as for every float32 margin).
CHANGE_SAFETY = 1e-3


def plain_conv(module: nn.Module | None) -> bool:
    """A convolution that is linear in each input channel separately (ungrouped, zero padding)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


class Certificate:
    """A proof that an ablation leaves a row's prediction alone, for a rest of the tail ``lead -> middle -> head``.

    ``lead`` is the per-channel steps right after the entry (elementwise ones and pools, ``LEAD``), applied exactly
    to the baseline and the ablated row; the ``middle`` steps have certified Lipschitz bounds in the Euclidean norm
    (their product ``lipschitz``); ``head`` is the last Linear, z = W h + b. If the first activation (``lead``'s
    output) moves by d, h moves by at most ``lipschitz * ||d||``, so the difference z_top - z_j moves by at most
    ||w_top - w_j|| * lipschitz * ||d|| and each logit by at most ||w_k|| * lipschitz * ||d|| (Cauchy-Schwarz).

    A row is certified when, for every class j, its baseline margin less that bound stays above the near-tie band
    of ``compute.lib.ties`` (``margin_tol`` times the largest absolute logit the ablated row can reach, at least 1). The
    ablated row's exact top-two margin then exceeds the band, where the engine and the reference decide by value:
    the prediction is the baseline's. The float32 rounding of the margins and of d is what the band is there for,
    as everywhere in the engine (float64 only decides inside it); rows near the bound simply run the tail.

    Tighter bounds, measured on the trained demo's conv3 units (48 SynthScenes images, 4,424 changed rows; the lead is
    relu4, and conv5 is 7.1M of a computed row's 7.8M MACs, so only a check before conv5 saves): this product (9.4) is
    a median 170 times the largest margin change per unit of ||d|| seen on the rows; 12% of rows are certified, 65%
    would be at 20 times tighter, 81% at 50 times, and 98% keep their prediction. A radius per image cannot get
    there: the margins' gradient norm at the first activation times ||d||, with no allowance for ReLUs or max-pool
    windows that switch (so not even a bound), certifies 72%; sound, composing fc7/fc8 or fc6-fc8 per image with the
    baseline's stable ReLUs plus the unstable units' worst case, 10-11%. Per row, the gradient's exact product with d
    plus the switching units' worst case given the change's norm at each layer, 16%: the remainder is led by relu7
    and the max pool (half and a third of this bound), because the change's norm after conv5 is known only through
    conv5's operator norm (2.9, against 1.0 seen). The per-image gradients would also cost 23 backward passes
    through conv5, as much as 21 computed rows. None is used.
    """

    def __init__(self, lead: nn.Sequential, after: nn.Sequential, lipschitz: float, head: nn.Linear):
        self.lead, self.after, self.lipschitz = lead, after, lipschitz
        weight = head.weight.detach().double()
        self.distances = torch.cdist(weight, weight) * (1 + NORM_SAFETY)  # ||w_i - w_j||, [K, K]
        self.largest_row = float(weight.norm(dim=1).max()) * (1 + NORM_SAFETY)

    @classmethod
    def of(cls, rest: nn.Sequential, example: torch.Tensor, lead: bool = True) -> Certificate | None:
        """The certificate of ``rest`` for inputs shaped like ``example`` (one row), or None: ``rest`` does not end in
        a Linear, or a step in between has no bound. ``lead=False``: no lead, every step but the head is in the
        Lipschitz product, for a caller that knows the change of ``rest``'s input (not of an activation after it)."""
        steps = list(rest.children())
        if not steps or not isinstance(steps[-1], nn.Linear):
            return None
        count = 0
        while lead and count < len(steps) - 1 and isinstance(steps[count], LEAD):
            count += 1
        lead = nn.Sequential(*steps[:count])
        lipschitz = lipschitz_bound(nn.Sequential(*steps[count:-1]), lead(example.clone()))
        if lipschitz is None:
            return None
        return cls(lead, nn.Sequential(*steps[count:]), lipschitz, steps[-1])

    def radius(self, logits: torch.Tensor, base_pred: torch.Tensor, margin_tol: float) -> torch.Tensor:
        """Per image [B], how far (Euclidean) the first activation may move with the prediction provably kept.

        With t = lipschitz * ||d||, margins m_j, distances a_j = ||w_top - w_j||, largest absolute logit S and largest
        row norm w, the row is certified when m_j - a_j t > margin_tol * max(S + w t, 1) for every j != top, that is
        t < (m_j - margin_tol S) / (a_j + margin_tol w) and t < (m_j - margin_tol) / a_j. An image whose baseline was
        not decided by value (``base_pred`` differs from these logits' argmax) gets no radius.
        """
        logits = logits.double()
        top = logits.argmax(1, keepdim=True)
        margin = logits.gather(1, top) - logits  # [B, K]
        spread = self.distances.to(logits.device)[top.squeeze(1)]  # [B, K]
        scale = torch.maximum(logits.gather(1, top), -logits.amin(1, keepdim=True))
        relative = (margin - margin_tol * scale) / (spread + margin_tol * self.largest_row)
        absolute = (margin - margin_tol) / spread  # +inf where the difference of two classes cannot move
        reach = torch.minimum(relative, absolute).nan_to_num(nan=-math.inf).scatter(1, top, math.inf)
        radius = reach.amin(1) / self.lipschitz
        return torch.where(top.squeeze(1) == base_pred, radius, -math.inf)

    def behind(self, steps: nn.Sequential, example: torch.Tensor) -> Certificate | None:
        """This certificate (without a lead) for ``steps`` followed by its own steps, on inputs shaped like
        ``example``: the change of ``steps``' input times their Lipschitz bound bounds that of their output. None where
        ``steps`` have no bound."""
        bound = lipschitz_bound(steps, example.clone())
        if bound is None or len(self.lead):
            return None
        certificate = copy.copy(self)
        certificate.after = nn.Sequential(*steps, *self.after)
        certificate.lipschitz = self.lipschitz * bound
        return certificate

    def settled(self, change: torch.Tensor, logits: torch.Tensor, base_pred: torch.Tensor,
                margin_tol: float) -> torch.Tensor:
        """Rows [S, B] certified from ``change`` [S, B], a bound on how far each row's first activation moves (float64,
        its own rounding allowed for by ``CHANGE_SAFETY``), and the baseline's ``logits`` [B, K]."""
        radius = self.radius(logits, base_pred, margin_tol)
        return change * (1 + CHANGE_SAFETY) < radius.to(change.device)[None, :]

    def rows(self, first: torch.Tensor, radius: torch.Tensor):
        """``certified(rows, state) -> (certified, size, change)`` for the engine's rows, from the baseline's first
        activation ``first`` [B, ...] (``lead``'s output) and each image's ``radius`` [B]: rows whose first activation
        ``state`` moved less than their image's radius, how far each moved (||state - first||, float64), and the
        change itself (``state - first``, float32: a reduced step starts from it). None when no image has a radius
        (no row could be certified: the checks would only cost)."""
        if not bool((radius > 0).any()):
            return None

        def certified(rows: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            change = first[rows[:, 1]]  # in first's memory format, as the state's
            torch.sub(state, change, out=change)
            size = torch.linalg.vector_norm(change, dim=tuple(range(1, change.dim()))).double()
            return size * (1 + CHANGE_SAFETY) < radius[rows[:, 1]], size, change

        return certified


def lipschitz_bound(step: nn.Module, example: torch.Tensor) -> float | None:
    """A certified upper bound on the Euclidean Lipschitz constant of ``step`` (eval mode) on inputs shaped like
    ``example``; None for a step this does not know."""
    if isinstance(step, nn.Sequential):
        bound = 1.0
        for inner in step.children():
            inner_bound = lipschitz_bound(inner, example)
            if inner_bound is None:
                return None
            bound *= inner_bound
            example = inner(example)
        return bound
    if isinstance(step, (nn.ReLU, nn.Dropout, nn.Dropout2d, nn.Identity, nn.Flatten)):
        return 1.0
    if isinstance(step, (nn.BatchNorm1d, nn.BatchNorm2d)) and step.running_var is not None:
        return float(_batchnorm_scale(step).abs().max())
    if isinstance(step, nn.Linear):
        return spectral_norm(step.weight)
    if plain_conv(step):
        return conv_norm(step, example.shape[-2:])
    if isinstance(step, _POOLS) and getattr(step, "divisor_override", None) is None:
        return math.sqrt(windows_per_input(step, example.shape[-2:], step(example).shape[-2:]))
    return None


def _batchnorm_scale(norm: nn.Module) -> torch.Tensor:
    scale = (norm.running_var.double() + norm.eps).rsqrt()
    return scale * norm.weight.detach().double() if norm.affine else scale


def spectral_norm(matrix: torch.Tensor) -> float:
    """The largest singular value of ``matrix`` (flattened to 2-D), as a certified upper bound: the square root of the
    largest eigenvalue of its smaller Gram matrix, in float64, enlarged by ``NORM_SAFETY`` for that rounding.

    A direct eigensolver, not power iteration: power iteration approaches the norm from below, and a few seconds once
    (AlexNet's fc6, 9216 x 4096) buy a bound that holds without a convergence argument."""
    m = matrix.detach().double().flatten(1)
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    return math.sqrt(max(float(torch.linalg.eigvalsh(gram)[-1]), 0.0)) * (1 + NORM_SAFETY)


def conv_norm(conv: nn.Conv2d, size) -> float:
    """A certified upper bound on the operator norm of a zero-padded convolution on inputs of spatial ``size``.

    Placed on a torus at least as wide as the padded input, the stride-1 convolution never wraps around, so it is the
    circular convolution on that torus restricted to an embedded input and to some outputs (and a stride only drops
    outputs): its norm is at most the circular one, which is the largest singular value, over the torus'
    frequencies, of the kernel's Fourier transform, an [out, in] matrix per frequency (Sedghi et al., 2019). A real
    kernel's transform at -f is the conjugate of that at f, so half the frequencies (``rfft2``) cover them all.
    """
    spectrum = _spectrum(conv, conv.weight.detach().double(), size)
    return float(torch.linalg.matrix_norm(spectrum, ord=2).max()) * (1 + NORM_SAFETY)


def channel_norms(entry: nn.Module, weight: torch.Tensor, size=None) -> torch.Tensor:
    """Certified operator norms [N] of a Linear or convolution ``entry`` restricted to each of N input channels, from
    its weight by channel (``weight[c]``: [positions, F] for a Linear, [out, kh, kw] for a convolution on inputs of
    spatial ``size``): float64 eigenvalues of each block's smaller Gram matrix, or, for a convolution, the largest
    over the torus' frequencies of the norm of the channel's [out]-vector transform (as ``conv_norm``)."""
    weight = weight.detach().double()
    if isinstance(entry, nn.Linear):
        wide = weight.shape[1] <= weight.shape[2]
        gram = weight @ weight.transpose(1, 2) if wide else weight.transpose(1, 2) @ weight
        norms = torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).sqrt()
    else:
        spectrum = _spectrum(entry, weight.unsqueeze(2), size)  # [f1, f2, N, out, 1]
        norms = spectrum.abs().pow(2).sum((-2, -1)).sqrt().flatten(0, 1).amax(0)
    return norms * (1 + NORM_SAFETY)


def _spectrum(conv: nn.Module, weight: torch.Tensor, size) -> torch.Tensor:
    """The kernel ``weight`` [..., out, in, kh, kw] of ``conv``'s geometry transformed on the torus that holds an
    input of spatial ``size`` padded: [f1, f2, ..., out, in]."""
    spans = [d * (k - 1) + 1 for d, k in zip(conv.dilation, weight.shape[-2:])]
    pads = spans if isinstance(conv.padding, str) else [2 * p for p in conv.padding]
    grid = [max(n + p, span) for n, p, span in zip(size, pads, spans)]
    taps = weight.new_zeros(*weight.shape[:-2], *grid)
    taps[..., :spans[0]:conv.dilation[0], :spans[1]:conv.dilation[1]] = weight
    spectrum = torch.fft.rfft2(taps)
    return spectrum.permute(-2, -1, *range(spectrum.dim() - 2))


def windows_per_input(pool: nn.Module, size_in, size_out) -> int:
    """The most windows of ``pool`` that one input element lies in. A pool's Euclidean Lipschitz bound is its square
    root: the max, or the mean, of a window moves by at most the largest change in it, and each change is counted
    in that many windows."""
    most = 1
    for dim, (n_in, n_out) in enumerate(zip(size_in, size_out)):
        counts = [0] * n_in
        for i in range(n_out):
            for position in _window(pool, dim, i, n_in, n_out):
                if 0 <= position < n_in:
                    counts[position] += 1
        most *= max(counts)
    return most


def _window(pool: nn.Module, dim: int, i: int, n_in: int, n_out: int) -> range:
    """Input positions (along ``dim``, padding included) of output ``i``'s window."""
    if isinstance(pool, (nn.AdaptiveMaxPool2d, nn.AdaptiveAvgPool2d)):
        return range(i * n_in // n_out, -(-(i + 1) * n_in // n_out))
    kernel, stride, padding, dilation = (_pair(getattr(pool, name, 1))[dim]
                                         for name in ("kernel_size", "stride", "padding", "dilation"))
    start = i * stride - padding
    return range(start, start + dilation * (kernel - 1) + 1, dilation)
