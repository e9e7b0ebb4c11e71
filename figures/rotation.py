"""Fig. 7: units against random directions of the same layer, each curve sorted largest first."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

UNITS, RANDOM = "units", "random directions"


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
    colour = alt.Color("kind:N", title=None, scale=alt.Scale(domain=[UNITS, RANDOM], range=["#c0392b", "#7f8c8d"]))
    base = alt.Chart(frame).encode(x=alt.X("rank:Q", title="rank (each curve sorted, largest first)"))
    band = base.transform_filter(alt.datum.kind == RANDOM).mark_area(opacity=0.25, color="#7f8c8d").encode(
        y="low:Q", y2="high:Q")
    line = base.mark_line().encode(
        y=alt.Y("mean:Q", title=f"{title} (points)"), color=colour,
        tooltip=["kind:N", "rank:Q", alt.Tooltip("mean:Q", format=".2f")])
    return (band + line).properties(height=320, title=title)
