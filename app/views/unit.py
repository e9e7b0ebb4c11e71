"""Unit: one unit's class accuracy drops, its attributes, and (when computed) its top images and concept."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import (chart_downloads, choose_layer, compare_store, current_store, from_link, guarded, linked_select,
                        table, to_link)

TOP_CLASSES = 25


def choose_unit(units: int) -> int:
    from_link("unit", "unit", lambda text: min(max(int(text), 0), units - 1))
    if st.session_state.get("unit", 0) >= units:
        st.session_state["unit"] = units - 1  # kept from a wider layer
    unit = int(st.number_input("Unit", min_value=0, max_value=units - 1, step=1, key="unit",
                               **({} if "unit" in st.session_state else {"value": 0})))
    to_link("unit", "unit", str(unit))
    return unit


def drop_chart(frame: pd.DataFrame, focus: str | None) -> alt.Chart:
    """Bars of class accuracy drops in ``frame`` order; the focused class outlined."""
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("class:N", sort=alt.EncodingSortField("rank"), title=None),
        y=alt.Y("drop (%):Q", title="class accuracy drop (points)"),
        color=alt.condition(alt.datum["drop (%)"] > 0, alt.value("#c0392b"), alt.value("#2e86c1")),
        stroke=alt.condition(alt.datum["class"] == (focus or ""), alt.value("black"), alt.value(None)),
        strokeWidth=alt.value(2),
        tooltip=["class", alt.Tooltip("drop (%):Q", format=".1f")],
    ).properties(height=320)


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


def drops_view(store, layer: str, unit: int, focus: str | None) -> None:
    """The unit's headline drops and its classes sorted by drop, for one store."""
    classes = list(store.classes)
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop", unit)
    overall = float(loaders.layer_array(store.path, layer, "ablation", "overall_drop", unit))
    worst = int(np.argmax(class_drop))
    cols = st.columns(3)
    cols[0].metric("Overall accuracy drop", f"{100 * overall:.2f} pts")
    cols[1].metric("Max class drop", f"{100 * class_drop[worst]:.1f} pts", help=f"class {classes[worst]}")
    cols[2].metric("Classes hurt by ≥ 5 pts", int((class_drop >= 0.05).sum()))
    if focus in classes:
        index = classes.index(focus)
        rank = int((class_drop > class_drop[index]).sum()) + 1
        st.metric(f"Drop for {focus}", f"{100 * class_drop[index]:.1f} pts",
                  help=f"rank {rank} of {len(classes)} classes")
    order = np.argsort(-class_drop, kind="stable")
    shown = np.concatenate([order[:TOP_CLASSES], order[-5:]]) if len(order) > TOP_CLASSES + 5 else order
    if focus in classes and classes.index(focus) not in shown:
        shown = np.append(shown, classes.index(focus))
    frame = pd.DataFrame({"class": [classes[i] for i in shown], "drop (%)": 100 * class_drop[shown],
                          "rank": np.arange(len(shown))})
    st.subheader("Classes sorted by accuracy drop when this unit is removed")
    st.altair_chart(drop_chart(frame, focus), width="stretch")
    everything = pd.DataFrame({"class": classes, "drop (%)": 100 * class_drop})
    chart_downloads(drop_chart(frame, None).properties(title=f"{store.name} {layer} unit {unit}"),
                    f"{store.name}-{layer}-unit{unit}-class-drops", everything)


def same_unit_elsewhere(store, other, layer: str, unit: int) -> str | None:
    """Why unit ``unit`` of ``other`` is not this unit (None when it is: same weights, same layer, enough units)."""
    if other.attrs.get("weights_sha256") != store.attrs.get("weights_sha256"):
        return (f"{other.name} was computed from other weights: its unit {unit} is a different unit (units of "
                "separately trained networks do not correspond), so it is not shown here; compare layers instead.")
    if layer not in other.layers or not other.has_section(layer, "ablation"):
        return f"{other.name} has no ablation results for layer {layer}."
    return None


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
    focus = linked_select("Class", [""] + classes, "class", "unit_class", format_func=lambda c: c or "none picked")
    other = compare_store()
    reason = None if other is None else same_unit_elsewhere(store, other, layer, unit)
    if other is None or reason:
        drops_view(store, layer, unit, focus or None)
        if reason:
            st.info(reason)
    else:  # the same weights on another validation set (or computed with other settings): the same unit
        for column, shown in zip(st.columns(2), (store, other)):
            with column:
                st.subheader(shown.name)
                drops_view(shown, layer, unit, focus or None)
    rows = attribute_rows(store, layer, unit, classes)
    if rows:
        st.subheader("Attributes")
        table(pd.DataFrame(rows, columns=["attribute", "value"]), f"{store.name}-{layer}-unit{unit}-attributes",
              hide_index=True)
    from app.unit_sections import SECTIONS

    for section in SECTIONS:
        section(store, layer, unit)


guarded(render)
