"""Shared page furniture: the chosen store and layer, messages for missing sections, query-parameter links."""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import loaders
from store import StoreError


def current_store():
    """The StoreReader chosen in the sidebar, or None after showing why there is none."""
    path = st.session_state.get("store_path")
    if not path:
        st.info(f"No store yet in `{loaders.store_directory()}`. Compute one with "
                "`python -m compute.all --model demo`, then reload.")
        return None
    try:
        return loaders.reader(Path(path))
    except StoreError as error:
        st.error(str(error))
        return None


def choose_layer(store, section: str, key: str = "layer") -> str | None:
    """A layer picker limited to layers that hold ``section``; says which command computes it when none do."""
    layers = [layer for layer in store.layers if store.has_section(layer, section)]
    if not layers:
        try:
            store.require(store.layers[0] if store.layers else "?", section)
        except StoreError as error:
            st.warning(str(error))
        return None
    wanted = st.query_params.get("layer")
    index = layers.index(wanted) if wanted in layers else len(layers) - 1
    layer = st.selectbox("Layer", layers, index=index, key=key)
    st.query_params["layer"] = layer
    return layer


def guarded(render):
    """Run a page body; a broken or incomplete store shows its one-line message instead of a traceback."""
    try:
        render()
    except StoreError as error:
        st.error(str(error))
