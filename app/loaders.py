"""Cached reads from the store. Keys include the file's mtime, so a store replaced by a new run is read afresh.

Loaders return numpy arrays and plain values, never an open h5py handle (see store/reader.py for why).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import streamlit as st

from store import StoreError, StoreReader, list_stores
from store.schema import layer_path


def store_directory() -> Path:
    raw = os.environ.get("UNIT_ABLATION_STORES")
    if raw:
        return Path(raw).expanduser().resolve()
    return Path(os.environ.get("UNIT_ABLATION_DATA", "data")).expanduser().resolve() / "stores"


def mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


@st.cache_data(show_spinner=False, max_entries=64)
def _reader(path: str, stamp: float) -> StoreReader:
    return StoreReader(path)


def reader(path: Path) -> StoreReader:
    return _reader(str(path), mtime(Path(path)))


@st.cache_data(show_spinner=False, max_entries=256)
def _array(path: str, stamp: float, dataset: str, selection) -> np.ndarray:
    # the cached reader's table of contents, not a fresh walk of the file's (a unit change reads a dozen datasets)
    return _reader(path, stamp).read(dataset, selection if selection is not None else ())


def array(path: Path, dataset: str, selection=None):
    """A dataset (or a slice of it: an int index or a tuple) of the store, cached by store path and mtime."""
    return _array(str(path), mtime(Path(path)), dataset, selection)


def layer_array(path: Path, layer: str, section: str, name: str, selection=None):
    return array(path, layer_path(layer, section, name), selection)


@st.cache_data(show_spinner=False, max_entries=64)
def _attrs(path: str, stamp: float, group: str) -> dict:
    return _reader(path, stamp).read_attrs(group)


def group_attrs(path: Path, group: str) -> dict:
    """The attributes of a group or dataset of the store, cached like arrays."""
    return _attrs(str(path), mtime(Path(path)), group)


@st.cache_data(show_spinner=False, ttl=5)
def available_stores(directory: str) -> list[tuple[str, str]]:
    """(path, label) for each finished store in the directory; broken files are listed with their problem, and the
    listing goes on: one damaged file must never hide the others or take every page down with it."""
    return [(str(path), _label(path)) for path in list_stores(directory)]


def _label(path: Path) -> str:
    try:
        info = StoreReader(path)
        return f"{path.stem}  ·  {info.attrs.get('model', '?')}  ·  {len(info.layers)} layers"
    except StoreError as error:
        return f"{path.stem}  ·  unusable: {error}"
    except Exception as error:  # noqa: BLE001 - the reader turns damage into StoreError; this is the last guard
        detail = str(error).strip().splitlines()[0][:100] if str(error).strip() else "no detail"
        return f"{path.stem}  ·  unusable: damaged ({type(error).__name__}: {detail}): recompute it"
