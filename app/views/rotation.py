"""Rotation (the paper's Fig. 7): ablating units against ablating random directions of the same layer.

If units were an arbitrary basis, a random direction's ablation would hurt single classes as much as a unit's. Each
curve sorts its own values (largest first), so the two distributions are compared rank by rank; the random curve is the
mean over the rotation seeds, with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, grid, guarded, side_by_side, split, store_and_layer, table
from figures.rotation import curve_chart, curves, sorted_band, summary_row


def layer_curves(store, layer: str) -> dict[str, dict[str, np.ndarray]]:
    return curves(*(loaders.layer_array(store.path, layer, section, name) for section, name in (
        ("ablation", "class_drop"), ("ablation", "overall_drop"), ("rotation", "class_drop"),
        ("rotation", "overall_drop"))))


def layer_view(store, layer: str) -> None:
    """One store's layer: headline numbers and the two sorted curves, units against random directions."""
    store.require(layer, "ablation")
    layer_data = layer_curves(store, layer)
    row = summary_row(layer, layer_data)
    cols = grid(4)
    cols[0].metric("Median max class drop, units", f"{row['median max class drop, units']:.1f} pts")
    cols[1].metric("Median max class drop, random", f"{row['median max class drop, random']:.1f} pts",
                   help=f"mean over {row['rotations']} random rotation(s)")
    cols[2].metric("Units / random", f"{row['ratio']:.2f}x" if np.isfinite(row["ratio"]) else "n/a",
                   help="median max class drop of units over that of random directions")
    cols[3].metric("Median overall drop, units vs random",
                   f"{row['median overall drop, units']:.2f} / {row['median overall drop, random']:.2f} pts")
    places = (st.container(), st.container()) if split() else st.columns(2)  # stacked in half a page
    for column, name in zip(places, ("max class drop", "overall drop")):
        with column:
            chart = curve_chart(layer_data[name], name)
            st.altair_chart(chart, width="stretch")
            numbers = pd.concat([sorted_band(values).assign(kind=kind) for kind, values in layer_data[name].items()])
            chart_downloads(chart.properties(title=f"{store.name} {layer}: {name}"),
                            f"{store.name}-{layer}-fig7-{name.replace(' ', '-')}", numbers)


def render() -> None:
    chosen = store_and_layer("Units against random directions", "rotation")
    if chosen is None:
        return
    store, layer = chosen
    side_by_side(store, layer, "rotation", layer_view)
    st.caption("Ablating direction j of a random orthogonal basis Q removes q_j (q_j^T a) from the activation a at "
               "every position; a unit is the special case Q = identity. A units curve above the random one means "
               "units are more class-specific than arbitrary directions of the same layer.")
    rows = [summary_row(other, layer_curves(store, other)) for other in store.layers
            if store.has_section(other, "rotation") and store.has_section(other, "ablation")]
    st.subheader("All layers")
    table(pd.DataFrame(rows).set_index("layer"), f"{store.name}-rotation-summary", column_config={
        name: st.column_config.NumberColumn(format="%.2f") for name in rows[0] if name not in ("layer", "rotations")})


guarded(render)
