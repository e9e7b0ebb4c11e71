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
* Chains. Masks that are the prefixes of unit orders (each empty or the one before plus one unit: greedy's replays)
  on a Linear entry: ``L_m(x_m)`` of a prefix is that of the prefix before plus the new unit's single-channel
  update, so each order costs one batched product over its units and a running sum (``_ChainUpdates``), not a
  product over all of a prefix's units per prefix.
* Directions. Removing direction q_j is zeroing coordinate j in the rotated basis z = Q^T a; where the per-channel
  steps are linear (average pooling, identity) they commute with the rotation, so the same update runs with the
  entry's weight rotated, ``L Q``.
* Certified rows. A caller that needs only predictions passes ``probabilities=False``. Then a row whose baseline
  top-two margins exceed a proven bound on how far the ablation can move them keeps the baseline's prediction and the
  rest of the tail does not run for it (``Certificate``): the bound is the change of one activation, times certified
  operator norms of the later steps, times the distances between the last layer's rows. On a shortcut that
  activation is the first after the entry, its change computed per row. Without one (directions where a max pool
  follows the layer; no entry) it is first the edited activation itself, whose change is known before it is formed
  (the removed maps' norm, or the norm of a direction's coefficients), then the output of the tail's leading
  per-channel steps (the max pool), whose exact change is often far smaller. Rows near the bound are computed, not
  guessed. ``rows_certified`` counts them.
* Reduced precision, proven. A computed row that needs its prediction only runs its first linear step after the
  state (demo conv3 rows: conv5) on its change from the baseline in bfloat16 on the CPU, with a bound on that
  product's error; where the bound leaves the prediction provably the float32 one it is taken, otherwise the row runs
  in float32 (``compute.lib.reduced``; ``rows_reduced`` counts them). Reduced precision for whole rows is not used: a
  bound on its error that holds for every input grows with the width of each layer it passes (4096 for fc7) and came
  out about 140 times the logits' spread on a random AlexNet (BENCHMARKS.md). A caller on a GPU must keep TF32 off
  (``torch.backends.cudnn.allow_tf32 = False``, as ``compute.all`` does) for the same reason.
* Chunks. Rows run in chunks sized so that one chunk's tensors stay within ``max_memory`` bytes.

Floating point: the update is summed in a different order than the full product, so logits may differ in the last
bits, and so do two full float32 runs that batch images differently (BLAS blocking depends on the batch). Where the
top two logits are that close, "the" float32 prediction is not defined; such rows (margin below ``margin_tol`` times
the largest absolute logit, at least 1) are recomputed in float64 (through the same update, or the whole tail) and
decided by ``compute.lib.ties``: logits within the float64 rounding bound of the last product (derived from its operands)
are tied, and a tie goes to the lowest class index. What is guaranteed, on every CPU and for any batching or chunking:
every row not near a tie equals the full float32 computation; two classes tied in exact arithmetic (equal rows of the
last layer) are decided for the lower index; a float64 gap beyond twice the bound is decided by value.
``compute.lib.ties.predict`` applies the same rule to a plain run of a whole network, the reference tests compare with.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from compute.lib import ties
from compute.lib.certificates import CHANGE_SAFETY, Certificate, channel_norms, lipschitz_bound, plain_conv
from compute.lib.pooling import with_pools_before_relus, with_sliced_pools
from compute.lib.sequence import run_in_place
from compute.lib.reduced import ReducedStep

_CHANNELWISE = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.ReLU, nn.Identity,
                nn.Dropout, nn.Dropout2d)
_LINEAR_POOL = (nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Identity, nn.Dropout, nn.Dropout2d)
# Certified rows are entered and checked in pieces of about this many bytes of state: small enough to stay in cache
# over the several elementwise passes a check makes (on whole 1 GiB chunks they made the check cost more than it saved).
_PIECE_BYTES = 4 << 20
# Rows entered, checked and decided in reduced precision at once, small enough for their elementwise passes to run
# from cache: demo conv3 rows on a 2-core EPYC, 4,096 at once 490 ms, in pieces of 512 291 ms; a whole sweep of 256
# images (channels-last rows) on a Sapphire Rapids Xeon, pieces of 512 / 256 / 128 / 64: 2.18 / 2.02 / 1.93 / 2.02 s.
_REDUCED_PIECE = 128
# Automatic reduced precision pauses after a piece that proved fewer of its rows than this, and tries again after
# ``_PROBE_EVERY`` paused pieces, twice as many after each probe that fails, at most ``_PROBE_EVERY_MOST``
# (``_reduce_next``). What a piece proves moves with its units (rows come sorted by unit): a pause that never ended left
# the default demo run's conv3 sweep in float32 after its first hard piece (179 pieces ran bfloat16, about 6%; with
# probes 3,252 of 3,266 do, and the sweep takes a fifth less time). Where nothing proves (random weights), the
# growing pause leaves about one probe per call.
_LEAST_PROVEN_SHARE = 0.5
_PROBE_EVERY = 8
_PROBE_EVERY_MOST = 64
# Bytes a call holds per (ablation, image) pair beside its chunks: predictions (int64), probabilities (float32), the
# changed and settled masks, the float product that finds the changed pairs, the changed pair's (s, b) row (int64),
# and the three float64 costs per row that size the chunks.
_PAIR_BYTES = 8 + 4 + 1 + 1 + 4 + 16 + 3 * 8
# Chunks get what is left of max_memory after what the call holds, but never less than this share of it: a call whose
# held tensors alone reach the budget runs in small chunks rather than stopping.
_LEAST_CHUNK_SHARE = 8


