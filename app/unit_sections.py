"""Sections of the Unit page drawn from the dissection and top-image stages: the unit's concept and its top images.

Each section is a function (store, layer, unit) that draws itself, or says in one line which command fills it.
"""

from __future__ import annotations

import cv2
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import table as show_table
from store import StoreError
from store.schema import layer_path

DISPLAY = 160  # pixels per shown image: the stored thumbnails are at most 96
DIM = 0.3  # brightness outside the active region
OUTLINE = (255, 215, 0)
COLUMNS = 5


def section_attrs(store, layer: str, section: str) -> dict:
    return loaders.group_attrs(store.path, layer_path(layer, section))


def missing(store, layer: str, section: str) -> bool:
    """True (after a one-line note naming the command) when the layer lacks ``section``."""
    try:
        store.require(layer, section)
    except StoreError as error:
        st.caption(str(error))
        return True
    return False


def highlight(thumb: np.ndarray, mask: np.ndarray, size: int = DISPLAY) -> np.ndarray:
    """The image with the unit's active region kept bright and outlined, the rest dimmed (an RGB uint8 array)."""
    image = cv2.resize(thumb, (size, size), interpolation=cv2.INTER_CUBIC)
    region = cv2.resize(mask.astype(np.uint8), (size, size), interpolation=cv2.INTER_NEAREST)
    dimmed = cv2.addWeighted(image, DIM, np.zeros_like(image), 1.0 - DIM, 0.0)
    shown = np.where(region[:, :, None] > 0, image, dimmed)
    contours, _ = cv2.findContours(region, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    cv2.drawContours(shown, contours, -1, OUTLINE, 2)
    return shown


def concept_section(store, layer: str, unit: int) -> None:
    """The unit's best concept (name, category, IoU) and its best concept in each category."""
    st.subheader("Concept (Network Dissection)")
    if missing(store, layer, "dissection"):
        return
    names = loaders.array(store.path, "concepts/names")
    categories = loaders.array(store.path, "concepts/categories")
    best = int(loaders.layer_array(store.path, layer, "dissection", "best_concept", unit))
    iou = float(loaders.layer_array(store.path, layer, "dissection", "best_iou", unit))
    threshold = float(section_attrs(store, layer, "dissection").get("iou_threshold", 0.04))
    cols = st.columns(3)
    cols[0].metric("Best concept", str(names[best]))
    cols[1].metric("Category", str(categories[best]))
    cols[2].metric("IoU", f"{iou:.3f}", help=f"a detector when above {threshold}")
    verdict = "a **detector** of" if iou > threshold else "not a detector (IoU at most the threshold); closest to"
    st.markdown(f"Unit {unit} is {verdict} *{names[best]}* (IoU {iou:.3f}, threshold {threshold}).")
    by_category = loaders.layer_array(store.path, layer, "dissection", "best_by_category", unit)
    by_category_iou = loaders.layer_array(store.path, layer, "dissection", "best_by_category_iou", unit)
    category_names = loaders.array(store.path, "concepts/category_names")
    rows = [(str(category), str(names[c]), float(value))
            for category, c, value in zip(category_names, by_category, by_category_iou) if c >= 0]
    table = pd.DataFrame(rows, columns=["category", "best concept", "IoU"]).sort_values("IoU", ascending=False)
    show_table(table, f"{store.name}-{layer}-unit{unit}-concepts", hide_index=True,
               column_config={"IoU": st.column_config.NumberColumn(format="%.3f")})


def top_images_section(store, layer: str, unit: int) -> None:
    """The unit's top validation images by map maximum, its active region (map > T_u) highlighted."""
    st.subheader("Top activating images")
    if missing(store, layer, "topimages"):
        return
    thumbs = loaders.layer_array(store.path, layer, "topimages", "thumbs", unit)
    masks = loaders.layer_array(store.path, layer, "topimages", "masks", unit)
    scores = loaders.layer_array(store.path, layer, "topimages", "scores", unit)
    indices = loaders.layer_array(store.path, layer, "topimages", "indices", unit)
    labels = loaders.array(store.path, "images/labels")
    classes = store.classes
    source = section_attrs(store, layer, "topimages").get("threshold_source", "?")
    st.caption(f"Bright, outlined: where the upsampled activation map exceeds the unit's threshold (from {source}). "
               "Caption: the image's class and the map's maximum.")
    columns = st.columns(min(COLUMNS, len(thumbs)))
    for rank, (thumb, mask, score, index) in enumerate(zip(thumbs, masks, scores, indices)):
        columns[rank % len(columns)].image(highlight(thumb, mask), width="stretch",
                                           caption=f"#{index} {classes[labels[index]]} · {score:.2f}")


SECTIONS = [concept_section, top_images_section]
