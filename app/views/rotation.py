"""Rotation (the paper's Fig. 7): ablating units against ablating random directions of the same layer.

If units were an arbitrary basis, a random direction's ablation would hurt single classes as much as a unit's. Each
curve sorts its own values (largest first), so the two distributions are compared rank by rank; the random curve is the
mean over the rotation seeds, with a band from the lowest to the highest seed.

The headline numbers are tests, not medians (drops move in steps of one image per class, so medians tie): the share of
units and of random directions with at least one significant class drop at the sidebar's level, and one-sided
Mann-Whitney tests of units' max class drops and overall drops against random directions' (``figures.rotation``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, guarded, side_by_side, significance_level, split, store_and_layer, table
from figures.rotation import (EFFECT, TEST_NOTE, TESTED, comparison, curve_chart, curves, format_p,
                              mann_whitney_frame, sorted_band, summary_row)
from store.schema import layer_path


def optional_array(store, layer: str, section: str, name: str):
    """A layer's dataset, or None in a store written before it existed."""
    return loaders.layer_array(store.path, layer, section, name) if store.has(layer_path(layer, section, name)) \
        else None


def layer_arrays(store, layer: str) -> dict[str, np.ndarray | None]:
    """'<section> <name>' -> the layer's drops of units (ablation) and random directions (rotation), and their
    q-values (None in a store written before the tests)."""
    arrays = {}
    for section in ("ablation", "rotation"):
        for name in ("class_drop", "overall_drop"):
            arrays[f"{section} {name}"] = loaders.layer_array(store.path, layer, section, name)
        arrays[f"{section} q_value"] = optional_array(store, layer, section, "q_value")
    return arrays


def layer_curves(store, layer: str) -> dict[str, dict[str, np.ndarray]]:
    arrays = layer_arrays(store, layer)
    return curves(*(arrays[f"{section} {name}"] for section in ("ablation", "rotation")
                    for name in ("class_drop", "overall_drop")))


def layer_row(store, layer: str, level: float) -> dict:
    """The layer's line of the All-layers table: the shares and the tests, then the medians (and their ratio)."""
    arrays = layer_arrays(store, layer)
    tests = comparison(arrays["ablation class_drop"], arrays["ablation overall_drop"], arrays["rotation class_drop"],
                       arrays["rotation overall_drop"], arrays["ablation q_value"], arrays["rotation q_value"], level)
    medians = summary_row(layer, layer_curves(store, layer))
    return {"layer": layer, **tests, **{key: value for key, value in medians.items() if key not in tests}}


def recompute_note(store) -> str:
    return (f"not in this store, recompute with `python -m compute.all --model {store.attrs.get('model', 'MODEL')} "
            "--force`")


def share_text(found, total: int) -> str:
    return "—" if found is None else f"{100 * found / total:.1f}%"


def quiet(text: str | None) -> dict:
    """A metric's second line: gray, no arrow (a count or a statistic, not a change)."""
    return {"delta": text, "delta_color": "off", "delta_arrow": "off"}


def layer_view(store, layer: str, level: float) -> None:
    """One store's layer: the shares and the tests, then the two sorted curves, units against random directions."""
    store.require(layer, "ablation")
    layer_data = layer_curves(store, layer)
    row = layer_row(store, layer, level)
    missing = recompute_note(store)
    units_found = row["units with a significant class drop"]
    random_found = row["random directions with a significant class drop"]
    cols = [column for _ in range(2) for column in st.columns(2)]  # labels too long for four in a row
    cols[0].metric("Significant class drop, units", share_text(units_found, row["units"]),
                   **quiet(None if units_found is None else f"{units_found} of {row['units']} units"),
                   help=f"Significance tests: {missing}" if units_found is None
                   else f"units with at least one class drop with q < {level}")
    cols[1].metric("Significant class drop, random",
                   share_text(random_found, row["random directions"]),
                   **quiet(None if random_found is None else f"{random_found} of {row['random directions']} "
                           f"directions"),
                   help=f"Significance tests: {missing}" if random_found is None
                   else f"the directions of all {row['rotations']} rotation(s) together (q-values per rotation) with "
                        f"at least one class drop with q < {level}")
    for column, name in zip(cols[2:], TESTED):
        column.metric(f"{name.capitalize()}, units > random", f"p = {format_p(row[f'{name}: p (units > random)'])}",
                      **quiet(f"Mann-Whitney U = {row[f'{name}: Mann-Whitney U']:.1f}"),
                      help=f"one-sided Mann-Whitney U of {row['units']} units against {row['random directions']} "
                           f"random directions ({row['rotations']} rotation(s) pooled); "
                           f"{EFFECT} = {row[f'{name}: {EFFECT}']:.2f}")
    if units_found is None or random_found is None:
        st.caption(f"Significance of single drops: {missing}.")
    tests = mann_whitney_frame(row)
    st.dataframe(tests, hide_index=True, width="stretch", column_config={
        "Mann-Whitney U": st.column_config.NumberColumn(format="%.1f"),
        EFFECT: st.column_config.NumberColumn(format="%.3f"),
        "p (one-sided, units > random)": st.column_config.NumberColumn(format="%.3g")})
    places = (st.container(), st.container()) if split() else st.columns(2)  # stacked in half a page
    for column, name in zip(places, ("max class drop", "overall drop")):
        with column:
            chart = curve_chart(layer_data[name], name)
            st.altair_chart(chart, width="stretch")
            numbers = pd.concat([sorted_band(values).assign(kind=kind) for kind, values in layer_data[name].items()])
            chart_downloads(chart.properties(title=f"{store.name} {layer}: {name}"),
                            f"{store.name}-{layer}-fig7-{name.replace(' ', '-')}", numbers)


def render() -> None:
    chosen = store_and_layer("Units against random directions", "rotation")
    if chosen is None:
        return
    store, layer = chosen
    level = significance_level()
    side_by_side(store, layer, "rotation", lambda shown, name: layer_view(shown, name, level))
    st.caption("Ablating direction j of a random orthogonal basis Q removes q_j (q_j^T a) from the activation a at "
               "every position; a unit is the special case Q = identity. A units curve above the random one means "
               "units are more class-specific than arbitrary directions of the same layer.")
    st.caption(f"A class drop is significant when it is positive and its q-value is below {level} (exact McNemar "
               "test on the images the ablation flips each way, Benjamini-Hochberg over the layer's units x classes; "
               "for random directions over each rotation's directions x classes). " + TEST_NOTE)
    rows = [layer_row(store, other, level) for other in store.layers
            if store.has_section(other, "rotation") and store.has_section(other, "ablation")]
    st.subheader("All layers")
    counts = ("layer", "rotations", "units", "random directions", "units with a significant class drop",
              "random directions with a significant class drop")
    formats = {name: st.column_config.NumberColumn(format="%.3g" if "p (" in name else "%.2f")
               for name in rows[0] if name not in counts}
    formats.update({name: st.column_config.NumberColumn(format="%d") for name in counts[1:]})
    table(pd.DataFrame(rows).set_index("layer"), f"{store.name}-rotation-summary", column_config=formats)


guarded(render)