@dataclass
class Outcome:
    """Predicted class and probability of the true class, per (ablation, image)."""

    pred: torch.Tensor  # [S, B] int64
    true_prob: torch.Tensor | None  # [S, B] float32; None when the call asked for predictions only


@dataclass
class _Rows:
    """How to compute chunks of rows (sorted by ablation): float32 logits in two halves (``enter``: rows -> the state
    after the shortcut, ``finish``: state -> logits), float64 logits with their rounding bounds for settling near-ties
    (``compute.lib.ties``), the memory a chunk needs per row and per distinct ablation in it, and ``certified`` (rows,
    state) -> rows proven to keep the baseline's prediction, where a certificate exists; or ``settled``, the rows
    proven so from the ablations' known sizes alone, which are never entered."""

    enter: Callable[[torch.Tensor], torch.Tensor]
    finish: Callable[[torch.Tensor], torch.Tensor]
    exact: Callable[[torch.Tensor], torch.Tensor]
    row_bytes: int
    ablation_bytes: int = 0
    certified: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    state_bytes: int = 0  # of one row's state, for sizing the pieces certified at once
    settled: torch.Tensor | None = None  # [S, B] rows proven to keep the baseline's prediction before entering
    # (images, state, sizes) -> (pred, proven): predictions with the first linear step in bfloat16, where proven
    reduced: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None
    reduced_key: str = ""  # the reduced step's name, for automatic mode's pace (``_reduce_next``)
    held: int = 0  # bytes held for the whole call beside the chunks (the entry's output, a chain's running sums)


