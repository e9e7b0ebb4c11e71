"""Dissection: how many units of each layer detect a concept (best-concept IoU above a threshold), by category, and
the detectors listed by concept, as in Network Dissection's summaries."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, grid, guarded, side_by_side, store_and_layer, table
from app.unit_sections import section_attrs
from figures.dissection import category_counts, concept_table, counts_chart, detector_frame, union_rule_sentence


def layer_counts(store, threshold: float) -> pd.DataFrame:
    """Detectors per layer and category, over every dissected layer of the store."""
    names = loaders.array(store.path, "concepts/names")
    categories = loaders.array(store.path, "concepts/categories")
    return category_counts({layer: detector_frame(loaders.layer_array(store.path, layer, "dissection", "best_concept"),
                                                  loaders.layer_array(store.path, layer, "dissection", "best_iou"),
                                                  names, categories, threshold)
                            for layer in store.layers if store.has_section(layer, "dissection")})


def open_unit(store, layer: str, detectors: pd.DataFrame) -> None:
    """A picker over the layer's detectors (best IoU first) that jumps to the Unit page."""
    ranked = detectors.sort_values("IoU", ascending=False)
    labels = {int(row.unit): f"unit {row.unit} · {row.concept} ({row.category}) · IoU {row.IoU:.3f}"
              for row in ranked.itertuples()}
    cols = st.columns([3, 1])
    unit = cols[0].selectbox("Open a detector unit", list(labels), format_func=labels.get,
                             key=f"dissection_unit-{store.name}")
    if cols[1].button("Open unit", key=f"dissection_open-{store.name}") and unit is not None:
        st.switch_page("views/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})


def layer_view(store, layer: str, threshold: float) -> None:
    """Detector counts for every layer of one store, and its chosen layer's detectors grouped by concept."""
    attrs = section_attrs(store, layer, "dissection")
    names = loaders.array(store.path, "concepts/names")
    categories = loaders.array(store.path, "concepts/categories")
    best = loaders.layer_array(store.path, layer, "dissection", "best_concept")
    best_iou = loaders.layer_array(store.path, layer, "dissection", "best_iou")
    detectors = detector_frame(best, best_iou, names, categories, threshold)
    cols = grid(4)
    cols[0].metric("Units", len(best))
    cols[1].metric("Detectors", len(detectors), help=f"best-concept IoU above {threshold:.2f}")
    cols[2].metric("Distinct concepts", detectors["concept"].nunique())
    cols[3].metric("Median best IoU", f"{float(np.median(best_iou)):.3f}")
    st.subheader("Detector units per layer, by category")
    counts = layer_counts(store, threshold)
    st.altair_chart(counts_chart(counts, store.layers), width="stretch")
    chart_downloads(counts_chart(counts, store.layers).properties(title=f"{store.name}: detectors (IoU > {threshold})"),
                    f"{store.name}-detectors", counts)
    st.caption(f"Threshold T_u: the top {attrs.get('quantile', 0.005)} quantile of each unit over "
               f"{attrs.get('concept_images', '?')} concept images; a unit is counted under its best concept's "
               "category.")
    st.caption(union_rule_sentence(attrs.get("union_rule")))
    st.subheader(f"{layer}: units by concept")
    table(concept_table(detectors), f"{store.name}-{layer}-concepts", hide_index=True,
          column_config={"best IoU": st.column_config.NumberColumn(format="%.3f")})
    if detectors.empty:
        st.info("No unit passes this threshold: lower it to see the closest units.")
        return
    open_unit(store, layer, detectors)


def render() -> None:
    chosen = store_and_layer("Dissection: units that detect concepts", "dissection")
    if chosen is None:
        return
    store, layer = chosen
    attrs = section_attrs(store, layer, "dissection")
    threshold = st.slider("IoU threshold for a detector", 0.0, 0.3, float(attrs.get("iou_threshold", 0.04)), 0.01,
                          key="dissection_threshold")
    side_by_side(store, layer, "dissection", lambda shown, layer: layer_view(shown, layer, threshold))


guarded(render)
