"""Unit: one unit's class accuracy drops, its attributes, and (when computed) its top images and concept."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import choose_layer, current_store, guarded

TOP_CLASSES = 25


def choose_unit(units: int) -> int:
    wanted = st.query_params.get("unit", st.session_state.get("unit", 0))
    try:
        default = min(max(int(wanted), 0), units - 1)
    except (TypeError, ValueError):
        default = 0
    unit = int(st.number_input("Unit", min_value=0, max_value=units - 1, value=default, step=1))
    st.query_params["unit"] = str(unit)
    st.session_state["unit"] = unit
    return unit


def attribute_rows(store, layer: str, unit: int, classes: list[str]) -> list[tuple[str, str]]:
    rows = []
    if store.has_section(layer, "attributes"):
        rows.append(("L1 norm", f"{float(loaders.layer_array(store.path, layer, 'attributes', 'l1', unit)):.3f}"))
        for name, label in (("selectivity", "class selectivity"), ("correlation", "class correlation")):
            vector = loaders.layer_array(store.path, layer, "attributes", name, unit)
            best = int(np.argmax(vector))
            rows.append((label, f"{vector[best]:.3f} (max, for {classes[best]})"))
        for name in ("sparsity", "act_mean", "act_std"):
            path = f"layers/{layer}/attributes/{name}"
            if store.has(path):
                rows.append((name.replace("act_", "activation "), f"{float(loaders.array(store.path, path, unit)):.3f}"))
    return rows


def render() -> None:
    store = current_store()
    if store is None:
        return
    layer = choose_layer(store, "ablation")
    if layer is None:
        return
    classes = list(store.classes)
    units = int(loaders.layer_array(store.path, layer, "ablation", "overall_drop").shape[0])
    unit = choose_unit(units)
    st.title(f"{layer} · unit {unit}")
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop", unit)
    overall = float(loaders.layer_array(store.path, layer, "ablation", "overall_drop", unit))
    worst = int(np.argmax(class_drop))
    cols = st.columns(3)
    cols[0].metric("Overall accuracy drop", f"{100 * overall:.2f} pts")
    cols[1].metric("Max class drop", f"{100 * class_drop[worst]:.1f} pts", help=f"class {classes[worst]}")
    cols[2].metric("Classes hurt by ≥ 5 pts", int((class_drop >= 0.05).sum()))
    order = np.argsort(-class_drop, kind="stable")
    shown = np.concatenate([order[:TOP_CLASSES], order[-5:]]) if len(order) > TOP_CLASSES + 5 else order
    frame = pd.DataFrame({"class": [classes[i] for i in shown], "drop (%)": 100 * class_drop[shown],
                          "rank": np.arange(len(shown))})
    chart = alt.Chart(frame).mark_bar().encode(
        x=alt.X("class:N", sort=alt.EncodingSortField("rank"), title=None),
        y=alt.Y("drop (%):Q", title="class accuracy drop (points)"),
        color=alt.condition(alt.datum["drop (%)"] > 0, alt.value("#c0392b"), alt.value("#2e86c1")),
        tooltip=["class", alt.Tooltip("drop (%):Q", format=".1f")],
    ).properties(height=320)
    st.subheader("Classes sorted by accuracy drop when this unit is removed")
    st.altair_chart(chart, use_container_width=True)
    rows = attribute_rows(store, layer, unit, classes)
    if rows:
        st.subheader("Attributes")
        st.table(pd.DataFrame(rows, columns=["attribute", "value"]).set_index("attribute"))
    from app.unit_sections import SECTIONS

    for section in SECTIONS:
        section(store, layer, unit)


guarded(render)
