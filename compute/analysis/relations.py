"""How a unit's attributes relate to its ablation drops (the paper's Sec. 3.3 and Fig. 5).

For every scalar attribute of a layer's units (max class selectivity, max class correlation, max concept IoU, L1 norm,
activation sparsity, mean and std) against the overall drop and the max class drop: Pearson and Spearman
coefficients with their p-values (scipy.stats) and bootstrap confidence intervals (scipy.stats.bootstrap, BCa, units
resampled in pairs). The table is small: [attributes, targets] per statistic.

Sign convention: a drop here is baseline minus ablated accuracy (positive = accuracy lost). The paper's Fig. 5 plots
the drop with the opposite sign (ablated minus baseline), which is why it reads a "clear negative correlation between
the max class accuracy drop and each of the measured attributes" where this tool's coefficients are positive. The
stored coefficients keep this tool's sign; ``in_paper_sign`` gives one as the paper would report it, for display.

Reading goes through a ``read(section, name)`` callable that returns the layer's array or None, so the pipeline
(reading earlier stages' parts) and the app (reading a finished store) share one definition of each attribute.
"""

from __future__ import annotations

import warnings
from typing import Callable

import numpy as np
from scipy import stats
from store.schema import layer_path

# (name, section, dataset, reduction to one number per unit). Per-class attributes use the maximum over classes,
# as the paper does ("in terms of the class with maximum value").
ATTRIBUTES = (
    ("max selectivity", "attributes", "selectivity", "max"),
    ("max correlation", "attributes", "correlation", "max"),
    ("max concept IoU", "dissection", "best_iou", "max"),
    ("L1", "attributes", "l1", None),
    ("sparsity", "attributes", "sparsity", None),
    ("activation mean", "attributes", "act_mean", None),
    ("activation std", "attributes", "act_std", None),
)
TARGETS = (
    ("overall drop", "ablation", "overall_drop", None),
    ("max class drop", "ablation", "class_drop", "max"),
)
N_RESAMPLES = 999
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95

# A coefficient against a drop in this tool's sign (baseline minus ablated) times PAPER_SIGN is the coefficient
# against the paper's Fig. 5 drop (ablated minus baseline).
PAPER_SIGN = -1.0
SIGN_NOTE = ("Drops here are baseline minus ablated (positive = accuracy lost); the paper's Fig. 5 plots the opposite "
             "sign, so its 'negative' correlations are positive here: the column 'paper's sign' gives each Pearson r "
             "as the paper would report it.")
# The name the L1 attribute goes by where the store says it is BN-folded (attr ``folded_batch_norm`` of its array).
FOLDED_L1 = "BN-folded L1"

Reader = Callable[[str, str], "np.ndarray | None"]


def in_paper_sign(coefficient):
    """A coefficient (or array of them) against this tool's drops, as the paper's Fig. 5 would report it."""
    return PAPER_SIGN * np.asarray(coefficient, dtype=np.float64)


def folded_l1(l1_attrs: dict) -> str:
    """The batch norm a store's L1 attribute is folded with (from its array's attrs), "" for none or an older store."""
    return str(l1_attrs.get("folded_batch_norm", "") or "")


def name_folded_l1(attributes: dict, table: dict) -> tuple[dict, dict]:
    """The attributes and the coefficient table with "L1" named FOLDED_L1, for a layer whose L1 is BN-folded."""
    rename = lambda name: FOLDED_L1 if name == "L1" else name  # noqa: E731
    attributes = {rename(name): values for name, values in attributes.items()}
    table = dict(table, attributes=np.array([rename(str(name)) for name in table["attributes"]], dtype=object))
    return attributes, table


def _per_unit(array: np.ndarray, reduction: str | None) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if reduction == "max" and array.ndim > 1:
        return array.reshape(array.shape[0], -1).max(1)
    return array.reshape(-1)


def _collect(spec, read: Reader) -> dict[str, np.ndarray]:
    found = {}
    for name, section, dataset, reduction in spec:
        value = read(section, dataset)
        if value is not None and not np.isnan(value).all():  # all NaN: not applicable to the layer (L1 with no conv)
            found[name] = _per_unit(value, reduction)
    return found


