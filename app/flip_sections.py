"""The images behind a drop: which images an ablation breaks (right before, wrong after) and fixes (the reverse).

Three places use it: the Unit page (``flips_section``: a unit's lost and gained images of one class, from the store's
flip table ``layers/<L>/ablation/flips``), the greedy replay (the images one greedy step changes,
``layers/<L>/greedy/flips``) and live ablation (a hand-picked or live greedy set, computed on the spot). All draw
through ``show_flips``: counts, thumbnails captioned "true class → prediction after", the ablated units' activation
map blended over each image (when the store keeps the layer's activations, ``layers/<L>/live/acts``), and a bar chart
of the classes the lost images go to.

Thumbnails come from the validation images on disk (``images/files`` under the store's ``data_path``, cut to the
model's centre crop, which the activation maps cover), else from thumbnails the store keeps (``flips/thumbs``, written
with ``--keep-flip-thumbs``); when neither is there, one line says so and the images are listed in a table.
"""

from __future__ import annotations

from pathlib import Path

import altair as alt
import cv2
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads
from compute.flips import THUMB_OPTION, kinds, step_slice
from store.schema import layer_path

MAX_SHOWN = 20  # images per gallery; the rest are counted
COLUMNS = 5
DISPLAY = 128  # pixels per shown image
ALPHA = 0.6  # weight of the colour map where the unit is most active
TABLES = ("ablation", "greedy")  # sections whose flip tables may keep thumbnails
ARROW = "→"


# -- where things are ---------------------------------------------------------------------------------------------
def recompute_command(store) -> str:
    return f"python -m compute.all --model {store.attrs.get('model', 'MODEL')} --force"


def flips_group(layer: str, section: str) -> str:
    return layer_path(layer, section, "flips")


def has_flips(store, layer: str, section: str) -> bool:
    return store.has(f"{flips_group(layer, section)}/start")


def table_rows(store, group: str, part: slice, fields=("image", "before", "after")) -> dict:
    return {name: np.asarray(loaders.array(store.path, f"{group}/{name}", part), np.int64) for name in fields}


def unit_flips(store, layer: str, unit: int) -> dict:
    """Unit ``unit``'s rows of the layer's flip table: image, before, after (every changed prediction)."""
    group = flips_group(layer, "ablation")
    start = loaders.array(store.path, f"{group}/start")
    return table_rows(store, group, slice(int(start[unit]), int(start[unit + 1])))


def step_flips(store, layer: str, row: int, step: int) -> dict:
    """The images greedy step ``step`` (1..S) of class row ``row`` changes: image, before, after."""
    group = flips_group(layer, "greedy")
    start = loaders.array(store.path, f"{group}/start")
    steps = loaders.layer_array(store.path, layer, "greedy", "order").shape[1]
    return table_rows(store, group, step_slice(start, steps, row, step))


def select(rows: dict, mask: np.ndarray) -> dict:
    return {name: value[mask] for name, value in rows.items()}


# -- images -------------------------------------------------------------------------------------------------------
def crop_setting(store) -> tuple[int, int] | None:
    """(resize, crop) of the model's evaluation transform: from the flip table's attributes, else the model registry
    (which loads torch), else None (a centre square is cut)."""
    for layer in store.layers:
        if has_flips(store, layer, "ablation"):
            attrs = loaders.group_attrs(store.path, flips_group(layer, "ablation"))
            if "resize" in attrs and "crop" in attrs:
                return int(attrs["resize"]), int(attrs["crop"])
    return _registry_crop(str(store.attrs.get("model", "")))


@st.cache_data(show_spinner=False)
def _registry_crop(model: str) -> tuple[int, int] | None:
    try:
        from compute.models import get_spec

        preprocess = get_spec(model).preprocess
    except Exception:  # an unknown model: cut the centre square
        return None
    return int(preprocess.resize), int(preprocess.crop)


