"""Unit attributes (the paper's Sec. 2.2), each a plain function of arrays with its formula in the docstring.

Per-class attributes are [units, classes] matrices; the paper's scalar is the maximum over classes.
"""

from __future__ import annotations

import numpy as np


def l1_norm(weight: np.ndarray) -> np.ndarray:
    """L1 norm of each unit's filter: sum |w| over the unit's weights (weight is [units, ...])."""
    weight = np.asarray(weight, dtype=np.float64)
    return np.abs(weight.reshape(weight.shape[0], -1)).sum(1)


def folded_l1_norm(weight: np.ndarray, gamma, running_var: np.ndarray, eps: float) -> np.ndarray:
    """BN-folded L1 norm of each unit: |gamma_u| / sqrt(var_u + eps) * sum |w_u|.

    Batch norm after a conv computes gamma * (w.x + b - mean) / sqrt(var + eps) + beta, i.e. a conv with the filter
    w * gamma / sqrt(var + eps): this folded filter is what the unit applies, and its L1 norm is the one above.
    Rescaling w_u by s (with mean_u by s and var_u + eps by s^2, which leaves the network's function unchanged)
    leaves it unchanged, where the plain L1 norm grows by s. ``gamma`` None (batch norm without affine) means 1.
    """
    scale = np.ones(len(running_var)) if gamma is None else np.abs(np.asarray(gamma, dtype=np.float64))
    return scale / np.sqrt(np.asarray(running_var, dtype=np.float64) + float(eps)) * l1_norm(weight)


def unit_l1(model, spec, layer: str) -> tuple[np.ndarray, dict]:
    """The layer's L1 attribute and the attrs that say what it is: ``source`` (the conv whose filters are the units),
    ``folded_batch_norm`` (the batch norm folded in, "" for none) and ``definition`` (the formula, in words). None,
    with ``not_applicable`` set, for a layer the spec names no conv for (a DenseNet block's concatenated output).

    Where batch norm follows the conv, any rescaling of a filter is undone by it, so the plain L1 norm is not a
    property of the unit: the norm is then the BN-folded one (``folded_l1_norm``, with the running statistics).
    """
    from compute.models.registry import batch_norm_after

    source = spec.unit_weights.get(layer)
    if source is None:
        return None, {"source": "", "folded_batch_norm": "", "not_applicable": 1, "definition": (
            f"not applicable: no single conv writes the channels of {layer} (they come from a concatenation or "
            f"another operation), so its units have no filter of their own")}
    modules = dict(model.named_modules())
    weight = modules[source].weight.detach().cpu().double().numpy()
    bn_name = batch_norm_after(model, source)
    bn = modules[bn_name] if bn_name else None
    if bn is not None and bn.running_var is None:
        # Without running statistics batch norm normalises by each batch's own: there is no fixed scale to fold in.
        return l1_norm(weight), {"source": source, "folded_batch_norm": "", "definition": (
            f"plain L1 norm sum |w_u| of {source}'s filter; batch norm {bn_name} follows but keeps no running "
            f"statistics, so nothing can be folded")}
    if bn is None:
        return l1_norm(weight), {"source": source, "folded_batch_norm": "", "definition": (
            f"L1 norm of the unit's filter, sum |w_u| over the weights of {source} (no batch norm follows it)")}
    gamma = None if bn.weight is None else bn.weight.detach().cpu().double().numpy()
    values = folded_l1_norm(weight, gamma, bn.running_var.detach().cpu().double().numpy(), bn.eps)
    return values, {"source": source, "folded_batch_norm": bn_name, "definition": (
        f"BN-folded L1 norm |gamma_u| / sqrt(running_var_u + eps) * sum |w_u| of {source}'s filter through batch "
        f"norm {bn_name} (eps {bn.eps:g}): batch norm undoes any rescaling of the filter, so the plain L1 norm is "
        f"not a property of the unit")}


def class_means(mean_act: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """mu[u, c]: the unit's mean activation over the images of class c ([N, U] in, [U, K] out)."""
    mean_act = np.asarray(mean_act, dtype=np.float64)
    onehot = np.eye(num_classes)[np.asarray(labels)]  # [N, K]
    counts = onehot.sum(0)
    return (mean_act.T @ onehot) / np.maximum(counts, 1)


def class_selectivity(mean_act: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(mu_c - mu_not_c) / (mu_c + mu_not_c) per unit and class (Morcos et al. 2018).

    mu_c is the unit's mean (spatially averaged) activation over images of class c, mu_not_c over all other images;
    with the balanced validation sets used here that equals the mean of the other classes' means. Activations are
    post-ReLU, so the value lies in [-1, 1]; a unit silent on every image gets 0.
    """
    mean_act = np.asarray(mean_act, dtype=np.float64)
    labels = np.asarray(labels)
    onehot = np.eye(num_classes)[labels]
    counts = onehot.sum(0)
    sums = mean_act.T @ onehot  # [U, K]
    mu_c = sums / np.maximum(counts, 1)
    mu_not = (sums.sum(1, keepdims=True) - sums) / np.maximum(len(labels) - counts, 1)
    denom = mu_c + mu_not
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(denom > 0, (mu_c - mu_not) / denom, 0.0)
    return out


def class_correlation(mean_act: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Pearson correlation over images between each unit's mean activation and each class's predicted probability.

    [N, U] and [N, K] in, [U, K] out; a constant unit or class gives 0 (no linear relation can be measured).
    """
    x = np.asarray(mean_act, dtype=np.float64)
    y = np.asarray(probs, dtype=np.float64)
    xc = x - x.mean(0)
    yc = y - y.mean(0)
    xs = np.sqrt((xc ** 2).sum(0))
    ys = np.sqrt((yc ** 2).sum(0))
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = (xc.T @ yc) / np.outer(xs, ys)
    return np.nan_to_num(corr, nan=0.0, posinf=0.0, neginf=0.0)


def batch_moments(acts: np.ndarray):
    """(count, mean, sum of squared deviations, zeros) per unit over every position of a batch [B, U, ...]."""
    values = np.moveaxis(np.asarray(acts, dtype=np.float64), 1, -1).reshape(-1, acts.shape[1])
    if values.shape[0] == 0:
        return 0, np.zeros(acts.shape[1]), np.zeros(acts.shape[1]), np.zeros(acts.shape[1])
    mean = values.mean(0)
    return values.shape[0], mean, ((values - mean) ** 2).sum(0), (values == 0).sum(0).astype(np.float64)


class RunningMoments:
    """Streaming per-unit count, mean, std and fraction of zeros over every position of every image.

    Chan et al.'s parallel update keeps the variance accurate in float64 while batches stream past.
    """

    def __init__(self, units: int):
        self.count = 0
        self.mean = np.zeros(units)
        self.m2 = np.zeros(units)
        self.zeros = np.zeros(units)

    def update(self, acts: np.ndarray) -> None:
        """acts: [B, U, H, W] (or [B, U])."""
        self.merge(*batch_moments(acts))

    def merge(self, n: int, batch_mean: np.ndarray, batch_m2: np.ndarray, zeros: np.ndarray) -> None:
        """Fold in one batch's moments (from ``batch_moments``); merging in batch order reproduces ``update``."""
        if n == 0:
            return
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean = self.mean + delta * n / total
        self.m2 = self.m2 + batch_m2 + delta ** 2 * self.count * n / total
        self.count = total
        self.zeros += zeros

    @property
    def std(self) -> np.ndarray:
        return np.sqrt(self.m2 / max(self.count, 1))

    @property
    def sparsity(self) -> np.ndarray:
        return self.zeros / max(self.count, 1)
