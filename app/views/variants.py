"""Variants (the paper's Figs. 8 and 9): baseline, batch norm and dropout networks side by side.

Any set of stores can be compared; by default the three demo variants that ``python -m compute.suite`` computes. Per
layer, each store's units sorted by max class drop (Fig. 8: dropout spreads a class over many units and flattens the
curve), and per store the number of units whose best concept IoU passes a threshold (Fig. 9: interpretable units).
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, coming_notes, current_store, from_link, guarded, table, to_link
from figures.variants import detector_chart, max_drop_chart, sorted_max_drops
from store import StoreError
from store.schema import layer_path

DEFAULT_SET = ("demo", "demo-bn", "demo-dropout")


def listed(names: list[str], paths: dict) -> list[str]:
    """The names that are stores of the directory; KeyError when none is (a link naming none changes nothing)."""
    found = [name for name in names if name in paths]
    if not found:
        raise KeyError(names)
    return found


def store_paths() -> dict[str, str]:
    return {Path(path).stem: path for path, _ in loaders.available_stores(str(loaders.store_directory()))}


def follow_default(default: list[str]) -> None:
    """While the pick is still the default, a variant that lands (the first run computes them in the background) is
    added to it; a pick the user changed is left alone."""
    before = st.session_state.get("_variants_default")
    if before is not None and before != default and st.session_state.get("variant_stores") == before:
        st.session_state["variant_stores"] = default
    st.session_state["_variants_default"] = default


def choose_stores() -> dict[str, object]:
    """{store name: StoreReader} for the picked stores; unusable ones are reported and left out."""
    paths = store_paths()
    current = current_store()
    default = [name for name in DEFAULT_SET if name in paths]
    if len(default) < 2 and current is not None:
        default = [current.name]
    follow_default(default)
    from_link("variant_stores", "stores", lambda text: listed(text.split(","), paths))
    picked = st.multiselect("Stores to compare", list(paths), key="variant_stores",
                            **({} if "variant_stores" in st.session_state else {"default": default}))
    to_link("variant_stores", "stores", ",".join(picked))
    stores = {}
    for name in picked:
        try:
            stores[name] = loaders.reader(Path(paths[name]))
        except StoreError as error:
            st.error(str(error))
    return stores


def store_layers(stores: dict) -> list[str]:
    """Layers with ablation results in any picked store, bottom to top in the first store's order."""
    layers: list[str] = []
    for store in stores.values():
        layers += [layer for layer in store.layers if store.has_section(layer, "ablation") and layer not in layers]
    return layers


def compared_layers(stores: dict) -> list[str]:
    """The layers every picked store has ablation results for (a panel of one store compares nothing: the first
    run's variants hold conv5 only), saying which are left out; all of them when no layer is shared."""
    layers = store_layers(stores)
    shared = [layer for layer in layers if all(store.has_section(layer, "ablation") for store in stores.values())]
    if not shared or shared == layers:
        return layers
    left_out = {}  # the stores holding them -> layers left out, one line per group
    for layer in (layer for layer in layers if layer not in shared):
        holders = tuple(name for name, store in stores.items() if store.has_section(layer, "ablation"))
        left_out.setdefault(holders, []).append(layer)
    for holders, missing in left_out.items():
        st.caption(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} left out: only "
                   f"{', '.join(holders)} {'has' if len(holders) == 1 else 'have'} ablation results for "
                   f"{'it' if len(missing) == 1 else 'them'} (`python -m compute.suite` computes every layer of the "
                   f"variants).")
    return shared


def max_drop_frame(stores: dict, layers: list[str]) -> pd.DataFrame:
    return sorted_max_drops({(name, layer): loaders.layer_array(store.path, layer, "ablation", "class_drop")
                             for name, store in stores.items() for layer in layers
                             if store.has_section(layer, "ablation")})


def summary_table(stores: dict, frame: pd.DataFrame) -> pd.DataFrame:
    """Per store and layer: model, validation accuracy, median and mean max class drop (points)."""
    rows = []
    for (name, layer), group in frame.groupby(["store", "layer"], sort=False):
        store = stores[name]
        accuracy = store.read_attrs(layer_path(layer, "ablation")).get("baseline_overall_acc", np.nan)
        rows.append({"store": name, "model": store.attrs.get("model", "?"), "layer": layer,
                     "val accuracy (%)": 100 * float(accuracy), "units": len(group),
                     "median max class drop": group["max class drop"].median(),
                     "mean max class drop": group["max class drop"].mean()})
    return pd.DataFrame(rows)