@st.cache_data(show_spinner=False, max_entries=1024)
def _disk_image(path: str, stamp: float, resize: int | None, crop: int | None) -> np.ndarray | None:
    """The image file as the model saw it (shorter side scaled to ``resize``, centre ``crop``), RGB at DISPLAY px."""
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        return None
    height, width = image.shape[:2]
    side = min(height, width) * (crop / resize if resize and crop else 1.0)
    top, left = int(round((height - side) / 2)), int(round((width - side) / 2))
    size = max(1, int(round(side)))
    region = image[max(top, 0):max(top, 0) + size, max(left, 0):max(left, 0) + size]
    return cv2.cvtColor(cv2.resize(region, (DISPLAY, DISPLAY), interpolation=cv2.INTER_AREA), cv2.COLOR_BGR2RGB)


def stored_thumbs(store) -> list[tuple[str, np.ndarray]]:
    """(group, its thumb_images) of every flip table of the store that keeps thumbnails."""
    found = []
    for layer in store.layers:
        for section in TABLES:
            group = flips_group(layer, section)
            if store.has(f"{group}/thumb_images") and store.has(f"{group}/thumbs"):
                found.append((group, np.asarray(loaders.array(store.path, f"{group}/thumb_images"), np.int64)))
    return found


def images_of(store, indices) -> tuple[dict, str | None]:
    """RGB images (DISPLAY px) of validation images ``indices`` by index, from disk or the store's thumbnails, and a
    line saying why some or all are missing (None when every one was found)."""
    indices = [int(i) for i in indices]
    found: dict[int, np.ndarray] = {}
    root = Path(str(store.attrs.get("data_path", "")))
    if store.has("images/files") and str(root):
        files = loaders.array(store.path, "images/files")
        resize, crop = crop_setting(store) or (None, None)
        for index in indices:
            path = root / str(files[index])
            if path.is_file():
                image = _disk_image(str(path), loaders.mtime(path), resize, crop)
                if image is not None:
                    found[index] = image
    wanted = [i for i in indices if i not in found]
    if wanted:
        for group, kept in stored_thumbs(store):
            for index in wanted:
                position = int(np.searchsorted(kept, index))
                if index not in found and position < len(kept) and kept[position] == index:
                    thumb = loaders.array(store.path, f"{group}/thumbs", position)
                    found[index] = cv2.resize(thumb, (DISPLAY, DISPLAY), interpolation=cv2.INTER_CUBIC)
    missing = [i for i in indices if i not in found]
    if not missing:
        return found, None
    where = f"`{root}`" if str(root) else "the store's data path"
    how = (f"the store keeps no thumbnails of them (`{recompute_command(store)} {THUMB_OPTION}` keeps 64 px "
           f"thumbnails of every flipped image in the store)")
    if not found:
        return found, f"The validation images are not in {where} and {how}: the images are listed instead."
    return found, f"{len(missing)} of these images are not in {where} and {how}: they are listed below."


def activation_maps(store, layer: str, units: list[int], indices) -> tuple[dict, float] | None:
    """The summed activation maps [H, W] of ``units`` over each image, and the scale they are shown against (the
    units' largest map maxima over the validation images); None when the store keeps no activations of the layer."""
    path = layer_path(layer, "live", "acts")
    if not store.has(path) or not units:
        return None
    maps = {}
    for index in indices:
        if len(units) == 1:
            maps[int(index)] = np.asarray(loaders.array(store.path, path, (int(index), int(units[0]))), np.float32)
        else:
            every = np.asarray(loaders.array(store.path, path, int(index)), np.float32)
            maps[int(index)] = every[list(units)].sum(0)
    scale = 0.0
    maxima = layer_path(layer, "activations", "max")
    for unit in units:
        scale += float(np.max(loaders.array(store.path, maxima, (slice(None), int(unit))))) if store.has(maxima) else 0.0
    if scale <= 0:
        scale = max([float(m.max()) for m in maps.values()] + [0.0])
    return maps, scale


def overlay(image: np.ndarray, amap: np.ndarray | None, scale: float) -> np.ndarray:
    """The image with the activation map (upsampled, JET colour map) blended in where the units are active."""
    if amap is None:
        return image
    size = image.shape[:2][::-1]
    level = np.clip(cv2.resize(amap.astype(np.float32), size, interpolation=cv2.INTER_LINEAR) / max(scale, 1e-12), 0, 1)
    colours = cv2.cvtColor(cv2.applyColorMap(np.round(255 * level).astype(np.uint8), cv2.COLORMAP_JET),
                           cv2.COLOR_BGR2RGB)
    weight = (ALPHA * level)[:, :, None]
    return np.round(image * (1 - weight) + colours * weight).astype(np.uint8)


