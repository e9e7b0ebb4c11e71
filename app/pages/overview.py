"""Overview (the paper's Fig. 3): per layer, units sorted by their max class accuracy drop."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import choose_layer, current_store, guarded


def curve_frame(class_drop: np.ndarray, overall: np.ndarray) -> pd.DataFrame:
    """Long table of the three curves over units ranked by max class drop (drops in percentage points)."""
    max_drop = class_drop.max(1)
    order = np.argsort(-max_drop, kind="stable")
    rank = np.arange(len(order))
    series = {"max class drop": max_drop[order], "overall drop": overall[order], "min class drop": class_drop.min(1)[order]}
    frames = [pd.DataFrame({"rank": rank, "unit": order, "curve": name, "drop (%)": 100 * values})
              for name, values in series.items()]
    return pd.concat(frames, ignore_index=True)


def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Overview: class accuracy drop of single units")
    layer = choose_layer(store, "ablation")
    if layer is None:
        return
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop")
    overall = loaders.layer_array(store.path, layer, "ablation", "overall_drop")
    base = loaders.layer_array(store.path, layer, "ablation", "baseline_class_acc")
    max_drop = class_drop.max(1)
    ratio = np.median(max_drop / np.maximum(np.abs(overall), 1.0 / max(1, store.attrs.get("num_images", 1))))
    cols = st.columns(4)
    cols[0].metric("Units", len(overall))
    cols[1].metric("Baseline accuracy", f"{100 * float(np.mean(base)):.1f}%")
    cols[2].metric("Median max class drop", f"{100 * np.median(max_drop):.1f} pts")
    cols[3].metric("Median overall drop", f"{100 * np.median(overall):.2f} pts",
                   help="Max class drop is typically many times the overall drop: "
                        f"median ratio {ratio:.1f}x in this layer")
    frame = curve_frame(class_drop, overall)
    pick = alt.selection_point(fields=["unit"], name="pick", on="click")
    chart = (alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=25)).encode(
        x=alt.X("rank:Q", title="units sorted by max class drop"),
        y=alt.Y("drop (%):Q", title="accuracy drop (points)"),
        color=alt.Color("curve:N", sort=["max class drop", "overall drop", "min class drop"]),
        tooltip=["unit:Q", "curve:N", alt.Tooltip("drop (%):Q", format=".2f")],
    ).add_params(pick).properties(height=380))
    event = st.altair_chart(chart, use_container_width=True, on_select="rerun", key=f"overview-{layer}")
    picked = (event or {}).get("selection", {}).get("pick") if isinstance(event, dict) or hasattr(event, "get") else None
    if picked:
        unit = int(picked[0]["unit"])
        st.session_state["unit"] = unit
        st.switch_page("pages/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})
    st.caption("Click a point to open that unit. Drops are baseline minus ablated accuracy on the validation set.")


guarded(render)
