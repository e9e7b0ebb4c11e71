"""Attributes (the paper's Fig. 5): every scalar unit attribute against the overall drop and the max class drop.

Brushing a range in any panel selects those units in every panel and lists them; clicking a point opens that unit.
A ranking table orders the units by any attribute or drop and exports as CSV.
"""

from __future__ import annotations

import warnings

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import choose_layer, current_store, guarded
from compute.relations import CONFIDENCE, TARGETS, drop_targets, relation_table, scalar_attributes

PANEL = 170
TARGET_NAMES = [name for name, *_ in TARGETS]


def layer_reader(store, layer: str):
    """read(section, name) for compute.relations: the layer's cached array, or None where the store lacks it."""
    def read(section: str, name: str):
        path = f"layers/{layer}/{section}/{name}"
        return loaders.array(store.path, path) if store.has(path) else None
    return read


def unit_frame(attributes: dict, targets: dict, class_drop: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per unit: its scalar attributes, its drops in percentage points, and the class it hurts most."""
    frame = pd.DataFrame({"unit": np.arange(len(class_drop))})
    for name, values in attributes.items():
        frame[name] = values
    for name, values in targets.items():
        frame[name] = 100 * values
    hurt = class_drop.max(1) > 0  # a unit whose ablation lowers no class hurts none (argmax would say class 0)
    frame["most hurt class"] = np.where(hurt, np.array(classes, dtype=object)[class_drop.argmax(1)], "none")
    return frame


def coefficients(store, layer: str, attributes: dict, targets: dict) -> dict:
    """The stored relations table, or (for a store computed before the relations stage) coefficients computed now
    without bootstrap intervals."""
    if store.has(f"layers/{layer}/relations/pearson_r"):
        names = ("attributes", "targets", "pearson_r", "pearson_p", "pearson_ci", "spearman_r", "spearman_p",
                 "spearman_ci")
        return {name: loaders.layer_array(store.path, layer, "relations", name) for name in names}
    return relation_table(attributes, targets, n_resamples=0)


def coefficient_frame(table: dict) -> pd.DataFrame:
    rows = []
    for i, attribute in enumerate(table["attributes"]):
        for j, target in enumerate(table["targets"]):
            row = {"attribute": attribute, "against": target}
            for method, symbol in (("pearson", "Pearson r"), ("spearman", "Spearman ρ")):
                low, high = table[f"{method}_ci"][i, j]
                row[symbol] = table[f"{method}_r"][i, j]
                row[f"{symbol} {round(100 * CONFIDENCE)}% CI"] = "" if np.isnan(low) else f"[{low:.2f}, {high:.2f}]"
                row[f"{symbol} p"] = table[f"{method}_p"][i, j]
            rows.append(row)
    return pd.DataFrame(rows)


def _lookup(table: dict, attribute: str, target: str, key: str) -> float:
    i = list(table["attributes"]).index(attribute)
    j = list(table["targets"]).index(target)
    return float(table[key][i, j])


def _title(r: float, rho: float) -> str:
    """Panel title; a constant attribute or drop (e.g. no unit changes accuracy) has no coefficient."""
    fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.2f}"  # noqa: E731
    return f"r = {fmt(r)}, ρ = {fmt(rho)}"


def scatter_grid(frame: pd.DataFrame, attributes: list[str], table: dict) -> alt.VConcatChart:
    """Fig. 5: a row per drop, a panel per attribute; one brush and one click selection shared by all panels."""
    brush = alt.selection_interval(name="brush")
    pick = alt.selection_point(name="pick", fields=["unit"], on="click")
    rows = []
    for target in TARGET_NAMES:
        panels = []
        for attribute in attributes:
            r, rho = _lookup(table, attribute, target, "pearson_r"), _lookup(table, attribute, target, "spearman_r")
            panels.append(alt.Chart(frame).mark_circle(size=28, opacity=0.8).encode(
                x=alt.X(f"{attribute}:Q", title=attribute, scale=alt.Scale(zero=False)),
                y=alt.Y(f"{target}:Q", title=f"{target} (pts)"),
                color=alt.condition(brush, alt.value("#1f77b4"), alt.value("#d0d0d0")),
                tooltip=["unit:Q", alt.Tooltip(f"{attribute}:Q", format=".3f"),
                         alt.Tooltip(f"{target}:Q", format=".2f"), "most hurt class:N"],
            ).add_params(brush, pick).properties(width=PANEL, height=PANEL, title=_title(r, rho)))
        rows.append(alt.hconcat(*panels))
    return alt.vconcat(*rows)


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
    st.dataframe(ranked, hide_index=True, width="stretch")
    st.download_button("Download CSV", ranked.to_csv(index=False).encode(), file_name=f"{store_name}-{layer}-units.csv",
                       mime="text/csv")


def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Attributes against ablation")
    layer = choose_layer(store, "attributes")
    if layer is None:
        return
    store.require(layer, "ablation")
    read = layer_reader(store, layer)
    attributes, targets = scalar_attributes(read), drop_targets(read)
    table = coefficients(store, layer, attributes, targets)
    shown = [name for name in attributes if name in list(table["attributes"])]
    frame = unit_frame(attributes, targets, loaders.layer_array(store.path, layer, "ablation", "class_drop"),
                       list(store.classes))
    if "max concept IoU" not in attributes:
        st.caption("No concept IoU for this layer (the dissection stage has not run on it).")
    with warnings.catch_warnings():
        # One brush and one click selection span all panels on purpose: Altair merges the copies into one shared
        # parameter and says so.
        warnings.filterwarnings("ignore", message="Automatically deduplicated selection parameter")
        event = st.altair_chart(scatter_grid(frame, shown, table), on_select="rerun", key=f"attributes-{layer}")
    selection = event.get("selection", {}) if event else {}
    if selection.get("pick"):
        unit = int(selection["pick"][0]["unit"])
        st.session_state["unit"] = unit
        st.switch_page("pages/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})
    st.caption("Top row: overall accuracy drop; bottom row: max class accuracy drop, in points. Drag to select "
               "units in a range, click a point to open that unit.")
    if selection.get("brush"):
        chosen = brushed_units(frame, selection["brush"])
        st.subheader(f"{len(chosen)} units in the selected range")
        st.dataframe(chosen.sort_values("max class drop", ascending=False), hide_index=True,
                     width="stretch")
    st.subheader("Coefficients")
    st.dataframe(coefficient_frame(table), hide_index=True, width="stretch",
                 column_config={c: st.column_config.NumberColumn(format="%.3g") for c in
                                ("Pearson r", "Pearson r p", "Spearman ρ", "Spearman ρ p")})
    if not store.has(f"layers/{layer}/relations/pearson_r"):
        st.caption("Computed here without bootstrap intervals: rerun `python -m compute.all` for the stored table.")
    st.subheader("Ranking")
    ranking(frame, store.name, layer)


guarded(render)