def live_layers_note(store, layer: str) -> str:
    kept = [name for name in store.layers if store.has(layer_path(name, "live", "acts"))]
    model = store.attrs.get("model", "MODEL")
    return (f"Plain images: the activation maps need the layer's live data (`layers/{layer}/live/acts`), which this "
            f"store keeps for {', '.join(kept) or 'no layer'} (`python -m compute.all --model {model} --live-layers "
            f"{' '.join([*kept, layer])}`).")


# -- drawing ------------------------------------------------------------------------------------------------------
def caption(kind: str, index: int, truth: str, before: str, after: str) -> str:
    if kind == "lost":
        return f"#{index} {truth} {ARROW} {after}"
    if kind == "gained":
        return f"#{index} {truth} (was {before})"
    return f"#{index} {truth}: {before} {ARROW} {after}"


def _one_way(store, layer: str, rows: dict, kind: str, units: list[int], key: str, heading: str) -> None:
    """The images that changed one way (``kind``: lost or gained) under their heading, or "none"."""
    st.markdown(heading)
    if len(rows["image"]):
        gallery(store, layer, rows, kind, units, f"{key}-{kind}")
    else:
        st.caption("none")


def gallery(store, layer: str, rows: dict, kind: str, units: list[int], key: str, limit: int | None = None) -> None:
    """Thumbnails of the rows (image, before, after) with captions, the units' activation maps blended in; at most
    ``limit`` (MAX_SHOWN), the rest counted."""
    if not len(rows["image"]):
        return
    limit = MAX_SHOWN if limit is None else limit
    classes = list(store.classes)
    labels = loaders.array(store.path, "images/labels")
    shown = {name: value[:limit] for name, value in rows.items()}
    images, note = images_of(store, shown["image"])
    maps = activation_maps(store, layer, units, images)
    texts = [caption(kind, int(i), classes[int(labels[i])], classes[int(b)], classes[int(a)])
             for i, b, a in zip(shown["image"], shown["before"], shown["after"])]
    pictured = [(int(i), text) for i, text in zip(shown["image"], texts) if int(i) in images]
    if pictured:
        columns = st.columns(COLUMNS)
        for position, (index, text) in enumerate(pictured):
            amap = None if maps is None else maps[0].get(index)
            columns[position % COLUMNS].image(overlay(images[index], amap, maps[1] if maps else 1.0),
                                              caption=text, width="stretch")
    if note:
        st.caption(note)
        files = loaders.array(store.path, "images/files") if store.has("images/files") else None
        listed = [(int(i), "" if files is None else str(files[int(i)]), text)
                  for i, text in zip(shown["image"], texts) if int(i) not in images]
        st.dataframe(pd.DataFrame(listed, columns=["image", "file", "change"]), hide_index=True, key=f"{key}-list")
    if len(rows["image"]) > limit:
        st.caption(f"and {len(rows['image']) - limit} more")


