"""Rotation (the paper's Fig. 7): ablating units against ablating random directions of the same layer.

If units were an arbitrary basis, a random direction's ablation would hurt single classes as much as a unit's. Each
curve sorts its own values (largest first), so the two distributions are compared rank by rank; the random curve is the
mean over the rotation seeds, with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import choose_layer, current_store, guarded

UNITS, RANDOM = "units", "random directions"


def sorted_band(values: np.ndarray) -> pd.DataFrame:
    """Rank-wise mean, min and max over rows of [R, C] values, each row sorted largest first (points)."""
    ordered = -np.sort(-np.atleast_2d(values), axis=1) * 100
    return pd.DataFrame({"rank": np.arange(ordered.shape[1]), "mean": ordered.mean(0), "low": ordered.min(0),
                         "high": ordered.max(0)})


def layer_curves(store, layer: str) -> dict[str, dict[str, np.ndarray]]:
    """{'max class drop' | 'overall drop': {UNITS: [1, C], RANDOM: [R, C]}} for one layer."""
    unit_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop")
    unit_overall = loaders.layer_array(store.path, layer, "ablation", "overall_drop")
    rot_drop = loaders.layer_array(store.path, layer, "rotation", "class_drop")
    rot_overall = loaders.layer_array(store.path, layer, "rotation", "overall_drop")
    return {
        "max class drop": {UNITS: unit_drop.max(1)[None], RANDOM: rot_drop.max(2)},
        "overall drop": {UNITS: unit_overall[None], RANDOM: rot_overall},
    }


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


def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Units against random directions")
    layer = choose_layer(store, "rotation")
    if layer is None:
        return
    store.require(layer, "ablation")
    curves = layer_curves(store, layer)
    row = summary_row(layer, curves)
    cols = st.columns(4)
    cols[0].metric("Median max class drop, units", f"{row['median max class drop, units']:.1f} pts")
    cols[1].metric("Median max class drop, random", f"{row['median max class drop, random']:.1f} pts",
                   help=f"mean over {row['rotations']} random rotation(s)")
    cols[2].metric("Units / random", f"{row['ratio']:.2f}x" if np.isfinite(row["ratio"]) else "n/a",
                   help="median max class drop of units over that of random directions")
    cols[3].metric("Median overall drop, units vs random",
                   f"{row['median overall drop, units']:.2f} / {row['median overall drop, random']:.2f} pts")
    left, right = st.columns(2)
    left.altair_chart(curve_chart(curves["max class drop"], "max class drop"), width="stretch")
    right.altair_chart(curve_chart(curves["overall drop"], "overall drop"), width="stretch")
    st.caption("Ablating direction j of a random orthogonal basis Q removes q_j (q_j^T a) from the activation a at "
               "every position; a unit is the special case Q = identity. A units curve above the random one means "
               "units are more class-specific than arbitrary directions of the same layer.")
    rows = [summary_row(other, layer_curves(store, other)) for other in store.layers
            if store.has_section(other, "rotation") and store.has_section(other, "ablation")]
    st.subheader("All layers")
    st.dataframe(pd.DataFrame(rows).set_index("layer"), column_config={
        name: st.column_config.NumberColumn(format="%.2f") for name in rows[0] if name not in ("layer", "rotations")})


guarded(render)
