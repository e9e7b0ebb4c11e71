"""The table the Search page filters: every unit of every ablated layer of a store, with its searchable values."""

from __future__ import annotations

import numpy as np
import pandas as pd
import streamlit as st
from store.schema import layer_path

# Scalar columns a range can be put on, in the order the picker offers them.
RANGED = ["max class drop", "overall drop", "least q of a class drop", "best IoU", "L1 norm", "max selectivity",
          "max correlation"]
LEAST_Q = "least q of a class drop"


def layer_rows(layer: str, class_drop: np.ndarray, overall: np.ndarray, classes: np.ndarray, extra: dict) -> pd.DataFrame:
    """One row per unit of a layer: the class it matters most for and its drops (points), plus whatever attribute and
    concept columns the store holds (``extra``: column name -> per-unit values)."""
    hurt = class_drop.max(1) > 0  # a unit whose ablation lowers no class matters most for none
    frame = pd.DataFrame({"layer": layer, "unit": np.arange(len(overall)),
                          "most hurt class": np.where(hurt, classes[class_drop.argmax(1)], ""),
                          "max class drop": 100 * class_drop.max(1), "overall drop": 100 * overall})
    for name, values in extra.items():
        frame[name] = values
    return frame


@st.cache_data(show_spinner="Indexing the store's units...", max_entries=8)
def unit_index(path: str, stamp: float) -> pd.DataFrame:
    """Every unit of every ablated layer with its searchable values, built once per store file."""
    from store import StoreReader

    store = StoreReader(path)
    classes = np.array(store.classes, dtype=object)
    concepts = store.read("concepts/names") if store.has("concepts/names") else None
    categories = store.read("concepts/categories") if store.has("concepts/categories") else None
    frames = []
    for layer in store.layers:
        if not store.has_section(layer, "ablation"):
            continue
        extra = {}
        if store.has_section(layer, "dissection") and concepts is not None:
            best = store.layer(layer, "dissection", "best_concept")
            extra.update({"concept": concepts[best].astype(str), "category": categories[best].astype(str),
                          "best IoU": store.layer(layer, "dissection", "best_iou")})
        if store.has(layer_path(layer, "ablation", "q_value")):
            # the unit's strongest evidence of a drop: the smallest q among its classes that lost accuracy
            q = store.layer(layer, "ablation", "q_value")
            extra[LEAST_Q] = np.where(store.layer(layer, "ablation", "class_drop") > 0, q, 1.0).min(1)
        if store.has_section(layer, "attributes"):
            extra.update({"L1 norm": store.layer(layer, "attributes", "l1"),
                          "max selectivity": store.layer(layer, "attributes", "selectivity").max(1),
                          "max correlation": store.layer(layer, "attributes", "correlation").max(1)})
        frames.append(layer_rows(layer, store.layer(layer, "ablation", "class_drop"),
                                 store.layer(layer, "ablation", "overall_drop"), classes, extra))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def matching(frame: pd.DataFrame, concept: str = "", target: str = "", attribute: str | None = None,
             low: float | None = None, high: float | None = None, significant_below: float | None = None
             ) -> pd.DataFrame:
    """Rows whose concept label contains ``concept`` (any case), whose most hurt class is ``target``, whose
    ``attribute`` lies in [low, high], and (given ``significant_below``) with a class drop whose q-value is below it;
    an empty filter keeps every row."""
    mask = np.ones(len(frame), bool)
    if significant_below is not None and LEAST_Q in frame:
        mask &= (frame[LEAST_Q] < significant_below).to_numpy()
    if concept and "concept" in frame:
        mask &= frame["concept"].fillna("").str.contains(concept, case=False, regex=False).to_numpy()
    if target:
        mask &= (frame["most hurt class"] == target).to_numpy()
    if attribute in frame:
        values = frame[attribute].to_numpy(dtype=float)
        mask &= (values >= (-np.inf if low is None else low)) & (values <= (np.inf if high is None else high))
    return frame[mask]
