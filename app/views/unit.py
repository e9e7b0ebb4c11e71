"""Unit: one unit's class accuracy drops, its attributes, and (when computed) its top images and concept."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import (chart_downloads, choose_layer, compare_store, current_store, from_link, guarded, link_refused,
                        linked_select, significance_level, table, to_link)
from compute.analysis.relations import folded_l1
from compute.analysis.significance import significant_drops
from store.schema import layer_path

TOP_CLASSES = 25


def choose_unit(units: int) -> int:
    """The unit picker; a linked unit outside the layer shows the nearest one, a malformed link keeps the current
    unit, and either says so."""
    clamped = []

    def parse(text: str) -> int:
        number = int(text)  # ValueError for "abc" and "3.7"
        if not 0 <= number < units:
            clamped.append(text)
        return min(max(number, 0), units - 1)

    refused = from_link("unit", "unit", parse)
    if st.session_state.get("unit", 0) >= units:
        st.session_state["unit"] = units - 1  # kept from a wider layer
    unit = int(st.number_input("Unit", min_value=0, max_value=units - 1, step=1, key="unit",
                               **({} if "unit" in st.session_state else {"value": 0})))
    to_link("unit", "unit", str(unit))
    if clamped:
        link_refused("unit", clamped[0], f"outside this layer's units 0 to {units - 1}", f"unit {unit}")
    elif refused is not None:
        link_refused("unit", refused, "which is not a unit number", f"unit {unit}")
    return unit


def drop_chart(frame: pd.DataFrame, focus: str | None) -> alt.Chart:
    """Bars of class accuracy drops in ``frame`` order; the focused class outlined; where the frame says which drops
    are significant, the others pale."""
    marked = "significant" in frame
    tooltip = ["class", alt.Tooltip("drop (%):Q", format=".1f")]
    if marked:
        tooltip += ["lost:Q", "gained:Q", alt.Tooltip("q:Q", format=".3g"), "significant:N"]
    return alt.Chart(frame).mark_bar().encode(
        x=alt.X("class:N", sort=alt.EncodingSortField("rank"), title=None),
        y=alt.Y("drop (%):Q", title="class accuracy drop (points)"),
        color=alt.condition(alt.datum["drop (%)"] > 0, alt.value("#c0392b"), alt.value("#2e86c1")),
        opacity=alt.condition(alt.datum["significant"], alt.value(1.0), alt.value(0.35)) if marked else alt.value(1.0),
        stroke=alt.condition(alt.datum["class"] == (focus or ""), alt.value("black"), alt.value(None)),
        strokeWidth=alt.value(2),
        tooltip=tooltip,
    ).properties(height=320)


def evidence(store, layer: str, unit: int) -> dict | None:
    """The unit's paired counts and q-values per class, or None in a store written before they were kept."""
    names = ("lost", "gained", "q_value")
    if not all(store.has(layer_path(layer, "ablation", name)) for name in names):
        return None
    return {name: loaders.layer_array(store.path, layer, "ablation", name, unit) for name in names}


def attribute_rows(store, layer: str, unit: int, classes: list[str]) -> list[tuple[str, str]]:
    rows = []
    if store.has_section(layer, "attributes"):
        l1_attrs = loaders.group_attrs(store.path, layer_path(layer, "attributes", "l1"))
        label = "BN-folded L1 norm" if folded_l1(l1_attrs) else "L1 norm"
        l1 = float(loaders.layer_array(store.path, layer, 'attributes', 'l1', unit))
        rows.append((label, "not applicable (no conv writes this layer's channels)" if l1_attrs.get("not_applicable")
                     else f"{l1:.3f}"))
        for name, label in (("selectivity", "class selectivity"), ("correlation", "class correlation")):
            vector = loaders.layer_array(store.path, layer, "attributes", name, unit)
            best = int(np.argmax(vector))
            rows.append((label, f"{vector[best]:.3f} (max, for {classes[best]})"))
        for name in ("sparsity", "act_mean", "act_std"):
            path = layer_path(layer, "attributes", name)
            if store.has(path):
                rows.append((name.replace("act_", "activation "), f"{float(loaders.array(store.path, path, unit)):.3f}"))
    return rows


