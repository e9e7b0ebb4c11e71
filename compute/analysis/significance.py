"""Which drops are more than sampling noise: paired counts, McNemar's exact test, Benjamini-Hochberg q-values.

A class drop rests on paired outcomes of the same n_k images before and after the ablation: ``lost`` were right before
and wrong after, ``gained`` the reverse, and drop = (lost - gained) / n_k. Images right (or wrong) both times carry no
information about the ablation. Under the null hypothesis that the ablation changes nothing systematically, each
discordant image is lost or gained with probability 1/2: McNemar's exact test is the two-sided binomial test of
``lost`` in ``lost + gained`` trials at p = 0.5 (a pair with no discordant image has p = 1).

A layer's U x K tests are corrected together for the false discovery rate (Benjamini-Hochberg), so "q < 0.05" means
that among the drops so marked, at most 5% are expected to be noise.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

LEVEL = 0.05  # the default false discovery rate at which a drop is called significant


def paired_counts(base_right, ablated_right, onehot):
    """Per ablation and class, images lost and gained: ``base_right`` [B] and ``ablated_right`` [S, B] booleans,
    ``onehot`` [B, K] of the images' classes (torch or numpy). Returns (lost, gained), each [S, K]."""
    lost = (base_right[None, :] & ~ablated_right).double() @ onehot
    gained = (~base_right[None, :] & ablated_right).double() @ onehot
    return lost, gained


def mcnemar_p(lost: np.ndarray, gained: np.ndarray) -> np.ndarray:
    """Two-sided exact McNemar p-value per cell, equal to ``scipy.stats.binomtest(lost, lost + gained).pvalue``.

    At p = 0.5 the binomial distribution is symmetric, so binomtest's two-sided p-value (the probability of outcomes
    no likelier than the one seen) is twice the smaller tail, capped at 1; computed here for all cells at once
    (binomtest takes one cell per call, and a paper-sized layer has 100,000 cells).
    """
    lost = np.asarray(lost, np.int64)
    gained = np.asarray(gained, np.int64)
    trials = lost + gained
    tail = stats.binom.cdf(np.minimum(lost, gained), trials, 0.5)
    return np.where(trials > 0, np.minimum(1.0, 2.0 * tail), 1.0)


def q_values(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values over every cell of ``p`` together, same shape."""
    p = np.asarray(p, np.float64)
    if p.size == 0:
        return p.copy()
    return stats.false_discovery_control(p.ravel(), method="bh").reshape(p.shape)


def drop_tests(lost: np.ndarray, gained: np.ndarray) -> dict:
    """p- and q-values of a layer's class drops [..., U, K] (one family per leading index) and of its overall drops
    [..., U] from the class counts summed."""
    p = mcnemar_p(lost, gained)
    overall_p = mcnemar_p(lost.sum(-1), gained.sum(-1))
    if p.ndim == 2:
        return {"p_value": p, "q_value": q_values(p), "overall_p_value": overall_p,
                "overall_q_value": q_values(overall_p)}
    return {"p_value": p, "q_value": np.stack([q_values(x) for x in p]), "overall_p_value": overall_p,
            "overall_q_value": np.stack([q_values(x) for x in overall_p])}


def significant_drops(q_value: np.ndarray, drop: np.ndarray, level: float = LEVEL) -> np.ndarray:
    """Cells whose drop is positive (accuracy lost) and significant at ``level``; a significant negative drop is a
    class the ablation helps, not a drop."""
    return (np.asarray(q_value) < level) & (np.asarray(drop) > 0)
