"""Search units: by concept label, by the class a unit matters most for, or by an attribute's range, over every layer.

Every filter is a query parameter (``concept``, ``class``, ``attribute``, ``low``, ``high``), so a search is a link.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import current_store, from_link, guarded, linked_select, significance_level, table, to_link
from app.search_index import LEAST_Q, RANGED, matching, unit_index

def number(label: str, param: str, key: str, fallback: float, container) -> float:
    """A number input bound to query parameter ``param``; ``fallback`` (the data's bound) when the link has none."""
    from_link(key, param, float)
    value = container.number_input(label, key=key, format="%.4g",
                                   **({} if key in st.session_state else {"value": fallback}))
    to_link(key, param, f"{value:.6g}")
    return value


def filters(frame: pd.DataFrame, classes: list[str]) -> dict:
    """The three filters, each bound to a query parameter."""
    cols = st.columns(3)
    from_link("search_concept", "concept", str)
    concept = cols[0].text_input("Concept label contains", key="search_concept", disabled="concept" not in frame,
                                 placeholder="e.g. grass")
    to_link("search_concept", "concept", concept.strip())
    with cols[1]:
        target = linked_select("Matters most for class", [""] + classes, "class", "search_class",
                               format_func=lambda c: c or "any class")
    with cols[2]:
        attribute = linked_select("Attribute range on", [""] + [name for name in RANGED if name in frame],
                                  "attribute", "search_attribute", format_func=lambda a: a or "no range")
    low = high = None
    if st.session_state.get("_search_range_on", attribute) != attribute:
        for param in ("low", "high"):  # bounds of the previous attribute mean nothing for this one
            st.query_params.pop(param, None)
    st.session_state["_search_range_on"] = attribute
    if attribute:
        values = frame[attribute].to_numpy(dtype=float)
        bounds = st.columns(2)
        low = number("from", "low", f"search_low-{attribute}", float(np.nanmin(values)), bounds[0])
        high = number("to", "high", f"search_high-{attribute}", float(np.nanmax(values)), bounds[1])
    level = significance_level()
    from_link("search_significant", "significant", lambda text: text == "1")
    only = st.checkbox(f"Only units with a significant class drop (q < {level})", key="search_significant",
                       disabled=LEAST_Q not in frame, help=None if LEAST_Q in frame else "this store predates the "
                       "significance tests: recompute it with `python -m compute.all --force`")
    to_link("search_significant", "significant", "1" if only else "")
    return {"concept": concept.strip(), "target": target, "attribute": attribute or None, "low": low, "high": high,
            "significant_below": level if only else None}


def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Search units")
    frame = unit_index(str(store.path), loaders.mtime(store.path))
    if frame.empty:
        store.require(store.layers[0] if store.layers else "?", "ablation")
    found = matching(frame, **filters(frame, list(store.classes)))
    found = found.sort_values("max class drop", ascending=False, kind="stable")
    st.metric("Units found", f"{len(found)} of {len(frame)}")
    shown = found.assign(link=[f"unit?store={store.name}&layer={layer}&unit={unit}"
                               for layer, unit in zip(found["layer"], found["unit"])])
    table(shown, f"{store.name}-search", hide_index=True, width="stretch", column_config={
        "link": st.column_config.LinkColumn("open", display_text="open unit"),
        **{name: st.column_config.NumberColumn(format="%.3g" if name == LEAST_Q else "%.3f") for name in RANGED}})
    st.caption("Drops in points; the most hurt class is the one whose accuracy falls most when the unit is ablated "
               "(empty when none falls). Concept: the unit's best concept in Network Dissection. Least q: the smallest "
               "Benjamini-Hochberg q-value among the unit's class drops (exact McNemar tests): below the chosen level, "
               "the unit has a class drop beyond sampling noise.")


guarded(render)