def counted(found: dict | None, index: int) -> str:
    """'lost 5, gained 1, q = 0.03' for a class, or '' without the counts."""
    if found is None:
        return ""
    return (f"{int(found['lost'][index])} images lost, {int(found['gained'][index])} gained, "
            f"q = {found['q_value'][index]:.3g}")


def drops_view(store, layer: str, unit: int, focus: str | None, level: float) -> None:
    """The unit's headline drops and its classes sorted by drop, with the images each drop rests on, for one store."""
    classes = list(store.classes)
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop", unit)
    overall = float(loaders.layer_array(store.path, layer, "ablation", "overall_drop", unit))
    found = evidence(store, layer, unit)
    significant = None if found is None else significant_drops(found["q_value"], class_drop, level)
    worst = int(np.argmax(class_drop))
    cols = st.columns(4)
    cols[0].metric("Overall accuracy drop", f"{100 * overall:.2f} pts")
    cols[1].metric("Max class drop", f"{100 * class_drop[worst]:.1f} pts",
                   help=f"class {classes[worst]}" + (f": {counted(found, worst)}" if found else ""))
    cols[2].metric("Classes hurt by ≥ 5 pts", int((class_drop >= 0.05).sum()))
    cols[3].metric(f"Significant class drops (q < {level})", "—" if significant is None else int(significant.sum()),
                   help="exact McNemar test per class on the images the ablation flips each way, Benjamini-Hochberg "
                        "over the layer's units x classes" if found else "this store predates the significance "
                        "tests: recompute it with `python -m compute.all --force`")
    if focus in classes:
        index = classes.index(focus)
        rank = int((class_drop > class_drop[index]).sum()) + 1
        st.metric(f"Drop for {focus}", f"{100 * class_drop[index]:.1f} pts",
                  help=f"rank {rank} of {len(classes)} classes" + (f"; {counted(found, index)}" if found else ""))
    order = np.argsort(-class_drop, kind="stable")
    shown = np.concatenate([order[:TOP_CLASSES], order[-5:]]) if len(order) > TOP_CLASSES + 5 else order
    if focus in classes and classes.index(focus) not in shown:
        shown = np.append(shown, classes.index(focus))
    frame = pd.DataFrame({"class": [classes[i] for i in shown], "drop (%)": 100 * class_drop[shown],
                          "rank": np.arange(len(shown))})
    everything = pd.DataFrame({"class": classes, "drop (%)": 100 * class_drop})
    if found is not None:
        for table_ in (frame, everything):
            rows = shown if table_ is frame else np.arange(len(classes))
            table_["lost"] = found["lost"][rows]
            table_["gained"] = found["gained"][rows]
            table_["q"] = found["q_value"][rows]
            table_["significant"] = significant[rows]
    st.subheader("Classes sorted by accuracy drop when this unit is removed")
    st.altair_chart(drop_chart(frame, focus), width="stretch")
    if found is not None:
        st.caption(f"Solid bars: drops with q < {level}; pale bars may be sampling noise. Hover a bar for the images "
                   "of the class the ablation made wrong (lost) and right (gained); drop = (lost - gained) / images "
                   "of the class.")
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
    level = significance_level()
    other = compare_store()
    reason = None if other is None else same_unit_elsewhere(store, other, layer, unit)
    if other is None or reason:
        drops_view(store, layer, unit, focus or None, level)
        if reason:
            st.info(reason)
    else:  # the same weights on another validation set (or computed with other settings): the same unit
        for column, shown in zip(st.columns(2), (store, other)):
            with column:
                st.subheader(shown.name)
                drops_view(shown, layer, unit, focus or None, level)
    from app.flip_sections import flips_section

    flips_section(store, layer, unit, focus or None, level)
    rows = attribute_rows(store, layer, unit, classes)
    if rows:
        st.subheader("Attributes")
        table(pd.DataFrame(rows, columns=["attribute", "value"]), f"{store.name}-{layer}-unit{unit}-attributes",
              hide_index=True)
    from app.unit_sections import SECTIONS

    for section in SECTIONS:
        section(store, layer, unit)


guarded(render)
