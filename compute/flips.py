"""Which images an ablation changes: sparse tables of every (ablation, image) whose predicted class changed.

A drop is (lost - gained) / n_k, counts of images; these tables name the images. For the single-unit sweep,
``layers/<L>/ablation/flips/{unit, image, before, after}`` (int32, sorted by unit then image) hold one row per
(unit, image) whose prediction with the unit zeroed (``after``) differs from the unablated model's (``before``), and
``flips/start`` [U + 1] (int64) the row offsets: unit u's rows are ``start[u]:start[u + 1]`` (CSR). Only changed
rows are kept, wrong -> other wrong changes included: they are neither lost nor gained, so from the table

    lost[u, k]   = rows of u with label == before != after  (right before, wrong after)
    gained[u, k] = rows of u with label == after != before  (wrong before, right after)

equal the stored counts exactly (``lost_gained``). For greedy ablation, ``layers/<L>/greedy/flips/{class_row, step,
image, before, after}`` hold, for each greedy class row r and step s (1..S), the images whose prediction changed
between s - 1 and s units ablated (over all validation images, sorted by row, step, image), and ``flips/start``
[K' * S + 1] their offsets: step s of row r is ``start[r * S + s - 1]:start[r * S + s]``.

With ``--keep-flip-thumbs`` the store also keeps a 64 x 64 RGB thumbnail (the model's centre crop) of each image in
a table: ``flips/thumb_images`` [M] (int64, ascending) and ``flips/thumbs`` [M, 64, 64, 3] uint8, so the app shows them
on a machine without the validation images.

Numpy only at import (the app reads tables through these helpers without loading torch).
"""

from __future__ import annotations

import numpy as np

UNIT_FIELDS = ("unit", "image", "before", "after")
GREEDY_FIELDS = ("class_row", "step", "image", "before", "after")
THUMB = 64
THUMB_OPTION = "--keep-flip-thumbs"
UNIT_NOTE = ("one row per (unit, image) whose predicted class with the unit zeroed (after) differs from the "
             "unablated model's (before), wrong -> other wrong included; sorted by unit, then image; unit u's rows "
             "are start[u]:start[u + 1]")
GREEDY_NOTE = ("one row per (greedy class row, step s in 1..S, image) whose predicted class with the order's first s "
               "units ablated (after) differs from that with its first s - 1 (before), over every validation image; "
               "sorted by class_row, step, image; step s of row r is start[r * S + s - 1]:start[r * S + s]")


# -- building tables ----------------------------------------------------------------------------------------------
def empty(fields) -> dict:
    return {name: np.zeros(0, np.int32) for name in fields}


def concatenate(parts: list[dict], fields) -> dict:
    """The parts' rows, one table (int32 columns)."""
    if not parts:
        return empty(fields)
    return {name: np.concatenate([np.asarray(part[name]) for part in parts]).astype(np.int32) for name in fields}


def sort_table(table: dict, keys) -> dict:
    """Rows ordered by ``keys`` (the first the slowest), ties kept in their order."""
    order = np.lexsort([table[key] for key in reversed(list(keys))])
    return {name: value[order] for name, value in table.items()}


def offsets(keys: np.ndarray, count: int) -> np.ndarray:
    """[count + 1] int64 row offsets of a table sorted by ``keys`` (integers in 0..count-1): CSR."""
    return np.searchsorted(np.asarray(keys, np.int64), np.arange(count + 1), side="left").astype(np.int64)


def unit_table(parts: list[dict]) -> dict:
    """Per-batch rows of a sweep (global unit numbers), as one table sorted by unit, then image."""
    return sort_table(concatenate(parts, UNIT_FIELDS), ("unit", "image"))


def combine_unit_tables(tables: list[dict], units: int) -> dict:
    """The tables of the ranks' unit shares as one (rows carry global unit numbers), with its offsets."""
    table = unit_table(tables)
    return {**table, "start": offsets(table["unit"], units)}


def greedy_table(tables: list[tuple[np.ndarray, dict]], rows: int, steps: int) -> dict:
    """Greedy flip tables of the ranks' class shares, each (its rows of ``greedy/classes``, its table with local
    class rows), as one table of global class rows sorted by row, step, image, with its offsets."""
    parts = []
    for indices, table in tables:
        part = {name: np.asarray(table[name]) for name in GREEDY_FIELDS}
        part["class_row"] = np.asarray(indices, np.int64)[part["class_row"].astype(np.int64)]
        parts.append(part)
    table = sort_table(concatenate(parts, GREEDY_FIELDS), GREEDY_FIELDS[:3])
    block = table["class_row"].astype(np.int64) * steps + table["step"] - 1
    return {**table, "start": offsets(block, rows * steps)}