def destination_chart(after: np.ndarray, classes: list[str]) -> tuple[alt.Chart, pd.DataFrame]:
    """Bars: how many of the lost images each class now takes (the prediction after the ablation)."""
    counts = np.bincount(np.asarray(after, np.int64), minlength=len(classes))
    order = [int(i) for i in np.argsort(-counts, kind="stable") if counts[i] > 0]
    frame = pd.DataFrame({"predicted after": [classes[i] for i in order], "lost images": counts[order],
                          "rank": range(len(order))})
    chart = alt.Chart(frame).mark_bar(color="#c0392b").encode(
        x=alt.X("lost images:Q", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("predicted after:N", sort=alt.EncodingSortField("rank"), title=None),
        tooltip=["predicted after", "lost images"]).properties(height=26 * len(order) + 70)  # axes included
    return chart, frame


def show_flips(store, layer: str, rows: dict, units: list[int], key: str, first_class: int | None = None,
               what: str = "the ablation") -> None:
    """The rows (image, before, after) of a set of changed predictions (``what`` changed them, e.g. "removing unit
    3"): lost and gained images as captioned thumbnails with ``units``' activation maps, and where the lost ones go.
    ``first_class``'s images come first."""
    classes = list(store.classes)
    labels = loaders.array(store.path, "images/labels")
    if first_class is not None and len(rows["image"]):
        order = np.lexsort((rows["image"], labels[rows["image"]] != first_class))
        rows = select(rows, order)
    masks = kinds(rows, labels)
    lost, gained = select(rows, masks["lost"]), select(rows, masks["gained"])
    moved = int(masks["moved"].sum())
    if not len(rows["image"]):
        st.caption(f"No image changes its predicted class under {what}.")
        return
    if store.has(layer_path(layer, "live", "acts")) and units:
        st.caption(f"Colour: the activation map of unit{'s' if len(units) > 1 else ''} "
                   f"{', '.join(map(str, units))} over each image (blue to red, against the largest activation over "
                   "the validation images).")
    elif units:
        st.caption(live_layers_note(store, layer))
    if first_class is not None:
        st.caption(f"Images of {classes[first_class]} first, then the others by image number.")
    _one_way(store, layer, lost, "lost", units, key, f"**Lost** ({len(lost['image'])}: right before {what}, wrong "
             f"after; caption: true class {ARROW} prediction after)")
    _one_way(store, layer, gained, "gained", units, key, f"**Gained** ({len(gained['image'])}: wrong before, right "
             "after; caption: true class, and the prediction before)")
    if moved:
        st.caption(f"{moved} more image{'s' if moved > 1 else ''} changed from one wrong class to another (neither "
                   "lost nor gained).")
    if len(lost["image"]):
        st.markdown("**Where the lost images go**")
        chart, frame = destination_chart(lost["after"], classes)
        st.altair_chart(chart, width="stretch")
        chart_downloads(chart, f"{store.name}-{layer}-{key}-lost-to", frame)


# -- the Unit page section ----------------------------------------------------------------------------------------
def flips_section(store, layer: str, unit: int, focus_class: str | None, level: float) -> None:
    """The images behind unit ``unit``'s drop for ``focus_class`` (the class hurt most when none is picked): lost and
    gained images with the unit's map over them, their counts beside the McNemar q-value, where the lost ones go."""
    st.subheader("Images behind the drop")
    if not has_flips(store, layer, "ablation"):
        st.caption(f"This store does not list the images each ablation changes (it predates them): recompute it "
                   f"with `{recompute_command(store)}`.")
        return
    classes = list(store.classes)
    labels = loaders.array(store.path, "images/labels")
    if focus_class in classes:
        target = classes.index(focus_class)
    else:
        target = int(np.argmax(loaders.layer_array(store.path, layer, "ablation", "class_drop", unit)))
        st.caption(f"No class picked: showing {classes[target]}, the class this unit's removal hurts most.")
    rows = unit_flips(store, layer, unit)
    ours = select(rows, labels[rows["image"]] == target)
    masks = kinds(ours, labels)
    cols = st.columns(3)
    cols[0].metric(f"{classes[target]} images lost", int(masks["lost"].sum()), help="right before the ablation, "
                   "wrong after")
    cols[1].metric(f"{classes[target]} images gained", int(masks["gained"].sum()), help="wrong before, right after")
    if store.has(layer_path(layer, "ablation", "q_value")):
        q = float(loaders.layer_array(store.path, layer, "ablation", "q_value", (unit, target)))
        cols[2].metric("McNemar q-value", f"{q:.3g}", help="exact McNemar test of lost against gained, "
                       "Benjamini-Hochberg over the layer's units x classes: "
                       + ("significant" if q < level else "not significant") + f" at q < {level}")
    others = int(len(rows["image"]) - len(ours["image"]))
    show_flips(store, layer, ours, [int(unit)], f"unit{unit}-{classes[target]}",
               what=f"removing unit {unit}")
    if others:
        st.caption(f"Removing unit {unit} changes the prediction of {others} images of other classes too (pick "
                   "their class to see them).")