def detector_counts(stores: dict, layers: list[str], threshold: float) -> tuple[pd.DataFrame, list[str]]:
    """Units with best-concept IoU above ``threshold`` per store and layer, and the messages for missing results."""
    rows, missing = [], []
    for name, store in stores.items():
        for layer in layers:
            if layer not in store.layers:
                continue
            try:
                store.require(layer, "dissection")
            except StoreError as error:
                missing.append(str(error))
                continue
            best = loaders.layer_array(store.path, layer, "dissection", "best_iou")
            rows.append({"store": name, "layer": layer, "detectors": int((best > threshold).sum()),
                         "units": len(best)})
    return pd.DataFrame(rows), missing


def default_threshold(stores: dict) -> float:
    configs = [store.config.get("iou_threshold") for store in stores.values()]
    return float(next((value for value in configs if value is not None), 0.04))


def announce_missing() -> bool:
    """Say how far the default variants still being computed are; True when some are (and none of them is here)."""
    paths = store_paths()
    missing = [name for name in DEFAULT_SET if name not in paths]
    return bool(missing) and coming_notes(missing, f"Figs. 8 and 9 compare {', '.join(DEFAULT_SET)}; "
                                          f"{' and '.join(missing)} appear{'s' if len(missing) == 1 else ''} "
                                          "here when computed.")


def per_layer(chart: alt.FacetChart, frame: pd.DataFrame, stores: list[str], layers: list[str]) -> None:
    """The figure's facets drawn as one chart per layer, in columns that share the page's width: the faceted figure
    has fixed-width panels (300 px for Fig. 8), which were cut off at the right of a 1500 px page. The downloads give
    the faceted figure itself."""
    encoding = chart.spec.encoding.copy(deep=True)
    height = chart.spec.height
    if encoding.color.to_dict().get("legend", "shown") is not None:
        # Under each panel, one store a line: beside it, or in one line under it, it was cut off in a third of 1000 px.
        encoding.color = alt.Color("store:N", sort=stores, legend=alt.Legend(orient="bottom", direction="vertical",
                                                                             title=None))
        height += 40 + 20 * len(stores)  # the chart's height holds its legend and axes once it fills its column
    if encoding.x.to_dict().get("field") == "rank":  # Fig. 8's "units sorted by max class drop" outgrew a third
        encoding.x = alt.X("rank:Q", title="units, sorted")
    for column, layer in zip(st.columns(len(layers)), layers):
        part = frame[frame["layer"] == layer]
        if len(part):
            column.caption(layer)  # a caption, not a Vega title: those were clipped at the top of a filled column
            column.altair_chart(alt.Chart(part, mark=chart.spec.mark, encoding=encoding, height=height),
                                width="stretch")


def render() -> None:
    st.title("Variants: baseline, batch norm, dropout")
    coming = announce_missing()
    stores = choose_stores()
    if len(stores) < 2 and coming:  # one store compared with nothing: wait for the others rather than draw it
        return
    if not stores:
        st.info("Pick stores to compare. `python -m compute.suite` computes the three demo variants "
                "(demo, demo-bn, demo-dropout).")
        return
    layers = compared_layers(stores)
    if not layers:
        first = next(iter(stores.values()))
        first.require(first.layers[0] if first.layers else "?", "ablation")
    frame = max_drop_frame(stores, layers)
    st.subheader("Max class drop of single units, sorted (Fig. 8)")
    chart = max_drop_chart(frame, list(stores), layers)
    per_layer(chart, frame, list(stores), layers)
    chart_downloads(chart, "variants-fig8", frame)
    table(summary_table(stores, frame), "variants-summary", hide_index=True, column_config={
        name: st.column_config.NumberColumn(format="%.2f")
        for name in ("val accuracy (%)", "median max class drop", "mean max class drop")})
    st.caption("A flatter curve (lower maximum, higher tail) means class information is spread over more units: "
               "removing any single one hurts any class less.")
    st.subheader("Interpretable units per variant (Fig. 9)")
    threshold = st.number_input("Best-concept IoU above", min_value=0.0, max_value=1.0,
                                value=default_threshold(stores), step=0.01, format="%.2f")
    counts, missing = detector_counts(stores, layers, threshold)
    if len(counts):
        chart = detector_chart(counts, list(stores), layers)
        per_layer(chart, counts, list(stores), [layer for layer in layers if layer in set(counts["layer"])])
        chart_downloads(chart, f"variants-fig9-iou{threshold:.2f}", counts)
        table(counts.pivot(index="store", columns="layer", values="detectors").reindex(columns=[
            layer for layer in layers if layer in set(counts["layer"])]), "variants-detectors")
    for message in missing:
        st.warning(message)


guarded(render)