# -- reading tables -----------------------------------------------------------------------------------------------
def unit_rows(table: dict, start: np.ndarray, unit: int) -> dict:
    """Unit ``unit``'s rows of a unit table (arrays: image, before, after)."""
    part = slice(int(start[unit]), int(start[unit + 1]))
    return {name: np.asarray(table[name][part]) for name in ("image", "before", "after")}


def step_slice(start: np.ndarray, steps: int, row: int, step: int) -> slice:
    """The rows of greedy class row ``row``, step ``step`` (1..S) in a greedy table."""
    block = row * steps + step - 1
    return slice(int(start[block]), int(start[block + 1]))


def changed(before: np.ndarray, after: np.ndarray) -> dict:
    """The images whose prediction differs between two prediction vectors over the same images [N]."""
    before, after = np.asarray(before), np.asarray(after)
    images = np.flatnonzero(before != after)
    return {"image": images.astype(np.int64), "before": before[images].astype(np.int64),
            "after": after[images].astype(np.int64)}


def kinds(rows: dict, labels: np.ndarray) -> dict:
    """Boolean masks of the rows lost (right before, wrong after), gained (the reverse) and moved (wrong before
    and after, to another class)."""
    truth = np.asarray(labels)[np.asarray(rows["image"], np.int64)]
    before, after = np.asarray(rows["before"]), np.asarray(rows["after"])
    lost = (before == truth) & (after != truth)
    gained = (before != truth) & (after == truth)
    return {"lost": lost, "gained": gained, "moved": ~(lost | gained)}


def lost_gained(table: dict, start: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, ...]:
    """[U, K] images lost and gained per unit and class, from a unit table: equal to ``ablation/lost``, ``gained``."""
    units = len(start) - 1
    unit = np.repeat(np.arange(units), np.diff(start))
    truth = np.asarray(labels)[np.asarray(table["image"], np.int64)]
    masks = kinds(table, labels)
    counts = []
    for name in ("lost", "gained"):
        cells = unit[masks[name]] * num_classes + truth[masks[name]]
        counts.append(np.bincount(cells, minlength=units * num_classes).reshape(units, num_classes).astype(np.int32))
    return counts[0], counts[1]


# -- writing ------------------------------------------------------------------------------------------------------
def write_table(h5, group: str, table: dict, fields, note: str) -> None:
    from store.writer import write_array

    for name in fields:
        write_array(h5, f"{group}/{name}", np.asarray(table[name], np.int32))
    write_array(h5, f"{group}/start", np.asarray(table["start"], np.int64))
    h5[group].attrs["rows"] = note


def write_crop(h5, group: str, preprocess) -> None:
    """The model's evaluation crop (shorter side resized to ``resize``, centre ``crop``), so that the app can cut the
    region the activation maps cover out of an image on disk without loading the model registry."""
    h5[group].attrs["resize"] = int(preprocess.resize)
    h5[group].attrs["crop"] = int(preprocess.crop)


def write_thumbs(h5, group: str, images_u8, indices: np.ndarray, block: int = 256) -> None:
    """64 x 64 thumbnails of the validation images ``indices`` (unique, ascending) from the run's decoded images
    (uint8 [N, 3, S, S], the model's centre crop): ``group/thumb_images`` and ``group/thumbs``."""
    from compute.lib.topimages import thumbnail
    from store.writer import create_array, write_array

    indices = np.unique(np.asarray(indices, np.int64))
    write_array(h5, f"{group}/thumb_images", indices)
    if not len(indices):
        write_array(h5, f"{group}/thumbs", np.zeros((0, THUMB, THUMB, 3), np.uint8))
        return
    thumbs = create_array(h5, f"{group}/thumbs", (len(indices), THUMB, THUMB, 3), np.uint8,
                          chunks=(min(64, len(indices)), THUMB, THUMB, 3))
    for first in range(0, len(indices), block):
        chosen = indices[first:first + block]
        thumbs[first:first + len(chosen)] = np.stack([thumbnail(np.asarray(images_u8[i]), THUMB) for i in chosen])
    h5[group].attrs["thumbs"] = "64 x 64 RGB of the model's centre crop, rows follow thumb_images"


def keep_thumbs(ctx) -> bool:
    """Whether the run keeps thumbnails of flipped images (``--keep-flip-thumbs``)."""
    from compute.run.options import FlipOptions

    return bool(ctx.option(FlipOptions).keep_flip_thumbs)
