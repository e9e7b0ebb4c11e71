"""Overview (the paper's Fig. 3): per layer, units sorted by their max class accuracy drop."""

from __future__ import annotations

import altair as alt
import numpy as np
import streamlit as st

from app import loaders
from app.common import chart_downloads, grid, guarded, side_by_side, store_and_layer
from figures.overview import curve_chart, curve_frame, median_ratio


def layer_view(store, layer: str) -> None:
    """Fig. 3 for one store's layer, with its headline numbers; a click on a point opens that unit."""
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop")
    overall = loaders.layer_array(store.path, layer, "ablation", "overall_drop")
    base = loaders.layer_array(store.path, layer, "ablation", "baseline_class_acc")
    max_drop = class_drop.max(1)
    ratio = median_ratio(class_drop, overall, store.attrs.get("num_images", 1))
    cols = grid(4)
    cols[0].metric("Units", len(overall))
    cols[1].metric("Baseline accuracy", f"{100 * float(np.mean(base)):.1f}%")
    cols[2].metric("Median max class drop", f"{100 * np.median(max_drop):.1f} pts")
    cols[3].metric("Median overall drop", f"{100 * np.median(overall):.2f} pts",
                   help="Max class drop is typically many times the overall drop: "
                        f"median ratio {ratio:.1f}x in this layer")
    frame = curve_frame(class_drop, overall)
    pick = alt.selection_point(fields=["unit"], name="pick", on="click")
    event = st.altair_chart(curve_chart(frame, pick=pick), width="stretch", on_select="rerun",
                            key=f"overview-{store.name}-{layer}")
    chart_downloads(curve_chart(frame, title=f"{store.name} {layer}"), f"{store.name}-{layer}-fig3", frame)
    picked = (event or {}).get("selection", {}).get("pick")
    if picked:
        unit = int(picked[0]["unit"])
        st.switch_page("views/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})


def render() -> None:
    chosen = store_and_layer("Overview: class accuracy drop of single units", "ablation")
    if chosen is None:
        return
    store, layer = chosen
    side_by_side(store, layer, "ablation", layer_view)
    st.caption("Click a point to open that unit. Drops are baseline minus ablated accuracy on the validation set.")


guarded(render)
