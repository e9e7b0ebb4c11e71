"""Attributes (the paper's Fig. 5): every scalar unit attribute against the overall drop and the max class drop.

Drops are baseline minus ablated; the coefficient table adds each Pearson r in the paper's sign (its drop is ablated
minus baseline). A layer whose store says its L1 is BN-folded shows it as "BN-folded L1".

Brushing a range in any panel selects those units in every panel and lists them; clicking a point opens that unit.
A ranking table orders the units by any attribute or drop and exports as CSV.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, compare_store, guarded, store_and_layer, table
from compute.analysis.relations import (CONFIDENCE, FOLDED_L1, SIGN_NOTE, TARGETS, coefficients, drop_targets,
                                        folded_l1, name_folded_l1, scalar_attributes, store_reader)
from figures.attributes import PAPER_SIGN_COLUMN, coefficient_frame, scatter_grid, unit_frame
from store.schema import layer_path

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
    if folded_l1(l1_attrs(store, layer)):
        attributes, coefficients_table = name_folded_l1(attributes, coefficients_table)
    shown = [name for name in attributes if name in list(coefficients_table["attributes"])]
    frame = unit_frame(attributes, targets, loaders.layer_array(store.path, layer, "ablation", "class_drop"),
                       list(store.classes))
    return frame, coefficients_table, shown


@st.cache_data(show_spinner=False, max_entries=64)
def _l1_attrs(path: str, stamp: float, layer: str) -> dict:
    return loaders.reader(Path(path)).read_attrs(layer_path(layer, "attributes", "l1"))


def l1_attrs(store, layer: str) -> dict:
    """The attrs of the layer's L1 array (``source``, and since BN folding ``folded_batch_norm``, ``definition``),
    cached by store path and mtime like every other read."""
    return _l1_attrs(str(store.path), loaders.mtime(Path(store.path)), layer)


def l1_note(store, layer: str) -> str | None:
    """A line saying the layer's L1 is BN-folded, where its store says so (older stores do not say: no line)."""
    attrs = l1_attrs(store, layer)
    if attrs.get("not_applicable"):
        return f"L1 is not applicable to {layer}: {attrs.get('definition', 'no conv writes its channels')}."
    bn = folded_l1(attrs)
    if not bn:
        return None
    return (f"{FOLDED_L1}: |γ| / √(running var + ε) · ‖w‖₁ of {attrs.get('source', 'the conv')}'s filter through "
            f"batch norm {bn}; batch norm undoes any rescaling of the filter, so this, not the plain ‖w‖₁, is the "
            f"unit's own norm.")


def coefficient_table(store, layer: str, coefficients_table: dict) -> None:
    table(coefficient_frame(coefficients_table, CONFIDENCE), f"{store.name}-{layer}-coefficients", hide_index=True,
          width="stretch", column_config={c: st.column_config.NumberColumn(format="%.3g") for c in
                                          ("Pearson r", PAPER_SIGN_COLUMN, "Pearson r p", "Spearman ρ",
                                           "Spearman ρ p")})
    if not store.has(layer_path(layer, "relations", "pearson_r")):
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
    note = l1_note(other, layer)
    if note:
        st.caption(note)
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
    st.caption("Left column: overall accuracy drop; right column: max class accuracy drop, in points; a row per "
               "attribute (the paper's Fig. 5 has them in two rows). Drag to select "
               "units in a range, click a point to open that unit.")
    st.caption(SIGN_NOTE)
    note = l1_note(store, layer)
    if note:
        st.caption(note)
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
