"""Overview (the paper's Fig. 3): per layer, units sorted by their max class accuracy drop."""

from __future__ import annotations

import altair as alt
import numpy as np
import streamlit as st

from app import loaders
from app.common import chart_downloads, grid, guarded, side_by_side, significance_level, store_and_layer
from compute.analysis.significance import significant_drops
from figures.overview import curve_chart, curve_frame, median_ratio, significance_counts
from store.schema import layer_path


def optional_layer_array(store, layer: str, section: str, name: str):
    """A layer's dataset, or None in a store written before it existed."""
    return loaders.layer_array(store.path, layer, section, name) if store.has(layer_path(layer, section, name)) \
        else None


def layer_view(store, layer: str, level: float) -> None:
    """Fig. 3 for one store's layer, with its headline numbers and which drops are beyond sampling noise; a click on
    a point opens that unit."""
    class_drop = loaders.layer_array(store.path, layer, "ablation", "class_drop")
    overall = loaders.layer_array(store.path, layer, "ablation", "overall_drop")
    q_value = optional_layer_array(store, layer, "ablation", "q_value")
    counts = significance_counts(class_drop, q_value, overall,
                                 optional_layer_array(store, layer, "ablation", "overall_q_value"), level)
    accuracy = loaders.group_attrs(store.path, layer_path(layer, "ablation")).get("baseline_overall_acc")
    per_class = np.bincount(loaders.array(store.path, "images/labels"))
    max_drop = class_drop.max(1)
    ratio = median_ratio(class_drop, overall, store.attrs.get("num_images", 1))
    cols = grid(3)
    cols[0].metric("Units", len(overall))
    cols[1].metric("Baseline accuracy", "—" if accuracy is None else f"{100 * float(accuracy):.1f}%",
                   help="the unablated network's accuracy over all validation images")
    cols[2].metric("Median max class drop", f"{100 * np.median(max_drop):.1f} pts",
                   help=f"one image of a class is {100 / per_class.min():.2g} points"
                        + ("" if per_class.min() == per_class.max() else f" or less (classes of {per_class.min()}"
                           f" to {per_class.max()} images)"))
    cols = grid(3)
    cols[0].metric("Median overall drop", f"{100 * np.median(overall):.2f} pts",
                   help="Max class drop is typically many times the overall drop: "
                        f"median ratio {ratio:.1f}x in this layer")
    for column, key in zip(cols[1:], ("units with a significant class drop", "units with a significant overall drop")):
        found = counts[key]  # label kept short: it shares a third of the page at 1000 px
        column.metric(key.replace("units with a s", "S"), "—" if found is None else f"{found} / {len(overall)}",
                      help=f"units, of the layer's {len(overall)}, with q < {level}" if found is not None else "this store predates the significance tests: "
                      f"recompute it with `python -m compute.all --model {store.attrs.get('model', 'MODEL')} --force`")
    significant = None if q_value is None else significant_drops(q_value, class_drop, level).any(1)
    frame = curve_frame(class_drop, overall, significant)
    pick = alt.selection_point(fields=["unit"], name="pick", on="click")
    event = st.altair_chart(curve_chart(frame, pick=pick), width="stretch", on_select="rerun",
                            key=f"overview-{store.name}-{layer}")
    chart_downloads(curve_chart(frame, title=f"{store.name} {layer}"), f"{store.name}-{layer}-fig3", frame)
    picked = (event or {}).get("selection", {}).get("pick")
    if picked:
        unit = int(picked[0]["unit"])
        st.switch_page("views/unit.py", query_params={"store": store.name, "layer": layer, "unit": str(unit)})


def render() -> None:
    chosen = store_and_layer("Overview: class accuracy drop of single units", "ablation")
    if chosen is None:
        return
    store, layer = chosen
    level = significance_level()
    side_by_side(store, layer, "ablation", lambda shown, name: layer_view(shown, name, level))
    st.caption("Click a point to open that unit. Drops are baseline minus ablated accuracy on the validation set. "
               f"Filled points: units with at least one class drop whose "
               f"q-value is below {level} (exact McNemar test on the images the ablation flips each way, "
               "Benjamini-Hochberg over the layer's units x classes); hollow points may be sampling noise.")


guarded(render)
