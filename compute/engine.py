"""The ablation engine: predictions of the network's tail with sets of units (or directions) removed.

One engine serves single-unit sweeps, greedy ablation, random-direction ablation and hand-picked unit sets, on CPU and
GPU. Given a batch of the layer's activations ``A`` [B, C, H, W] (the network runs once up to the layer; the caller
streams batches) and S ablations, it returns the predicted class and the probability of the true class for every
(ablation, image) pair -- a *row* -- equal to running the tail on the edited activation.

Where the work is cut, each cut leaving every prediction as the full computation gives it:

* Unchanged rows. If every ablated unit is zero on an image (ReLU outputs often are), the edited activation *is* the
  original, so the prediction is the baseline's. Only the other rows are computed.
* Linear entry. When the tail starts with per-channel steps that keep a zero channel zero (max/avg pooling, ReLU,
  dropout in eval mode) followed by one linear operation ``L`` -- a Linear after a Flatten (AlexNet conv5 -> pool ->
  fc6, ResNet18 layer4 -> avgpool -> fc) or a Conv2d (AlexNet conv3 -> conv4) -- zeroing channels commutes with the
  per-channel steps and ``L(x with channels m zeroed) = L(x) - L_m(x_m)``, ``L_m`` being ``L`` restricted to the input
  channels m, without bias. ``L(x)`` is computed once per image; per row only ``L_m`` runs: 36 columns of fc6 for an
  AlexNet conv5 unit (rank 36), one column of ResNet18's fc (a rank-one update of the logits, nothing else runs), a
  one-input-channel convolution for AlexNet conv3. The steps after ``L`` run in full, all rows of a chunk in one batch.
  ``has_shortcut`` names the Linear case, the paper's low-rank update. For one channel per ablation (single units,
  directions) the updates of all the chunk's ablations are one batched product.
* Directions. Removing direction q_j is zeroing coordinate j in the rotated basis z = Q^T a; where the per-channel
  steps are linear (average pooling, identity) they commute with the rotation, so the same update runs with the
  entry's weight rotated, ``L Q``.
* Chunks. Rows run in chunks sized so that one chunk's tensors stay within ``max_memory`` bytes.

Floating point: the update is summed in a different order than the full product, so logits may differ in the last
bits, and so do two full float32 runs that batch images differently (BLAS blocking depends on the batch). Where the
top two logits are that close, "the" float32 prediction is not defined; such rows (margin below ``margin_tol`` times
the largest absolute logit, at least 1) are recomputed in float64 (through the same update, or the whole tail) and
decided by ``compute.ties``: logits within the float64 rounding bound of the last product (derived from its operands)
are tied, and a tie goes to the lowest class index. What is guaranteed, on every CPU and for any batching or chunking:
every row not near a tie equals the full float32 computation; two classes tied in exact arithmetic (equal rows of the
last layer) are decided for the lower index; a float64 gap beyond twice the bound is decided by value.
``compute.ties.predict`` applies the same rule to a plain run of a whole network, the reference tests compare with.
Reduced precision (bf16, TF32) is not used: a bound on its
error that holds for every input grows with the width of each layer it passes (4096 for fc7) and came out about 140
times the logits' spread on a random AlexNet (BENCHMARKS.md), so every row would need recomputing. A caller on a GPU
must keep TF32 off (``torch.backends.cudnn.allow_tf32 = False``, as ``compute.all`` does) for the same reason.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from compute import ties
from compute.sequence import step_names

_CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU, nn.Identity,
                nn.Dropout, nn.Dropout2d)
_LINEAR_POOL = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)


@dataclass
class Outcome:
    """Predicted class and probability of the true class, per (ablation, image)."""

    pred: torch.Tensor  # [S, B] int64
    true_prob: torch.Tensor  # [S, B] float32


@dataclass
class _Rows:
    """How to compute chunks of rows (sorted by ablation): float32 logits, float64 logits with their rounding bounds
    for settling near-ties (``compute.ties``), and the memory a chunk needs per row and per distinct ablation in it."""

    logits: Callable[[torch.Tensor], torch.Tensor]
    exact: Callable[[torch.Tensor], torch.Tensor]
    row_bytes: int
    ablation_bytes: int = 0


class AblationEngine:
    """Tail of a network after one layer, evaluated under unit or direction ablations.

    ``max_memory`` bounds the bytes of the intermediate tensors one chunk of rows may use; rows are streamed in chunks
    of that size, so any number of ablations fits. ``rows_computed`` counts the rows the last call did not skip.
    Kept between calls: a Linear entry's weight ordered by input channel (151 MB for AlexNet's fc6) and, once a
    near-tie needs it, a float64 copy of the tail.
    """

    def __init__(self, tail: nn.Sequential, max_memory: int = 1 << 30, margin_tol: float = 1e-3,
                 use_shortcuts: bool = True):
        self.tail = tail.eval()
        self.max_memory = int(max_memory)
        self.margin_tol = float(margin_tol)
        self.device = next((p.device for p in tail.parameters()), torch.device("cpu"))
        self.rows_computed = 0
        self._tail64 = None
        self._row_bytes: dict = {}
        self._unit_table = None
        self._split_entry(use_shortcuts)

    # -- structure ---------------------------------------------------------------------------------------------
    def _split_entry(self, enabled: bool) -> None:
        """Find ``per-channel steps -> Flatten -> [Dropout] -> Linear`` or ``per-channel steps -> Conv2d`` at the
        start of the tail: ``pool``, ``entry`` (the tail's step number ``_entry_at``) and the ``rest``."""
        self.pool = self.entry = self.rest = None
        self.pool_is_linear = False
        if not enabled:
            return
        modules = list(self.tail.children())
        position = 0
        while position < len(modules) and isinstance(modules[position], _CHANNELWISE):
            position += 1
        pool = modules[:position]
        flattened = position < len(modules) and _flattens_channels(modules[position])
        if flattened:
            position += 1
            while position < len(modules) and isinstance(modules[position], (nn.Dropout, nn.Identity)):
                position += 1
        entry = modules[position] if position < len(modules) else None
        if not (isinstance(entry, nn.Linear) if flattened else _plain_conv(entry)):
            return
        self.pool = nn.Sequential(*pool)
        self.pool_is_linear = all(isinstance(m, _LINEAR_POOL) for m in pool)
        self.entry = entry
        self.rest = nn.Sequential(*modules[position + 1:])
        self._entry_at = position

    @property
    def has_shortcut(self) -> bool:
        """The tail reaches a Linear through pooling only: an ablation is a low-rank update of its output."""
        return isinstance(self.entry, nn.Linear)

    # -- public API --------------------------------------------------------------------------------------------
    @torch.no_grad()
    def baseline(self, acts: torch.Tensor, labels: torch.Tensor) -> Outcome:
        acts = acts.to(self.device)
        return self._decide(self.tail(acts), labels.to(self.device),
                            lambda close: ties.logits_and_bound(self.tail64(), acts[close].double()))

    @torch.no_grad()
    def evaluate_units(self, acts: torch.Tensor, labels: torch.Tensor, masks: torch.Tensor,
                       base: Outcome | None = None) -> Outcome:
        """Predictions with the units where ``masks[s]`` is True set to zero, for each of the S masks [S, C].

        Single-unit masks take the fastest path; greedy ablation should zero its chosen units in ``acts`` and pass
        single-unit masks for the candidates.
        """
        acts = acts.to(self.device)
        labels = labels.to(self.device)
        masks = masks.to(self.device, dtype=torch.bool)
        base = base or self.baseline(acts, labels)
        # A row changes only if some ablated unit is nonzero somewhere on that image.
        active = acts.flatten(2).ne(0).any(-1)  # [B, C]
        changed = (masks.float() @ active.float().T) > 0  # [S, B]

        def edit(rows):
            return acts[rows[:, 1]] * (~masks[rows[:, 0]]).to(acts.dtype)[:, :, None, None]

        if self.entry is not None:
            pooled = self.pool(acts)
            rows = self._entry_rows(pooled, pooled, self._entry_weight(pooled), _selections(masks))
        else:
            rows = self._full_rows(edit, acts)
        return self._evaluate(changed, labels, base, rows)

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

        def edit(rows):
            s, b = rows[:, 0], rows[:, 1]
            return acts[b] - torch.einsum("cr,rhw->rchw", q[:, s], coeff[b, s])

        if self.entry is not None and self.pool_is_linear:
            pooled = self.pool(acts)
            rotated = torch.einsum("bc...,cs->bs...", pooled, q)  # the pooled coordinates along each direction
            weight = torch.einsum("c...,cs->s...", self._entry_weight(pooled), q)
            rows = self._entry_rows(pooled, rotated, weight, [slice(s, s + 1) for s in range(q.shape[1])])
        else:
            rows = self._full_rows(edit, acts)
        return self._evaluate(changed, labels, base, rows)

    def tail64(self) -> nn.Sequential:
        """A float64 copy of the tail, made on first need, for deciding near-ties."""
        if self._tail64 is None:
            import copy

            self._tail64 = copy.deepcopy(self.tail).double()
        return self._tail64

    # -- row evaluators ----------------------------------------------------------------------------------------
    def _entry_weight(self, pooled: torch.Tensor) -> torch.Tensor:
        """The entry's weight by input channel: [C, positions, F] for a Linear (a contiguous copy, kept, so that a
        chunk's channels are whole blocks of memory), [C, O, kh, kw] for a Conv2d (a view)."""
        weight = self.entry.weight
        if not self.has_shortcut:
            return weight.transpose(0, 1)
        if self._unit_table is None or self._unit_table.shape[0] != pooled.shape[1]:
            self._unit_table = weight.view(len(weight), pooled.shape[1], -1).permute(1, 2, 0).contiguous()
        return self._unit_table

    def _entry_output(self, entry: nn.Module, pooled: torch.Tensor) -> torch.Tensor:
        return entry(pooled.flatten(1) if self.has_shortcut else pooled)

    def _entry_rows(self, pooled, source, weight, selections) -> _Rows:
        """Rows as ``L(x) - L_m(x_m)`` followed by the rest of the tail.

        ``source`` [B, N, ...] holds the channels ablations remove (units, or rotated coordinates), ``weight``
        [N, ...] the entry's weight by those channels (as ``_entry_weight``), and ``selections[s]`` the channels
        ablation s removes.
        """
        full = self._entry_output(self.entry, pooled)  # [B, O, ...]
        one_each = all(isinstance(chosen, slice) for chosen in selections)  # one channel per ablation
        single = one_each and self.has_shortcut
        starts = torch.tensor([chosen.start for chosen in selections], device=self.device) if one_each else None

        def logits(rows):
            if single:
                return self.rest(_updated_single(rows, full, source, weight, starts))
            return self.rest(full[rows[:, 1]] - self._removed_each(rows, source, weight, selections, full.dtype))

        def removed64(rows, source=source, weight=weight):
            if one_each:
                return self._removed_rows(rows, source, weight, starts, torch.float64)
            return self._removed_each(rows, source, weight, selections, torch.float64)

        def exact(rows):
            tail64 = list(self.tail64().children())
            entry64, rest64 = tail64[self._entry_at], nn.Sequential(*tail64[self._entry_at + 1:])
            settled, bounds = [], []
            for piece in rows.split(max(1, self.max_memory // exact_row_bytes)):
                images, local = torch.unique(piece[:, 1], return_inverse=True)
                source64 = pooled[images].double()
                updated = self._entry_output(entry64, source64)[local] - removed64(piece)
                if len(rest64):
                    logits, bound = ties.logits_and_bound(rest64, updated)
                elif self.has_shortcut:  # the entry is the classifier: its product and the update are the last step
                    magnitude = removed64(piece, source.abs(), weight.abs())
                    terms = ties.gamma(self.entry.in_features + 2) * magnitude
                    logits, bound = updated, ties.product_bound(entry64, source64.flatten(1)[local], terms=2) + terms
                else:
                    logits, bound = updated, torch.zeros_like(updated)
                settled.append(logits)
                bounds.append(bound)
            return torch.cat(settled), torch.cat(bounds)

        row_bytes = 2 * full[0].numel() * full.element_size() + self._peak_bytes("rest", self.rest, full[:1])
        # The batched single-channel update holds [ablations, B, F] and the [ablations, p, F] weights it uses.
        ablation_bytes = (len(source) + weight.shape[1]) * weight.shape[-1] * weight.element_size() if single else 0
        # A float64 row holds its gathered weights, and twice what a float32 row holds.
        exact_row_bytes = 2 * (weight[0].numel() * weight.element_size() + row_bytes)
        return _Rows(logits, exact, row_bytes, ablation_bytes)

    def _removed_rows(self, rows, source, weight, starts, dtype) -> torch.Tensor:
        """``L_m(x_m)`` per row for one channel per ablation, all rows at once: each row's channel map and its weights
        gathered, then one batched product (Linear) or one convolution with a group per row (Conv2d)."""
        channels = starts[rows[:, 0]]
        removed = source[rows[:, 1], channels].to(dtype)  # [R, p...] or [R, H, W]
        weight = weight.index_select(0, channels).to(dtype)  # [R, p, F] or [R, O, kh, kw]
        if self.has_shortcut:
            return torch.bmm(removed.flatten(1).unsqueeze(1), weight).squeeze(1)
        entry = self.entry
        out = F.conv2d(removed.unsqueeze(0), weight.flatten(0, 1).unsqueeze(1), None, entry.stride, entry.padding,
                       entry.dilation, groups=len(rows))
        return out.view(len(rows), -1, *out.shape[2:])

    def _removed_each(self, rows, source, weight, selections, dtype) -> torch.Tensor:
        """``L_m(x_m)`` per row, one ablation at a time (any number of channels each)."""
        ablations, counts = torch.unique_consecutive(rows[:, 0], return_counts=True)
        pieces, start = [], 0
        for s, n in zip(ablations.tolist(), counts.tolist()):
            chosen = selections[s]
            removed = source[:, chosen][rows[start:start + n, 1]].to(dtype)
            pieces.append(self._restricted(removed, weight[chosen].to(dtype)))
            start += n
        return torch.cat(pieces)

    def _restricted(self, source: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``L_m`` on the removed channels ``source`` [n, k, ...] with the entry's weight for them [k, ...]."""
        if self.has_shortcut:
            return source.flatten(1) @ weight.flatten(0, 1)
        entry = self.entry
        return F.conv2d(source, weight.transpose(0, 1), None, entry.stride, entry.padding, entry.dilation)

    def _full_rows(self, edit, acts) -> _Rows:
        row_bytes = acts[0].numel() * acts.element_size() + self._peak_bytes("tail", self.tail, acts[:1])
        return _Rows(lambda rows: self.tail(edit(rows)),
                     lambda rows: ties.logits_and_bound(self.tail64(), edit(rows).double()), row_bytes)

    def _peak_bytes(self, name: str, steps: nn.Sequential, example: torch.Tensor) -> int:
        """Bytes one row holds at the busiest step of ``steps`` (its input and output, doubled for the temporaries
        inside a block), measured once per input shape on one row."""
        key = (name, tuple(example.shape[1:]), example.dtype)
        if key not in self._row_bytes:
            x, peak = example.clone(), 0
            for step in steps.children():
                y = step(x)
                peak = max(peak, (x.numel() + y.numel()) * x.element_size())
                x = y
            self._row_bytes[key] = 2 * peak
        return self._row_bytes[key]

    # -- shared machinery --------------------------------------------------------------------------------------
    def _evaluate(self, changed: torch.Tensor, labels: torch.Tensor, base: Outcome, rows_of: _Rows) -> Outcome:
        """Baseline outcome for unchanged rows; the others computed chunk by chunk."""
        pred = base.pred.unsqueeze(0).repeat(changed.shape[0], 1)
        prob = base.true_prob.unsqueeze(0).repeat(changed.shape[0], 1)
        rows = changed.nonzero(as_tuple=False)  # [R, 2] of (s, b), sorted by s
        self.rows_computed = len(rows)
        for part in self._chunks(rows, rows_of):
            outcome = self._decide(rows_of.logits(part), labels[part[:, 1]], lambda close: rows_of.exact(part[close]))
            pred[part[:, 0], part[:, 1]] = outcome.pred
            prob[part[:, 0], part[:, 1]] = outcome.true_prob
        return Outcome(pred, prob)

    def _chunks(self, rows: torch.Tensor, rows_of: _Rows) -> tuple:
        """Consecutive pieces of ``rows`` whose estimated memory stays within ``max_memory`` (a row or an ablation
        that alone exceeds it goes alone)."""
        cost = torch.full((len(rows),), float(rows_of.row_bytes), dtype=torch.float64, device=rows.device)
        if rows_of.ablation_bytes and len(rows):
            first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
            first[1:] = rows[1:, 0] != rows[:-1, 0]
            cost += first * float(rows_of.ablation_bytes)
        chunk = torch.div(cost.cumsum(0) - cost, self.max_memory, rounding_mode="floor")
        return rows.split(torch.unique_consecutive(chunk, return_counts=True)[1].tolist())

    def _decide(self, logits: torch.Tensor, labels: torch.Tensor, exact) -> Outcome:
        """Predicted class and true-class probability from float32 logits; rows near a tie are decided by
        ``exact(close)``, their float64 logits and rounding bounds, under ``compute.ties``' rule."""
        close = ties.near_tie(logits, self.margin_tol)
        pred = logits.argmax(1)  # unique wherever the row is not close
        prob = torch.log_softmax(logits, 1).gather(1, labels[:, None]).squeeze(1).exp()
        if close.any():
            settled, bound = exact(close)
            pred[close] = ties.lowest_of_tied(settled, bound)
            prob[close] = torch.softmax(settled, 1).gather(1, labels[close][:, None]).squeeze(1).float()
        return Outcome(pred, prob)

def _updated_single(rows, full, source, weight, starts) -> torch.Tensor:
    """``L(x) - L_m(x_m)`` per row when every ablation removes one channel and ``L`` is a Linear: one batched product
    over the chunk's ablations and all images, [ablations, B, p] x [ablations, p, F], then the rows picked out."""
    ablations, local = torch.unique_consecutive(rows[:, 0], return_inverse=True)
    channels = starts[ablations]
    removed = _take(source, 1, channels).flatten(2).transpose(0, 1)  # [ablations, B, p]
    updated = torch.baddbmm(full.expand(len(channels), -1, -1), removed, _take(weight, 0, channels),
                            alpha=-1)  # [ablations, B, F]
    updated = updated.flatten(0, 1)
    if len(rows) == len(updated):  # every image of every ablation, in order
        return updated
    return updated.index_select(0, local * len(full) + rows[:, 1])


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(dim, index)``, as a view when the index is a run of consecutive integers (a sweep's
    chunk of units), which saves copying the weights of every unit once per chunk."""
    if len(index) == 1 or bool((index.diff() == 1).all()):
        return tensor.narrow(dim, int(index[0]), len(index))
    return tensor.index_select(dim, index)


def _flattens_channels(module: nn.Module) -> bool:
    """A Flatten that keeps the batch axis: channel c of its input becomes a contiguous block of columns."""
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _plain_conv(module: nn.Module | None) -> bool:
    """A convolution that is linear in each input channel separately (ungrouped, zero padding)."""
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"


def _selections(masks: torch.Tensor) -> list:
    """Index of each mask's units: a slice (a view, no copy) for one unit, a list otherwise."""
    if bool((masks.sum(1) == 1).all()):
        return [slice(unit, unit + 1) for unit in masks.int().argmax(1).tolist()]
    units = [torch.nonzero(mask).flatten().tolist() for mask in masks.cpu()]
    return [slice(u[0], u[0] + 1) if len(u) == 1 else u for u in units]


def single_unit_masks(units: int, device=None) -> torch.Tensor:
    return torch.eye(units, dtype=torch.bool, device=device)


def make_engine(sequence: nn.Sequential, step: str, **kwargs) -> AblationEngine:
    from compute.sequence import tail_of

    if step not in step_names(sequence):
        raise KeyError(step)
    return AblationEngine(tail_of(sequence, step), **kwargs)