class AblationEngine:
    """Tail of a network after one layer, evaluated under unit or direction ablations.

    ``max_memory`` bounds the bytes of the tensors one call holds: what it keeps for the whole call (predictions per
    ablation and image, the entry's output) and one chunk of rows at a time; rows are streamed in chunks of what is
    left, so any number of ablations fits. Of the last call's rows, ``rows_computed`` ran the tail and
    ``rows_certified`` were proven unchanged without it; the others were skipped as unchanged (every ablated unit zero
    on the image); ``rows_reduced`` of the computed rows were decided in bfloat16 (``compute.lib.reduced``).
    ``reduced_precision``: None decides per step (on the CPU, where bfloat16 is faster here and proves most rows),
    True uses it wherever a bound exists (for tests), False never; the predictions are the same in every case. Kept
    between calls: a Linear entry's weight ordered by input channel (151 MB for AlexNet's fc6), once a near-tie needs
    it a float64 copy of the tail, and once a call certifies, the certificate per input shape (its operator norms cost
    a few seconds for AlexNet's 4096-wide layers, once).
    """

    def __init__(self, tail: nn.Sequential, max_memory: int = 1 << 30, margin_tol: float = 1e-3,
                 use_shortcuts: bool = True, reduced_precision: bool | None = None):
        # In place (the pools are the caller's modules), then reordered in a copy of the sequence: same outputs,
        # faster on the CPU (compute.lib.pooling).
        self.tail = with_pools_before_relus(with_sliced_pools(tail)).eval()
        self.max_memory = int(max_memory)
        self.margin_tol = float(margin_tol)
        self.device = next((p.device for p in tail.parameters()), torch.device("cpu"))
        self.rows_computed = 0
        self.rows_certified = 0
        self._tail64 = None
        self._certificates: dict = {}
        self._row_bytes: dict = {}
        self._unit_table = None
        self.reduced_precision = reduced_precision
        self.rows_reduced = 0
        self._reduced_shares: dict = {}
        self._reduced_paused: dict = {}  # per reduced step: (pieces paused since the last probe, pieces to the next)
        self._channel_norms: dict = {}
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
        if not (isinstance(entry, nn.Linear) if flattened else plain_conv(entry)):
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
                       base: Outcome | None = None, *, probabilities: bool = True) -> Outcome:
        """Predictions with the units where ``masks[s]`` is True set to zero, for each of the S masks [S, C].

        Single-unit masks take the fastest path; greedy ablation should zero its chosen units in ``acts`` and pass
        single-unit masks for the candidates. ``probabilities=False``: predictions only (``true_prob`` is None), which
        lets certified rows skip the tail.
        """
        acts = acts.to(self.device)
        labels = labels.to(self.device)
        masks = masks.to(self.device, dtype=torch.bool)
        base = base or self.baseline(acts, labels)
        # A row changes only if some ablated unit is nonzero somewhere on that image.
        active = _nonzero_maps(acts)  # [B, C]
        changed = (masks.float() @ active.float().T) > 0  # [S, B]

        def edit(rows):
            return acts[rows[:, 1]] * (~masks[rows[:, 0]]).to(acts.dtype)[:, :, None, None]

        if self.entry is not None:
            pooled = self.pool(acts)
            rows = self._entry_rows(pooled, pooled, self._entry_weight(pooled), _selections(masks),
                                    None if probabilities else base.pred,
                                    _chains(masks) if self.has_shortcut else None)
        else:
            # Zeroing units moves the activation by exactly the removed maps: ||d|| = sqrt(sum of ||a_k||^2).
            change = (lambda: (masks.double() @ acts.double().flatten(2).pow(2).sum(-1).T).sqrt())
            rows = self._full_rows(edit, acts, None if probabilities else (change, base.pred))
        return self._evaluate(changed, labels, base, rows, probabilities)

    @torch.no_grad()
    def evaluate_directions(self, acts: torch.Tensor, labels: torch.Tensor, rotation: torch.Tensor,
                            directions: torch.Tensor, base: Outcome | None = None, *,
                            probabilities: bool = True) -> Outcome:
        """Predictions with direction ``rotation[:, j]`` projected out of every position, for each j in directions.

        ``rotation`` is an orthogonal [C, C] matrix; removing coordinate j in the rotated basis z = Q^T a and rotating
        back gives a' = a - q_j (q_j^T a). ``probabilities`` as in ``evaluate_units``.
        """
        acts = acts.to(self.device)
        labels = labels.to(self.device)
        q = rotation.to(self.device, acts.dtype)[:, directions.to(self.device)]  # [C, S]
        base = base or self.baseline(acts, labels)
        coeff = torch.einsum("bchw,cs->bshw", acts, q)  # q_j^T a at every position
        changed = _nonzero_maps(coeff).T  # [S, B]

        def edit(rows):
            # a - q_j c_j on a gathered copy of the rows' maps, in place, without an [R, C, H, W] product (2.5x
            # faster on the demo's conv5 rows); a fused multiply-add rounds once where this rounds twice, and
            # ``_direction_change``'s bound holds for either
            s, b = rows[:, 0], rows[:, 1]
            edited = acts.index_select(0, b).flatten(2)  # [R, C, positions]
            edited.baddbmm_(q.T.index_select(0, s).unsqueeze(2), coeff[b, s].flatten(1).unsqueeze(1), alpha=-1)
            return edited.view(len(rows), *acts.shape[1:])

        if self.entry is not None and self.pool_is_linear:
            pooled = self.pool(acts)
            rotated = torch.einsum("bc...,cs->bs...", pooled, q)  # the pooled coordinates along each direction
            weight = torch.einsum("c...,cs->s...", self._entry_weight(pooled), q)
            rows = self._entry_rows(pooled, rotated, weight, [slice(s, s + 1) for s in range(q.shape[1])],
                                    None if probabilities else base.pred)
        else:
            rows = self._full_rows(edit, acts, None if probabilities else (lambda: _direction_change(acts, q, coeff),
                                                                           base.pred))
        return self._evaluate(changed, labels, base, rows, probabilities)

    def tail64(self) -> nn.Sequential:
        """A float64 copy of the tail, made on first need, for deciding near-ties."""
        if self._tail64 is None:
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

    def _entry_rows(self, pooled, source, weight, selections, base_pred=None, chains=None) -> _Rows:
        """Rows as ``L(x) - L_m(x_m)`` followed by the rest of the tail.

        ``source`` [B, N, ...] holds the channels ablations remove (units, or rotated coordinates), ``weight``
        [N, ...] the entry's weight by those channels (as ``_entry_weight``), and ``selections[s]`` the channels
        ablation s removes. With ``base_pred`` (the baseline's predictions [B]) rows are certified where a
        certificate exists; the state between ``enter`` and ``finish`` is then the first activation after the entry.
        ``chains`` (``_chains``, Linear entry only): the selections are prefixes of unit orders, whose updates are
        running sums of single-channel ones (``_ChainUpdates``).
        """
        full = self._entry_output(self.entry, pooled)  # [B, O, ...]
        if not self.has_shortcut:
            # channels last: oneDNN's convolutions after the entry read it as they are (the demo's conv5 in bfloat16
            # on 512 rows: 12.8 ms from NCHW, 6.0 ms from NHWC), and torch's max pool is fast on it
            full = full.contiguous(memory_format=torch.channels_last)
        one_each = all(isinstance(chosen, slice) for chosen in selections)  # one channel per ablation
        single = one_each and self.has_shortcut
        chained = None
        if chains is not None and not one_each:
            # A chain's sums are held whole, [depth + 1, B, F]: within half the budget, or the general path runs.
            longest = int(torch.unique_consecutive(chains[1], return_counts=True)[1].max())
            if longest * len(source) * weight.shape[-1] * weight.element_size() <= self.max_memory // 2:
                chained = _ChainUpdates(source, weight, *chains)
        starts = torch.tensor([chosen.start for chosen in selections], device=self.device) if one_each else None
        certificate = (self._certificate("after the entry", full, lambda: Certificate.of(self.rest, full[:1]))
                       if base_pred is not None else None)
        lead, after = (certificate.lead, certificate.after) if certificate else (nn.Sequential(), self.rest)

        # a convolution's weight by channel as [N, O, kh * kw] matrices, for one batched product per row
        taps = (weight.reshape(*weight.shape[:2], -1)
                if one_each and not self.has_shortcut and not isinstance(self.entry.padding, str) else None)

        def enter(rows):
            if single:
                return run_in_place(lead, _updated_single(rows, full, source, weight, starts))
            if taps is not None:
                return run_in_place(lead, _updated_single_conv(rows, full, source, taps, starts, self.entry))
            entered = full[rows[:, 1]]
            if chained is not None:
                entered -= chained(rows)
                return run_in_place(lead, entered)
            for at, removed in self._removed_pieces(rows, source, weight, selections, full.dtype):
                entered[at] -= removed  # in place: no second row-sized buffer, no concatenation
            return run_in_place(lead, entered)

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
        # The batched single-channel update holds [ablations, B, F] and the [ablations, p, F] weights it uses; a
        # chain's running sums hold twice [B, F] per ablation (the steps and their sums).
        ablation_bytes = ((len(source) + weight.shape[1]) * weight.shape[-1] * weight.element_size() if single
                          else 2 * len(source) * weight.shape[-1] * weight.element_size() if chained else 0)
        # A float64 row holds its gathered weights, and twice what a float32 row holds.
        exact_row_bytes = 2 * (weight[0].numel() * weight.element_size() + row_bytes)
        # The rest may start with an in-place ReLU (AlexNet's): its baseline logits come from a copy of ``full``.
        certified = reduced = settled = None
        reduced_key = "reduced, after the entry"
        if certificate:
            first = run_in_place(certificate.lead, full.clone())
            radius = certificate.radius(self.rest(full.clone()), base_pred, self.margin_tol)
            certified = certificate.rows(first, radius)
            if certified is not None:
                settled = self._settled_by_size(certificate, full, source, weight, selections, radius)
            reduced = self._reduced(reduced_key, after, first)
        # pooled (and the pooling's intermediate), full, the certificate's first and the baseline logits beside it
        held = (2 * pooled.numel() + 3 * full.numel()) * full.element_size()
        if chained is not None:
            held += (longest + 1) * len(source) * weight.shape[-1] * weight.element_size()
        return _Rows(enter, lambda state: run_in_place(after, state), exact, row_bytes, ablation_bytes, certified,
                     full[0].numel() * full.element_size(), settled, reduced, reduced_key, held)

    def _settled_by_size(self, certificate, full, source, weight, selections, radius) -> torch.Tensor | None:
        """Rows [S, B] certified before they are entered: the first activation moves by at most ``lead``'s Lipschitz
        bound times ||L_m(x_m)|| <= sum over the removed channels c of ||L_c|| ||x_c|| (``channel_norms``), and where
        that is inside the image's radius the row keeps its prediction. On the trained demo's conv5 this settles 79% of
        the rows the check after entering certifies, which then skip the update, the lead and the check."""
        lead = self._certificate("lead bound", full, lambda: lipschitz_bound(certificate.lead, full[:1].clone()))
        if lead is None:
            return None
        own = {self.entry.weight.data_ptr(), None if self._unit_table is None else self._unit_table.data_ptr()}
        if weight.data_ptr() not in own:  # a direction's rotated weight: new every call
            norms = channel_norms(self.entry, weight, source.shape[2:])
        else:  # the units' weights, the same every call
            key = ("channel norms", tuple(weight.shape), tuple(source.shape[2:]))
            if key not in self._channel_norms:
                self._channel_norms[key] = channel_norms(self.entry, weight, source.shape[2:])
            norms = self._channel_norms[key]
        sizes = norms.to(self.device)[None, :] * source.flatten(2).norm(dim=2).double()  # [B, N]
        if all(isinstance(chosen, slice) for chosen in selections):
            bound = sizes[:, [chosen.start for chosen in selections]].T
        else:
            removed = torch.zeros(len(selections), sizes.shape[1], dtype=torch.float64, device=self.device)
            for s, chosen in enumerate(selections):
                removed[s, chosen] = 1
            bound = removed @ sizes.T
        return bound * (lead * (1 + CHANGE_SAFETY)) < radius[None, :]

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

    def _removed_pieces(self, rows, source, weight, selections, dtype):
        """``L_m(x_m)`` one ablation at a time (any number of channels each): (slice of ``rows``, its rows' values)."""
        ablations, counts = torch.unique_consecutive(rows[:, 0], return_counts=True)
        start = 0
        for s, n in zip(ablations.tolist(), counts.tolist()):
            chosen = selections[s]
            images = rows[start:start + n, 1]
            # the rows' images first, then the channels: gathering the channels of every image first copied the
            # whole batch's maps once per ablation
            removed = (source[images, chosen] if isinstance(chosen, slice) else
                       source[images[:, None], torch.as_tensor(chosen, device=source.device)[None, :]]).to(dtype)
            yield slice(start, start + n), self._restricted(removed, weight[chosen].to(dtype))
            start += n

    def _removed_each(self, rows, source, weight, selections, dtype) -> torch.Tensor:
        """``L_m(x_m)`` per row, one ablation at a time (any number of channels each)."""
        return torch.cat([piece for _, piece in self._removed_pieces(rows, source, weight, selections, dtype)])

    def _restricted(self, source: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """``L_m`` on the removed channels ``source`` [n, k, ...] with the entry's weight for them [k, ...]."""
        if self.has_shortcut:
            return source.flatten(1) @ weight.flatten(0, 1)
        entry = self.entry
        return F.conv2d(source, weight.transpose(0, 1), None, entry.stride, entry.padding, entry.dilation)

    def _full_rows(self, edit, acts, sizes=None) -> _Rows:
        """Rows as the whole tail on ``edit(rows)``.

        With ``sizes`` = (change, base_pred), ``change()`` [S, B] bounding ||edit - acts|| per row, rows are certified
        twice over: first those a certificate of the whole tail proves unchanged from that bound alone are
        ``settled`` (their edited activation is never formed); then, where the tail starts with per-channel steps (a
        max pool: the reason there is no shortcut), the others are entered through these steps and certified on the
        exact change of their output, which a max pool often makes much smaller than the bound (it passes one change
        per window, and none that stays below the window's max).
        """
        row_bytes = acts[0].numel() * acts.element_size() + self._peak_bytes("tail", self.tail, acts[:1])
        rows_of = _Rows(edit, self.tail, lambda rows: ties.logits_and_bound(self.tail64(), edit(rows).double()),
                        row_bytes)
        if sizes is None:
            return rows_of
        steps = list(self.tail.children())
        count = 0
        while count < len(steps) and isinstance(steps[count], _CHANNELWISE):
            count += 1
        first, rest = nn.Sequential(*steps[:count]), nn.Sequential(*steps[count:])
        entered = first(acts.clone()) if count else acts  # a copy: the tail may start with an in-place ReLU
        after = self._certificate("after the leading steps", entered,
                                  lambda: Certificate.of(rest, entered[:1], lead=False))
        if after is None:
            return rows_of
        whole = self._certificate("whole tail", acts, lambda: after.behind(first, acts[:1])) if count else after
        change, base_pred = sizes
        logits = rest(entered.clone())
        if whole is not None:
            rows_of.settled = whole.settled(change(), logits, base_pred, self.margin_tol)
        rows_of.held = (entered.numel() if count else 0) * entered.element_size() + logits.numel() * logits.element_size()
        if count:
            rows_of.enter, rows_of.finish = (lambda rows: first(edit(rows))), rest
            rows_of.certified = after.rows(entered, after.radius(logits, base_pred, self.margin_tol))
            rows_of.state_bytes = entered[0].numel() * entered.element_size()
        rows_of.reduced_key = "reduced, after the leading steps"
        rows_of.reduced = self._reduced(rows_of.reduced_key, rest, entered)
        return rows_of

    def _reduced(self, key: str, after: nn.Sequential, first: torch.Tensor):
        """``_Rows.reduced`` for rows whose state (shaped like the baseline's ``first`` [B, ...]) runs ``after`` (the
        steps ``key`` names, for the caches): None where reduced precision is off, not on the CPU, not faster here
        (``ReducedStep.faster``), or has no bound."""
        if self.reduced_precision is False or self.device.type != "cpu" or not len(first):
            return None
        step = self._certificate(key, first, lambda: ReducedStep.of(after, first[:1]))
        if step is None:
            return None
        if self.reduced_precision is None and not step.faster(first[:1]):
            return None
        decide = step.bind(first, self.margin_tol)
        return lambda *args: self._count_reduced(key, *decide(*args))

    def _reduce_next(self, key: str) -> bool:
        """Whether the next piece of rows runs the reduced step ``key``. Automatic mode's pace, kept between calls:
        on while the latest piece that ran it proved at least ``_LEAST_PROVEN_SHARE`` of its rows (random weights'
        small margins prove few, and then a row pays twice), paused otherwise; a paused step runs again as a probe
        after ``_PROBE_EVERY`` pieces, so that a few hard units do not end it for good, and each probe that fails
        doubles the pause, up to ``_PROBE_EVERY_MOST``. Forced on, every piece runs it."""
        share = self._reduced_shares.get(key)
        if self.reduced_precision is not None or share is None or share >= _LEAST_PROVEN_SHARE:
            self._reduced_paused.pop(key, None)
            return True
        paused, every = self._reduced_paused.get(key, (0, _PROBE_EVERY))
        if paused + 1 < every:
            self._reduced_paused[key] = (paused + 1, every)
            return False
        self._reduced_paused[key] = (0, min(2 * every, _PROBE_EVERY_MOST))
        return True

    def _count_reduced(self, key: str, pred: torch.Tensor, proven: torch.Tensor) -> tuple:
        """Keep the share of rows the reduced step proved (the latest piece's) for ``_reduce_next``'s pace."""
        if len(proven):
            self._reduced_shares[key] = float(proven.float().mean())
        return pred, proven

    def _certificate(self, name: str, example: torch.Tensor, make) -> Certificate | None:
        """The certificate ``make()`` of the steps ``name`` says (after the entry, the whole tail, ...) for inputs
        shaped like ``example``'s rows, made once per shape: None where there is none (no steps: the entry gives the
        logits; or a step without a bound)."""
        key = (name, tuple(example.shape[1:]))
        if key not in self._certificates:
            self._certificates[key] = make()
        return self._certificates[key]

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
    def _evaluate(self, changed: torch.Tensor, labels: torch.Tensor, base: Outcome, rows_of: _Rows,
                  probabilities: bool = True) -> Outcome:
        """Baseline outcome for unchanged and certified rows; the others computed chunk by chunk."""
        pred = base.pred.unsqueeze(0).repeat(changed.shape[0], 1)
        prob = base.true_prob.unsqueeze(0).repeat(changed.shape[0], 1) if probabilities else None
        settled = 0
        if rows_of.settled is not None:  # certified rows known before any is entered
            settled = int((changed & rows_of.settled).sum())
            changed = changed & ~rows_of.settled
        self.rows_certified = settled
        rows = changed.nonzero(as_tuple=False)  # [R, 2] of (s, b), sorted by s
        self.rows_reduced = 0
        held = changed.numel() * _PAIR_BYTES + rows_of.held
        for chunk in self._chunks(rows, rows_of, max(self.max_memory - held, self.max_memory // _LEAST_CHUNK_SHARE)):
            part, state = self._enter(chunk, rows_of, pred)
            if not len(part):
                continue
            outcome = self._decide(rows_of.finish(state), labels[part[:, 1]],
                                   lambda close: rows_of.exact(part[close]), probabilities)
            pred[part[:, 0], part[:, 1]] = outcome.pred
            if probabilities:
                prob[part[:, 0], part[:, 1]] = outcome.true_prob
        self.rows_computed = len(rows) - (self.rows_certified - settled)
        return Outcome(pred, prob)

    def _enter(self, chunk: torch.Tensor, rows_of: _Rows, pred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of ``chunk`` left to finish in float32, and their states.

        Where rows can be certified or reduced, piece by piece: a piece is entered, checked (rows proven unchanged
        are dropped, ``rows_certified``), then decided in bfloat16 from the check's own change where a reduced step
        exists and automatic mode's pace allows it (``_Rows.reduced``, ``_reduce_next``; proven rows written into
        ``pred``, ``rows_reduced``). A piece's tensors are used while in cache, and only the rows left are copied out.
        """
        reducing = rows_of.reduced is not None
        if rows_of.certified is None and not reducing:
            return chunk, rows_of.enter(chunk)
        # a paused reduced step keeps the byte-sized pieces of the float32 path (larger: the rest of the tail's batches)
        paused = rows_of.reduced_key in self._reduced_paused
        rows_per_piece = (_REDUCED_PIECE if reducing and not paused
                          else max(1, _PIECE_BYTES // max(1, rows_of.state_bytes)))
        kept, states = [], []
        for piece in chunk.split(rows_per_piece):
            state = rows_of.enter(piece)
            left, sizes, change = None, None, None
            if rows_of.certified is not None:
                certified, sizes, change = rows_of.certified(piece, state)
                self.rows_certified += int(certified.sum())
                left = torch.nonzero(~certified).flatten()
                sizes = sizes[left]
            if reducing and self._reduce_next(rows_of.reduced_key) and (left is None or len(left)):
                if change is not None:  # rounded before it is gathered: half the bytes to copy
                    change = change.to(torch.bfloat16)[left]
                fast, proven = rows_of.reduced(piece[:, 1] if left is None else piece[left, 1],
                                               state if left is None else None, sizes, change)
                done = piece if left is None else piece[left]
                pred[done[proven, 0], done[proven, 1]] = fast[proven]
                self.rows_reduced += int(proven.sum())
                unproven = torch.nonzero(~proven).flatten()
                left = unproven if left is None else left[unproven]
            if left is None:
                kept.append(piece)
                states.append(state)
            else:
                kept.append(piece[left])
                states.append(state[left])
        return torch.cat(kept), torch.cat(states)

    @staticmethod
    def _chunks(rows: torch.Tensor, rows_of: _Rows, budget: int) -> tuple:
        """Consecutive pieces of ``rows`` whose estimated memory stays within ``budget`` bytes (a row or an ablation
        that alone exceeds it goes alone)."""
        cost = torch.full((len(rows),), float(rows_of.row_bytes), dtype=torch.float64, device=rows.device)
        if rows_of.ablation_bytes and len(rows):
            first = torch.ones(len(rows), dtype=torch.bool, device=rows.device)
            first[1:] = rows[1:, 0] != rows[:-1, 0]
            cost += first * float(rows_of.ablation_bytes)
        chunk = torch.div(cost.cumsum(0) - cost, budget, rounding_mode="floor")
        return rows.split(torch.unique_consecutive(chunk, return_counts=True)[1].tolist())

    def _decide(self, logits: torch.Tensor, labels: torch.Tensor, exact, probabilities: bool = True) -> Outcome:
        """Predicted class and true-class probability (None without ``probabilities``) from float32 logits; rows near
        a tie are decided by ``exact(close)``, their float64 logits and rounding bounds, under ``compute.lib.ties``'
        rule."""
        close = ties.near_tie(logits, self.margin_tol)
        pred = logits.argmax(1)  # unique wherever the row is not close
        prob = torch.log_softmax(logits, 1).gather(1, labels[:, None]).squeeze(1).exp() if probabilities else None
        if close.any():
            settled, bound = exact(close)
            pred[close] = ties.lowest_of_tied(settled, bound)
            if probabilities:
                prob[close] = torch.softmax(settled, 1).gather(1, labels[close][:, None]).squeeze(1).float()
        return Outcome(pred, prob)

def _direction_change(acts: torch.Tensor, q: torch.Tensor, coeff: torch.Tensor) -> torch.Tensor:
    """A bound [S, B] on ||a' - a|| for the float32 edit a' = fl(a - fl(q_j c_j)), c_j = q_j^T a at each position.

    Elementwise a'_i - a_i = -q_i c_i (1 + e1)(1 + e2) + a_i e2 with |e1|, |e2| <= u = 2^-24 (one rounding per
    product and per difference), so ||a' - a|| <= (1 + u)^2 ||q_j|| ||c_j|| + u ||a||: the norms of the direction
    (1 up to its float32 rounding), of its coefficients over the positions, and of the image's activation.
    """
    u = 2.0 ** -24
    coefficients = coeff.double().flatten(2).norm(dim=2).T  # [S, B]
    sizes = acts.double().flatten(1).norm(dim=1)  # [B]
    return (1 + u) ** 2 * q.double().norm(dim=0)[:, None] * coefficients + u * sizes[None, :]


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


def _updated_single_conv(rows, full, source, taps, starts, conv: nn.Conv2d) -> torch.Tensor:
    """``L(x) - L_m(x_m)`` per row when every ablation removes one channel and ``L`` is a convolution: each row's
    channel map unfolded into its kernel-sized patches [R, positions, kh * kw], times that channel's taps [kh * kw, O],
    subtracted in place from the row's copy of ``L(x)`` (channels last, as ``full`` is), one batched product per
    ablation. On the demo's conv3 and conv4 rows this replaced a convolution of one input channel per ablation."""
    patches = _patches(source[rows[:, 1], starts[rows[:, 0]]], conv).transpose(1, 2)  # [R, positions, kh * kw]
    full = full.contiguous(memory_format=torch.channels_last)  # as _entry_rows made it: no copy then
    entered = full[rows[:, 1]]  # [R, O, H', W'] in full's memory format (index_select would make it NCHW)
    flat = entered.permute(0, 2, 3, 1).flatten(1, 2)  # [R, positions, O], a view of the channels-last rows
    ablations, counts = torch.unique_consecutive(rows[:, 0], return_counts=True)
    at = 0
    for s, n in zip(ablations.tolist(), counts.tolist()):  # one weight per ablation: a product the BLAS batches well
        flat[at:at + n].baddbmm_(patches[at:at + n], taps[int(starts[s])].T.expand(n, -1, -1), alpha=-1)
        at += n
    return entered


def _patches(maps: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``F.unfold`` of single-channel maps [R, H, W] for ``conv``'s geometry, [R, kh * kw, positions], as strided
    slices of the padded maps: torch's CPU unfold of one channel took 5.7 ms for 500 demo rows, this a tenth."""
    (kh, kw), (dh, dw), (sh, sw), (ph, pw) = conv.kernel_size, conv.dilation, conv.stride, conv.padding
    padded = F.pad(maps, (pw, pw, ph, ph))
    rows_out = (padded.shape[1] - dh * (kh - 1) - 1) // sh + 1
    cols_out = (padded.shape[2] - dw * (kw - 1) - 1) // sw + 1
    taps = [padded[:, i * dh:i * dh + (rows_out - 1) * sh + 1:sh, j * dw:j * dw + (cols_out - 1) * sw + 1:sw]
            for i in range(kh) for j in range(kw)]
    return torch.stack(taps, 1).flatten(2)


class _ChainUpdates:
    """``L_m(x_m)`` per row for ablations that form chains (``_chains``): prefixes of unit orders, as greedy ablation
    replays them. Along a chain each ablation adds one unit, so its update is the one before plus that unit's
    single-channel update: one batched product per chain over all images [depth, B, p] x [depth, p, F] and a running
    sum give every prefix, where a product per ablation over all its units would repeat the earlier units' work at
    every step (20 steps: 10 times the arithmetic, and a gather per ablation). Rows come sorted by ablation, so
    chains are met one after another and only the current chain's sums are kept. The sums are rounded differently
    from one product over the units; as everywhere in the engine, rows near a tie are settled in float64
    (``_removed_each``), so the predictions do not depend on it."""

    def __init__(self, source: torch.Tensor, weight: torch.Tensor, added: torch.Tensor, first: torch.Tensor):
        self.source, self.weight, self.added, self.first = source, weight, added, first
        self._start, self._sums = None, None

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        chain = self.first[rows[:, 0]]
        starts, counts = torch.unique_consecutive(chain, return_counts=True)
        pieces, at = [], 0
        for start, n in zip(starts.tolist(), counts.tolist()):
            piece = rows[at:at + n]
            pieces.append(self._running_sums(start)[piece[:, 0] - start, piece[:, 1]])
            at += n
        return torch.cat(pieces) if len(pieces) > 1 else pieces[0]

    def _running_sums(self, start: int) -> torch.Tensor:
        """[depth + 1, B, F]: the update of each ablation of the chain that starts (empty) at ablation ``start``."""
        if self._start != start:
            later = torch.nonzero(self.first[start + 1:] != start)
            end = start + 1 + (int(later[0]) if len(later) else len(self.first) - start - 1)
            units = self.added[start + 1:end]
            removed = _take(self.source, 1, units).flatten(2).transpose(0, 1)  # [depth, B, p]
            weight = _take(self.weight, 0, units)  # [depth, p, F]
            self._sums = removed.new_empty(len(units) + 1, removed.shape[1], weight.shape[-1])
            self._sums[0] = 0
            torch.bmm(removed, weight, out=self._sums[1:])
            for depth in range(2, len(units) + 1):  # in place: torch.cumsum along the first axis is 20x slower
                self._sums[depth] += self._sums[depth - 1]
            self._start = start
        return self._sums


def _chains(masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Masks [S, C] that form chains, each mask empty (a chain's start; the first one is) or the one before it plus one
    unit, as (the unit each mask adds, -1 for a start; the ablation its chain starts at); None for any other masks."""
    counts = masks.sum(1)
    if len(masks) < 2 or int(counts[0]) != 0:
        return None
    grows = (counts[1:] == counts[:-1] + 1) & ~(masks[:-1] & ~masks[1:]).any(1)
    if not bool((grows | (counts[1:] == 0)).all()):
        return None
    added = masks.clone()
    added[1:] &= ~masks[:-1]
    positions = torch.arange(len(masks), device=masks.device)
    first = torch.where(counts == 0, positions, 0).cummax(0).values
    return torch.where(counts > 0, added.int().argmax(1), -1), first


def _take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``tensor.index_select(dim, index)``, as a view when the index is a run of consecutive integers (a sweep's
    chunk of units), which saves copying the weights of every unit once per chunk."""
    if len(index) == 1 or bool((index.diff() == 1).all()):
        return tensor.narrow(dim, int(index[0]), len(index))
    return tensor.index_select(dim, index)


def _flattens_channels(module: nn.Module) -> bool:
    """A Flatten that keeps the batch axis: channel c of its input becomes a contiguous block of columns."""
    return isinstance(module, nn.Flatten) and module.start_dim == 1 and module.end_dim == -1


def _nonzero_maps(maps: torch.Tensor) -> torch.Tensor:
    """[B, C]: whether each map [B, C, ...] has a nonzero (or NaN) entry. The largest absolute value, compared with 0:
    7 times as fast as ``any`` on the CPU (1.2 ms for 200 x 128 maps of 8 x 8, a greedy step's). In pieces of images
    (``_PIECE_BYTES``), so that the absolute values are never a copy of every map (a call's largest temporary, which
    its memory budget does not cover), and stay in cache: 3x faster on 4,800 images than one piece."""
    per_image = max(1, maps[0].numel() * maps.element_size())
    return torch.cat([piece.flatten(2).abs().amax(-1) != 0
                      for piece in maps.split(max(1, _PIECE_BYTES // per_image))])


def _selections(masks: torch.Tensor) -> list:
    """Index of each mask's units: a slice (a view, no copy) for one unit, a list otherwise."""
    if bool((masks.sum(1) == 1).all()):
        return [slice(unit, unit + 1) for unit in masks.int().argmax(1).tolist()]
    units = [torch.nonzero(mask).flatten().tolist() for mask in masks.cpu()]
    return [slice(u[0], u[0] + 1) if len(u) == 1 else u for u in units]


def single_unit_masks(units: int, device=None) -> torch.Tensor:
    return torch.eye(units, dtype=torch.bool, device=device)


def correct_counts(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> np.ndarray:
    """The one per-class count of correct predictions, [..., B] -> [..., K] (float64 integers, to sum over batches)."""
    labels = labels.to(pred.device)
    onehot = torch.nn.functional.one_hot(labels, num_classes).double()
    return ((pred == labels).double() @ onehot).cpu().numpy()