def scalar_attributes(read: Reader) -> dict[str, np.ndarray]:
    """The scalar attributes present for a layer, in ATTRIBUTES order (missing ones, e.g. no dissection, left out)."""
    return _collect(ATTRIBUTES, read)


def drop_targets(read: Reader) -> dict[str, np.ndarray]:
    """Overall drop and max class drop per unit (accuracy fractions)."""
    return _collect(TARGETS, read)


def _pearson(x, y, axis=-1):
    return stats.pearsonr(x, y, axis=axis).statistic


def _spearman(x, y, axis=-1):
    """Spearman's rho is Pearson's r of the ranks (average ranks for ties), which vectorises over resamples."""
    return _pearson(stats.rankdata(x, axis=axis), stats.rankdata(y, axis=axis), axis=axis)


def _is_constant(values: np.ndarray) -> bool:
    return bool(np.ptp(values) == 0)


def _bootstrap_ci(x, y, statistic, n_resamples: int, seed: int, confidence: float) -> tuple[float, float]:
    """BCa interval over units resampled in (attribute, drop) pairs; nan where a resample is degenerate."""
    with warnings.catch_warnings():
        # A resample whose values are all equal has no correlation; scipy warns and the interval becomes nan.
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        result = stats.bootstrap((x, y), statistic, paired=True, vectorized=True, n_resamples=n_resamples,
                                 confidence_level=confidence, rng=np.random.default_rng(seed))
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


def relation_table(attributes: dict[str, np.ndarray], targets: dict[str, np.ndarray],
                   n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> dict:
    """Pearson and Spearman coefficients, p-values and bootstrap intervals of every attribute against every target.

    Returns arrays: ``attributes`` [A] and ``targets`` [T] (names), ``pearson_r``/``pearson_p``/``spearman_r``/
    ``spearman_p`` [A, T], ``pearson_ci``/``spearman_ci`` [A, T, 2] (low, high). A constant attribute or target has
    no correlation: its entries are nan. ``n_resamples=0`` skips the bootstrap (intervals nan), for quick views.
    """
    a_names, t_names = list(attributes), list(targets)
    shape = (len(a_names), len(t_names))
    table = {"attributes": np.array(a_names, dtype=object), "targets": np.array(t_names, dtype=object)}
    for method in ("pearson", "spearman"):
        table[f"{method}_r"] = np.full(shape, np.nan)
        table[f"{method}_p"] = np.full(shape, np.nan)
        table[f"{method}_ci"] = np.full(shape + (2,), np.nan)
    for i, a_name in enumerate(a_names):
        x = np.asarray(attributes[a_name], dtype=np.float64)
        for j, t_name in enumerate(t_names):
            y = np.asarray(targets[t_name], dtype=np.float64)
            if len(x) < 3 or _is_constant(x) or _is_constant(y):
                continue
            pearson = stats.pearsonr(x, y)
            spearman = stats.spearmanr(x, y)
            table["pearson_r"][i, j], table["pearson_p"][i, j] = pearson.statistic, pearson.pvalue
            table["spearman_r"][i, j], table["spearman_p"][i, j] = spearman.statistic, spearman.pvalue
            if n_resamples > 0:
                table["pearson_ci"][i, j] = _bootstrap_ci(x, y, _pearson, n_resamples, seed, confidence)
                table["spearman_ci"][i, j] = _bootstrap_ci(x, y, _spearman, n_resamples, seed, confidence)
    return table


TABLE = ("attributes", "targets", "pearson_r", "pearson_p", "pearson_ci", "spearman_r", "spearman_p", "spearman_ci")


def store_reader(read_path, has_path, layer: str) -> Reader:
    """read(section, name) over a finished store's layer, from ``read_path(path)`` and ``has_path(path)`` (a
    StoreReader's, or the app's cached ones); None where the store lacks the dataset."""
    def read(section: str, name: str):
        path = layer_path(layer, section, name)
        return read_path(path) if has_path(path) else None
    return read


def coefficients(read: Reader, attributes: dict, targets: dict) -> dict:
    """The stored relations table, or (for a store computed before the relations stage) the coefficients computed
    now, without bootstrap intervals."""
    if read("relations", "pearson_r") is not None:
        return {name: read("relations", name) for name in TABLE}
    return relation_table(attributes, targets, n_resamples=0)
