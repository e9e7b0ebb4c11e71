"""Attributes (the paper's Fig. 5): every scalar unit attribute against the overall drop and the max class drop.

Brushing a range in any panel selects those units in every panel and lists them; clicking a point opens that unit.
A ranking table orders the units by any attribute or drop and exports as CSV.
"""

from __future__ import annotations

import warnings

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, compare_store, guarded, store_and_layer, table
from compute.relations import CONFIDENCE, TARGETS, coefficients, drop_targets, scalar_attributes, store_reader
from figures.attributes import coefficient_frame, scatter_grid, unit_frame

TARGET_NAMES = [name for name, *_ in TARGETS]


def brushed_units(frame: pd.DataFrame, brush: dict) -> pd.DataFrame:
    """Units inside the brushed range of every brushed field (the fields of the panel that was brushed)."""
    mask = np.ones(len(frame), bool)
    for field, bounds in brush.items():
        if field in frame and len(bounds) == 2:
            mask &= frame[field].between(min(bounds), max(bounds)).to_numpy()
    return frame[mask]


def ranking(frame: pd.DataFrame, store_name: str, layer: str) -> None:
    columns = [c for c in frame.columns if c not in ("unit", "most hurt class")]
    cols = st.columns([2, 1])
    key = cols[0].selectbox("Rank units by", columns, index=columns.index("max class drop"), key="rank_by")
    ascending = cols[1].toggle("Ascending", value=False, key="rank_ascending")
    ranked = frame.sort_values(key, ascending=ascending, kind="stable").reset_index(drop=True)
    ranked.insert(0, "rank", np.arange(1, len(ranked) + 1))
    table(ranked, f"{store_name}-{layer}-units", hide_index=True, width="stretch")


def layer_data(store, layer: str) -> tuple[pd.DataFrame, dict, list[str]]:
    """The per-unit frame, the coefficient table and the attributes it covers, for one store's layer."""
    store.require(layer, "ablation")
    read = store_reader(lambda path: loaders.array(store.path, path), store.has, layer)
    attributes, targets = scalar_attributes(read), drop_targets(read)
    coefficients_table = coefficients(read, attributes, targets)
    shown = [name for name in attributes if name in list(coefficients_table["attributes"])]
    frame = unit_frame(attributes, targets, loaders.layer_array(store.path, layer, "ablation", "class_drop"),
                       list(store.classes))
    return frame, coefficients_table, shown


def coefficient_table(store, layer: str, coefficients_table: dict) -> None:
    table(coefficient_frame(coefficients_table, CONFIDENCE), f"{store.name}-{layer}-coefficients", hide_index=True,
          width="stretch", column_config={c: st.column_config.NumberColumn(format="%.3g") for c in
                                          ("Pearson r", "Pearson r p", "Spearman ρ", "Spearman ρ p")})
    if not store.has(f"layers/{layer}/relations/pearson_r"):
        st.caption("Computed here without bootstrap intervals: rerun `python -m compute.all` for the stored table.")


def comparison(other, layer: str) -> None:
    """The compared store's Fig. 5 and coefficients for the same layer, below the main store's."""
    st.divider()
    st.header(f"Compared with {other.name}")
    if layer not in other.layers or not other.has_section(layer, "attributes"):
        st.info(f"{other.name} has no attributes for layer {layer}.")
        return
    frame, coefficients_table, shown = layer_data(other, layer)
    chart = scatter_grid(frame, shown, TARGET_NAMES, coefficients_table, interactive=False)
    st.altair_chart(chart)
    chart_downloads(chart, f"{other.name}-{layer}-fig5", frame)
    coefficient_table(other, layer, coefficients_table)


def render() -> None:
    chosen = store_and_layer("Attributes against ablation", "attributes")
    if chosen is None:
        return
    store, layer = chosen
    frame, coefficients_table, shown = layer_data(store, layer)
    if "max concept IoU" not in shown:
        st.caption("No concept IoU for this layer (the dissection stage has not run on it).")
    with warnings.catch_warnings():
        # One brush and one click selection span all panels on purpose: Altair merges the copies into one shared
        # parameter and says so.
        warnings.filterwarnings("ignore", message="Automatically deduplicated selection parameter")
        event = st.altair_chart(scatter_grid(frame, shown, TARGET_NAMES, coefficients_table), on_select="rerun",
                                key=f"attributes-{layer}")
    chart_downloads(scatter_grid(frame, shown, TARGET_NAMES, coefficients_table, interactive=False),
                    f"{store.name}-{layer}-fig5", frame)
    selection = event.get("selection", {}) if event else {}
    if selection.get("pick"):
        unit = int(selection["pick"][0]["unit"])
        st.switch_page("views/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})
    st.caption("Top row: overall accuracy drop; bottom row: max class accuracy drop, in points. Drag to select "
               "units in a range, click a point to open that unit.")
    if selection.get("brush"):
        chosen = brushed_units(frame, selection["brush"])
        st.subheader(f"{len(chosen)} units in the selected range")
        table(chosen.sort_values("max class drop", ascending=False), f"{store.name}-{layer}-selected",
              hide_index=True, width="stretch")
    st.subheader("Coefficients")
    coefficient_table(store, layer, coefficients_table)
    st.subheader("Ranking")
    ranking(frame, store.name, layer)
    other = compare_store()
    if other is not None:
        comparison(other, layer)


guarded(render)
