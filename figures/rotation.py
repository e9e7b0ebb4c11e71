"""Fig. 7: units against random directions of the same layer, each curve sorted largest first, and the two compared
by tests rather than by medians (drops move in whole images per class, so medians of small sets tie).

``comparison`` asks two questions of a layer: what share of units and what share of random directions have at least
one significant class drop (positive, Benjamini-Hochberg q below the level; q-values per rotation for directions, over
the same U x K cells as the units'), and whether units' max class drops (and overall drops) tend to be larger than
random directions' (Mann-Whitney U, one-sided, random directions of all rotations pooled into one sample).
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
from scipy import stats

from compute.analysis.significance import LEVEL, significant_drops

UNITS, RANDOM = "units", "random directions"
ALTERNATIVE = "greater"  # units' drops larger than random directions' (the paper's claim, for both drops)
TESTED = ("max class drop", "overall drop")
EFFECT = "P(unit > random), ties ½"
TEST_NOTE = ("The Mann-Whitney test asks whether a unit's drop tends to be larger than a random direction's "
             "(one-sided, alternative 'greater', for the max class drop and for the overall drop; the random "
             "directions of all rotations pooled into one sample); drops move in steps of one image per class, so many "
             "values tie, and scipy's mannwhitneyu (method 'auto') then uses the normal approximation with the "
             "tie-corrected variance and a continuity correction (its exact test only where a sample has at most 8 "
             "values and none tie).")


def _column(drop: str, what: str) -> str:
    return f"{drop}: {what}"


def significant_share(drop: np.ndarray, q_value: np.ndarray | None, level: float) -> tuple[int | None, int]:
    """(how many of the rows have at least one significant class drop, how many rows), over every leading axis of
    ``drop`` [..., K] (all rotations' directions together); None for the count where the store has no q-values."""
    rows = int(np.prod(drop.shape[:-1]))
    if q_value is None:
        return None, rows
    return int(significant_drops(q_value, drop, level).any(-1).sum()), rows


def mann_whitney(units: np.ndarray, random: np.ndarray) -> dict:
    """One-sided Mann-Whitney U of units' values against random directions' (all rotations pooled), as
    ``scipy.stats.mannwhitneyu(units, random, alternative="greater")`` gives it: U (the units' statistic), the
    effect U / (n_units n_random) = P(unit > random) + P(tie) / 2, and the p-value (1 where every value ties)."""
    units, random = np.ravel(units).astype(np.float64), np.ravel(random).astype(np.float64)
    if units.size == 0 or random.size == 0:
        return {"U": np.nan, "effect": np.nan, "p": np.nan}
    result = stats.mannwhitneyu(units, random, alternative=ALTERNATIVE, method="auto")
    return {"U": float(result.statistic), "effect": float(result.statistic) / (units.size * random.size),
            "p": float(result.pvalue)}


def comparison(unit_drop: np.ndarray, unit_overall: np.ndarray, rot_drop: np.ndarray, rot_overall: np.ndarray,
               unit_q: np.ndarray | None = None, rot_q: np.ndarray | None = None, level: float = LEVEL) -> dict:
    """Units [U, K] / [U] against random directions [R, U, K] / [R, U] of a layer: the shares (%) with at least one
    significant class drop at ``level`` (None where the store lacks the q-values), and the Mann-Whitney tests of the
    max class drop and the overall drop (``mann_whitney``). Keys are the table's column names."""
    unit_found, units = significant_share(unit_drop, unit_q, level)
    rand_found, randoms = significant_share(rot_drop, rot_q, level)
    row = {"units": units, "rotations": int(rot_drop.shape[0]), "random directions": randoms,
           "units with a significant class drop": unit_found,
           "random directions with a significant class drop": rand_found,
           "units with a significant class drop (%)": None if unit_found is None else 100 * unit_found / units,
           "random directions with a significant class drop (%)": None if rand_found is None else
           100 * rand_found / randoms}
    for name, (a, b) in zip(TESTED, ((unit_drop.max(-1), rot_drop.max(-1)), (unit_overall, rot_overall))):
        test = mann_whitney(a, b)
        row[_column(name, "Mann-Whitney U")] = test["U"]
        row[_column(name, EFFECT)] = test["effect"]
        row[_column(name, "p (units > random)")] = test["p"]
    return row


def mann_whitney_frame(row: dict) -> pd.DataFrame:
    """The two tests of a ``comparison`` row, one line each, for a page or a report."""
    return pd.DataFrame([{"drop": name, "Mann-Whitney U": row[_column(name, "Mann-Whitney U")],
                          "units": row["units"], "random directions": row["random directions"],
                          EFFECT: row[_column(name, EFFECT)],
                          "p (one-sided, units > random)": row[_column(name, "p (units > random)")]}
                         for name in TESTED])


def format_p(p: float) -> str:
    return "—" if p is None or not np.isfinite(p) else f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def curves(unit_drop: np.ndarray, unit_overall: np.ndarray, rot_drop: np.ndarray, rot_overall: np.ndarray) -> dict:
    """{'max class drop' | 'overall drop': {UNITS: [1, C], RANDOM: [R, C]}} from a layer's [C, K] unit drops and
    [R, C, K] direction drops."""
    return {
        "max class drop": {UNITS: unit_drop.max(1)[None], RANDOM: rot_drop.max(2)},
        "overall drop": {UNITS: unit_overall[None], RANDOM: rot_overall},
    }


def sorted_band(values: np.ndarray) -> pd.DataFrame:
    """Rank-wise mean, min and max over rows of [R, C] values, each row sorted largest first (points)."""
    ordered = -np.sort(-np.atleast_2d(values), axis=1) * 100
    return pd.DataFrame({"rank": np.arange(ordered.shape[1]), "mean": ordered.mean(0), "low": ordered.min(0),
                         "high": ordered.max(0)})


def summary_row(layer: str, curves: dict) -> dict:
    """Medians and means (points) of units and random directions, and the ratio of medians, for the page's table."""
    unit_max, rand_max = (np.median(curves["max class drop"][k]) * 100 for k in (UNITS, RANDOM))
    unit_mean, rand_mean = (np.mean(curves["max class drop"][k]) * 100 for k in (UNITS, RANDOM))
    unit_all, rand_all = (np.median(curves["overall drop"][k]) * 100 for k in (UNITS, RANDOM))
    return {"layer": layer, "rotations": curves["max class drop"][RANDOM].shape[0],
            "median max class drop, units": unit_max, "median max class drop, random": rand_max,
            "ratio": unit_max / rand_max if rand_max > 0 else np.nan,
            # drops come in steps of one image per class: with few images the medians tie, the means still differ
            "mean max class drop, units": unit_mean, "mean max class drop, random": rand_mean,
            "median overall drop, units": unit_all, "median overall drop, random": rand_all}


def curve_chart(curves: dict[str, np.ndarray], title: str) -> alt.LayerChart:
    frame = pd.concat([sorted_band(values).assign(kind=kind) for kind, values in curves.items()], ignore_index=True)
    colour = alt.Color("kind:N", title=None, scale=alt.Scale(domain=[UNITS, RANDOM], range=["#c0392b", "#7f8c8d"]),
                       legend=alt.Legend(orient="bottom"))  # beside the plot it takes half of a half-page chart
    base = alt.Chart(frame).encode(x=alt.X("rank:Q", title="rank, largest first"))
    band = base.transform_filter(alt.datum.kind == RANDOM).mark_area(opacity=0.25, color="#7f8c8d").encode(
        y="low:Q", y2="high:Q")
    line = base.mark_line().encode(
        y=alt.Y("mean:Q", title=f"{title} (points)"), color=colour,
        tooltip=["kind:N", "rank:Q", alt.Tooltip("mean:Q", format=".2f")])
    return (band + line).properties(height=320, title=title)
