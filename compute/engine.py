"""The ablation engine: predictions of the network's tail with sets of units (or directions) removed.

One engine serves single-unit sweeps, greedy ablation, random-direction ablation and hand-picked unit sets. Given a
batch of the layer's activations ``A`` [B, C, H, W] and S ablations, it returns the predicted class and the
probability of the true class for every (ablation, image) pair, equal to running the tail on the edited activation.

Exact shortcuts, each leaving every prediction as the full computation gives it:

* Unchanged rows. If every ablated unit is zero on an image (ReLU outputs often are), the edited activation *is* the
  original, so the prediction is the baseline's. Only the other rows are computed.
* Pool-then-linear tails. When the tail starts with per-channel steps (max/avg pooling, ReLU, dropout in eval mode),
  a flatten and a linear layer (AlexNet conv5 -> pool -> fc6; ResNet18 layer4 -> avgpool -> fc), zeroing channel u
  commutes with the per-channel steps, so the linear layer's output changes by ``-W[:, cols(u)] @ P[cols(u)]``: a
  low-rank update instead of a full product. The steps after that linear layer still run in full.
* Linear pooling also commutes with a rotation, so random directions get the same update in the rotated basis.

Floating point: the update is summed in a different order than the full product, so logits may differ in the last
bits, and so do two full float32 runs that batch images differently (BLAS blocking depends on the batch). Where the
top two logits are that close, "the" float32 prediction is not defined; such rows (margin below ``margin_tol`` times
the largest logit) are recomputed in float64 through the whole tail on the edited activation, which settles them
independently of batching. Every other row equals the full float32 computation. Exact ties go to the lowest class
index, as ``torch.argmax`` breaks them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from compute.sequence import step_names

_CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU, nn.Identity,
                nn.Dropout, nn.Dropout2d)
_LINEAR_POOL = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class Outcome:
    """Predicted class and probability of the true class, per (ablation, image)."""

    pred: torch.Tensor  # [S, B] int64
    true_prob: torch.Tensor  # [S, B] float32


class AblationEngine:
    """Tail of a network after one layer, evaluated under unit or direction ablations.

    ``max_memory`` bounds the bytes of the intermediate tensors one chunk of rows may use; rows are streamed in chunks
    of that size, so any number of ablations fits.
    """

    def __init__(self, tail: nn.Sequential, max_memory: int = 1 << 30, margin_tol: float = 1e-3,
                 use_shortcuts: bool = True):
        self.tail = tail.eval()
        self.max_memory = int(max_memory)
        self.margin_tol = float(margin_tol)
        self.device = next((p.device for p in tail.parameters()), torch.device("cpu"))
        self._tail64 = None
        self._split_shortcut(use_shortcuts)

    # -- structure ---------------------------------------------------------------------------------------------
    def _split_shortcut(self, enabled: bool) -> None:
        """Find ``pool steps -> Flatten -> [Dropout] -> Linear -> rest`` at the start of the tail."""
        self.pool = self.linear = self.rest = None
        self.pool_is_linear = False
        if not enabled:
            return
        modules = list(self.tail.children())
        position = 0
        while position < len(modules) and isinstance(modules[position], _CHANNELWISE):
            position += 1
        if position >= len(modules) or not isinstance(modules[position], nn.Flatten):
            return
        flatten = position
        position += 1
        while position < len(modules) and isinstance(modules[position], (nn.Dropout, nn.Identity)):
            position += 1
        if position >= len(modules) or not isinstance(modules[position], nn.Linear):
            return
        self.pool = nn.Sequential(*modules[:flatten])
        self.pool_is_linear = all(isinstance(m, _LINEAR_POOL) for m in modules[:flatten])
        self.linear = modules[position]
        self.rest = nn.Sequential(*modules[position + 1:])

    @property
    def has_shortcut(self) -> bool:
        return self.linear is not None

    # -- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def baseline(self, acts: torch.Tensor, labels: torch.Tensor) -> Outcome:
        acts = acts.to(self.device)
        logits = self._settle_near_ties(self.tail(acts), lambda close: acts[close])
        return _outcome(logits, labels.to(self.device))

    @torch.no_grad()
    def evaluate_units(self, acts: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                       base: Outcome | None = None) -> Outcome:
        """Predictions with the units where ``masks[s]`` is True set to zero, for each of the S masks [S, C]."""
        acts = acts.to(self.device)
        labels = labels.to(self.device)
        masks = masks.to(self.device, dtype=torch.bool)
        base = base or self.baseline(acts, labels)
        # A row changes only if some ablated unit is nonzero somewhere on that image.
        active = acts.flatten(2).ne(0).any(-1)  # [B, C]
        changed = (masks.float() @ active.float().T) > 0  # [S, B]
        pred = base.pred.unsqueeze(0).repeat(masks.shape[0], 1)
        prob = base.true_prob.unsqueeze(0).repeat(masks.shape[0], 1)
        rows = changed.nonzero(as_tuple=False)  # [R, 2] of (s, b)
        if len(rows):
            edit = self._edit_units(acts, masks)
            fast = self._shortcut_units(acts, masks) if self.has_shortcut else self._full(edit, acts)
            self._fill(rows, labels, fast, edit, pred, prob)
        return Outcome(pred, prob)

    @torch.no_grad()
    def evaluate_directions(self, acts: torch.Tensor, labels: torch.Tensor, rotation: torch.Tensor,
                            directions: torch.Tensor, base: Outcome | None = None) -> Outcome:
        """Predictions with direction ``rotation[:, j]`` projected out of every position, for each j in directions.

        ``rotation`` is an orthogonal [C, C] matrix; removing coordinate j in the rotated basis z = Q^T a and rotating
        back gives a' = a - q_j (q_j^T a).
        """
        acts = acts.to(self.device)
        labels = labels.to(self.device)
        q = rotation.to(self.device, acts.dtype)[:, directions.to(self.device)]  # [C, S]
        base = base or self.baseline(acts, labels)
        coeff = torch.einsum("bchw,cs->bshw", acts, q)  # q_j^T a at every position
        changed = coeff.flatten(2).ne(0).any(-1).T  # [S, B]
        pred = base.pred.unsqueeze(0).repeat(q.shape[1], 1)
        prob = base.true_prob.unsqueeze(0).repeat(q.shape[1], 1)
        rows = changed.nonzero(as_tuple=False)
        if len(rows):
            edit = self._edit_directions(acts, q, coeff)
            shortcut = self.has_shortcut and self.pool_is_linear
            fast = self._shortcut_directions(acts, q) if shortcut else self._full(edit, acts)
            self._fill(rows, labels, fast, edit, pred, prob)
        return Outcome(pred, prob)

    # -- row evaluators: each maps a chunk of (s, b) rows to logits --------------------------------------------
    def _edit_units(self, acts, masks):
        def edit(rows):
            return acts[rows[:, 1]] * (~masks[rows[:, 0]]).to(acts.dtype)[:, :, None, None]
        return edit

    def _full(self, edit, acts):
        def logits(rows):
            return self.tail(edit(rows))
        logits.row_bytes = acts[0].numel() * acts.element_size() * 6
        return logits

    def _shortcut_units(self, acts, masks):
        pooled = self.pool(acts)  # [B, C, h, w]
        batch, channels = pooled.shape[:2]
        flat = pooled.reshape(batch, channels, -1)  # [B, C, p]
        weight = self.linear.weight.reshape(self.linear.out_features, channels, -1)  # [F, C, p]
        base_pre = self.linear(pooled.flatten(1))  # [B, F]
        single = bool((masks.sum(1) == 1).all())
        if single:
            unit_of = masks.float().argmax(1)

        def logits(rows):
            s, b = rows[:, 0], rows[:, 1]
            if single:
                u = unit_of[s]
                delta = torch.einsum("rp,rfp->rf", flat[b, u], weight.permute(1, 0, 2)[u])
            else:
                removed = flat[b] * masks[s].to(flat.dtype)[:, :, None]  # [R, C, p]
                delta = torch.einsum("rcp,fcp->rf", removed, weight)
            return self.rest(base_pre[b] - delta)

        feature_bytes = self.linear.out_features * pooled.element_size()
        logits.row_bytes = feature_bytes * (4 + flat.shape[-1]) + flat[0].numel() * flat.element_size() * 2
        return logits

    def _edit_directions(self, acts, q, coeff):
        def edit(rows):
            s, b = rows[:, 0], rows[:, 1]
            return acts[b] - torch.einsum("cr,rhw->rchw", q[:, s], coeff[b, s])
        return edit

    def _shortcut_directions(self, acts, q):
        pooled = self.pool(acts)
        batch, channels = pooled.shape[:2]
        flat = pooled.reshape(batch, channels, -1)
        weight = self.linear.weight.reshape(self.linear.out_features, channels, -1)
        base_pre = self.linear(pooled.flatten(1))
        pooled_coeff = torch.einsum("bcp,cs->bsp", flat, q)  # q_j^T P
        weight_q = torch.einsum("fcp,cs->sfp", weight, q)  # W q_j per position

        def logits(rows):
            s, b = rows[:, 0], rows[:, 1]
            delta = torch.einsum("rp,rfp->rf", pooled_coeff[b, s], weight_q[s])
            return self.rest(base_pre[b] - delta)

        logits.row_bytes = self.linear.out_features * pooled.element_size() * (4 + flat.shape[-1])
        return logits

    def tail64(self) -> nn.Sequential:
        """A float64 copy of the tail, made on first need, for deciding near-ties."""
        if self._tail64 is None:
            import copy

            self._tail64 = copy.deepcopy(self.tail).double()
        return self._tail64

    def _settle_near_ties(self, logits: torch.Tensor, edited) -> torch.Tensor:
        """Recompute in float64 the rows whose top two logits are within float32 rounding of each other."""
        if logits.shape[1] < 2 or not len(logits):
            return logits
        top2 = logits.topk(2, dim=1).values
        scale = logits.abs().amax(1).clamp_min(1.0)
        close = (top2[:, 0] - top2[:, 1]) < self.margin_tol * scale
        if not close.any():
            return logits
        logits = logits.double()
        logits[close] = self.tail64()(edited(close).double())
        return logits

    def _fill(self, rows, labels, fast, edit, pred, prob) -> None:
        """Evaluate rows in memory-bounded chunks; near-ties are recomputed in float64."""
        chunk = max(1, int(self.max_memory // max(1, fast.row_bytes)))
        for start in range(0, len(rows), chunk):
            part = rows[start:start + chunk]
            logits = self._settle_near_ties(fast(part), lambda close: edit(part[close]))
            outcome = _outcome(logits, labels[part[:, 1]])
            pred[part[:, 0], part[:, 1]] = outcome.pred
            prob[part[:, 0], part[:, 1]] = outcome.true_prob


def _outcome(logits: torch.Tensor, labels: torch.Tensor) -> Outcome:
    probs = torch.softmax(logits, dim=1).float()
    return Outcome(logits.argmax(1), probs.gather(1, labels.view(-1, 1)).squeeze(1))


def single_unit_masks(units: int, device=None) -> torch.Tensor:
    return torch.eye(units, dtype=torch.bool, device=device)


def make_engine(sequence: nn.Sequential, step: str, **kwargs) -> AblationEngine:
    from compute.sequence import tail_of

    if step not in step_names(sequence):
        raise KeyError(step)
    return AblationEngine(tail_of(sequence, step), **kwargs)
