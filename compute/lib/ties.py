"""Deciding a prediction the same way on every CPU: near-ties in float64, exact ties to the lowest class index.

A BLAS kernel may sum two output columns of one product in different orders (a full micro-tile against a remainder
tile), so two logits that are equal in exact arithmetic can differ in the last bit -- in float64 as in float32 -- and
which one comes out larger depends on the CPU, the batch and the chunk. ``torch.argmax`` on such logits is not a
property of the network. The rule here is:

1. From float32 logits, a row is *near a tie* when its top two logits are within ``margin_tol`` times its largest
   absolute logit (at least 1). Every other row's argmax is unique by a wide margin: it is the prediction.
2. A row near a tie is recomputed in float64. For the last linear step z = W h + b, each computed logit is within
   e_k = gamma_n * (|W_k| . |h| + |b_k|) of the exact one given h (Higham's bound for a dot product of length n,
   gamma_n = n u / (1 - n u), u = 2^-53). Two logits whose computed gap is at most e_i + e_j cannot be told apart by
   this product: they are tied, and the tie goes to the lowest class index among the classes tied with the top one.

So two classes whose last-layer rows are equal (equal in exact arithmetic for every input) are always tied, whatever
the kernel, and a gap larger than twice the bounds is always decided by value. Only a gap within a rounding bound of
the band's edge could be decided differently on two machines; for a float64 product that is a gap of about 1e-13 of
the logits' scale.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

UNIT_ROUNDOFF = 2.0 ** -53  # float64


def gamma(n: int) -> float:
    """Higham's gamma_n: the relative error bound of a length-n dot product in float64."""
    return n * UNIT_ROUNDOFF / (1 - n * UNIT_ROUNDOFF)


def near_tie(logits: torch.Tensor, margin_tol: float) -> torch.Tensor:
    """Rows [B] whose top two float32 logits are too close for float32 to order them reliably."""
    top = logits.topk(2, dim=1).values
    largest = torch.maximum(top[:, 0], -logits.amin(1))
    return (top[:, 0] - top[:, 1]) < margin_tol * largest.clamp_min(1.0)


def product_bound(linear: nn.Linear, inputs: torch.Tensor, terms: int = 0) -> torch.Tensor:
    """Bound [R, K] on the rounding error of ``linear(inputs)`` in float64, from the operands; ``terms`` counts
    further additions folded into the same result (an update subtracted from it)."""
    weight = linear.weight.detach().double().abs()
    scale = inputs.double().abs() @ weight.T
    if linear.bias is not None:
        scale = scale + linear.bias.detach().double().abs()
    return gamma(linear.in_features + 1 + terms) * scale


def lowest_of_tied(logits: torch.Tensor, bound: torch.Tensor) -> torch.Tensor:
    """Per row, the lowest class index among those within rounding of the top logit (``bound`` per logit)."""
    top = logits.argmax(1, keepdim=True)
    gap = logits.gather(1, top) - logits
    tied = gap <= bound.gather(1, top) + bound
    classes = torch.arange(logits.shape[1], device=logits.device).expand_as(logits)
    return torch.where(tied, classes, logits.shape[1]).amin(1)


def last_linear(module: nn.Module) -> nn.Linear | None:
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def logits_and_bound(module: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Float64 logits of ``module`` (already float64) and the rounding bound of each, when its output is its last
    Linear's output (a classifier head); otherwise a zero bound, so only exact equality ties."""
    head = last_linear(module)
    seen: dict = {}
    handle = head.register_forward_hook(lambda m, args, out: seen.update(h=args[0], out=out)) if head else None
    try:
        logits = module(inputs)
    finally:
        if handle is not None:
            handle.remove()
    if seen.get("out") is logits:
        return logits, product_bound(head, seen["h"])
    return logits, torch.zeros_like(logits)


@torch.no_grad()
def predict(module: nn.Module, inputs: torch.Tensor, margin_tol: float = 1e-3) -> torch.Tensor:
    """The prediction of ``module`` for each input under this module's rule, computed plainly: the whole module in
    float32, near-ties rerun whole in float64. The reference the engine's shortcuts are tested against."""
    logits = module(inputs)
    pred = logits.argmax(1)
    close = near_tie(logits, margin_tol)
    if close.any():
        settled, bound = logits_and_bound(copy.deepcopy(module).double(), inputs[close].double())
        pred[close] = lowest_of_tied(settled, bound)
    return pred
