"""Shared page furniture: the chosen stores and layer, messages for missing sections, query-parameter links, and the
download buttons under every chart and table."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from app import loaders
from figures import render as render_chart
from store import StoreError, list_stores
from store import progress

PROGRESS_SECONDS = 5  # how often the runs in progress are read again while a page is open


def _open_chosen(state_key: str):
    """The StoreReader whose path the sidebar left in ``state_key``; None (after its one-line message) if unusable."""
    try:
        return loaders.reader(Path(st.session_state[state_key]))
    except StoreError as error:
        st.error(str(error))
        return None


def current_store():
    """The StoreReader chosen in the sidebar, or None after showing why there is none."""
    if not st.session_state.get("store_path"):
        st.info(f"No store yet in `{loaders.store_directory()}`. Compute one with "
                "`python -m compute.all --model demo`, then reload.")
        return None
    return _open_chosen("store_path")


# -- runs in progress ------------------------------------------------------------------------------------------------
def runs_panel(directory: Path, listed: list[str]) -> None:
    """The runs in progress in the store directory (sidebar), refreshed every PROGRESS_SECONDS while any is alive;
    ``listed`` are the stores the page was drawn with. Nothing when no run is in progress."""
    lines, active = progress.summary(directory)
    if active:
        _live_runs(str(directory), listed)
    elif lines:
        _show_runs(lines)


def _show_runs(lines: list[str]) -> None:
    st.caption("Computing in the background")
    st.caption("  \n".join(lines))


@st.fragment(run_every=PROGRESS_SECONDS)
def _live_runs(directory: str, listed: list[str]) -> None:
    """Reruns alone every few seconds; the whole app reruns when a store has landed (so every picker offers it) or
    when nothing runs any more (so the polling stops)."""
    lines, active = progress.summary(directory)
    if [str(path) for path in list_stores(directory)] != listed or not active:
        loaders.available_stores.clear()  # else the rerun could read the listing of a few seconds ago
        st.rerun()
    _show_runs(lines)


def coming_notes(names: list[str], what: str, table: bool = False) -> bool:
    """Say, refreshed while the page is open, how far each store of ``names`` is that is still being computed (and
    with ``table`` the prediction table); ``what`` says what they are for. False when none is computed or queued."""
    directory = str(loaders.store_directory())
    if not _notes(directory, names, table):
        return False
    if progress.summary(directory)[1]:
        _coming(directory, names, what, table)
    else:  # stopped: nothing will change until the work is restarted, so nothing to refresh
        _show_coming(directory, names, what, table)
    return True


def _notes(directory: str, names: list[str], table: bool) -> list[str]:
    notes = [progress.coming(directory, name) for name in names] + ([progress.table_coming(directory)] if table else [])
    return [note for note in notes if note]


def _show_coming(directory: str, names: list[str], what: str, table: bool) -> None:
    notes = _notes(directory, names, table)
    st.info(f"{what}  \n" + "  \n".join(f"- {note}" for note in notes), icon=":material/hourglass_top:")


@st.fragment(run_every=PROGRESS_SECONDS)
def _coming(directory: str, names: list[str], what: str, table: bool) -> None:
    _show_coming(directory, names, what, table)


def _marker(key: str) -> str:
    return f"_linked_{key}"


def _shown_key(key: str) -> str:
    return f"_linked_shown_{key}"


def _changed_by_user(key: str) -> bool:
    """Whether the browser sent widget ``key`` a value other than the one this session's last run ended with, i.e.
    the user changed the widget for this very rerun."""
    if key not in st.session_state or _shown_key(key) not in st.session_state:
        return False
    try:
        return bool(st.session_state[key] != st.session_state[_shown_key(key)])
    except Exception:  # noqa: BLE001 - values that do not compare to one bool: the link decides, as before
        return False


def from_link(key: str, param: str, parse) -> str | None:
    """Set widget ``key``'s value before it is made: from query parameter ``param`` when the parameter changed since
    this session last wrote it (a followed link, a page switch that carries parameters, Back), else the value it
    already has. Re-assigning the value matters: pages share keys ("layer", "unit"), but each page's widget is its
    own, and only an assigned value carries over to another page's widget of the same key. ``parse`` turns the text
    into the widget's value, raising KeyError or ValueError when it names nothing valid.

    A change the user made to the widget itself wins over the parameter: a rerun carries the URL the browser shows
    when it asks for it, and when the user acts while a run is still going, that URL can predate what this run
    already wrote (unit=3 while the run for unit 4 has written unit=4): taken as a link, it would undo the user's
    new value (issue 16, concurrent sessions).

    Returns the link's text when ``parse`` refused it (the widget then keeps its value), else None: the caller says
    so once its widget shows what it shows instead (``link_refused``)."""
    wanted = st.query_params.get(param)
    refused = None
    if wanted is not None and (wanted != st.session_state.get(_marker(key)) or key not in st.session_state) \
            and not _changed_by_user(key):
        try:
            st.session_state[key] = parse(wanted)
            st.session_state[_marker(key)] = wanted
            return None
        except (KeyError, ValueError):
            refused = wanted
    if key in st.session_state:
        st.session_state[key] = st.session_state[key]
    return refused


def link_refused(param: str, asked: str, why: str, shown: str, container=None) -> None:
    """One line saying that a link asked for something this page cannot show, and what it shows instead."""
    (container or st).warning(f"The link asks for {param} '{asked}', {why}: showing {shown} instead.")


def to_link(key: str, param: str, text: str | None) -> None:
    """Write the widget's value into the URL (removed when empty), so the page as shown is a shareable link."""
    if text:
        st.query_params[param] = text
    else:
        st.query_params.pop(param, None)
    st.session_state[_marker(key)] = text
    if key in st.session_state:  # what the widget shows now: a different value in the next rerun is the user's
        st.session_state[_shown_key(key)] = st.session_state[key]
    else:
        st.session_state.pop(_shown_key(key), None)


def linked_select(label: str, options: list, param: str, key: str, default: int = 0, text=str, container=None,
                  **options_kw):
    """A selectbox whose choice lives in query parameter ``param`` (as ``text(option)``; None is the empty choice)."""
    as_text = lambda option: "" if option is None else text(option)  # noqa: E731
    refused = from_link(key, param, {as_text(option): option for option in options}.__getitem__)
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]  # a value from another store or layer that this one lacks
    initial = {} if key in st.session_state else {"index": default}
    value = (container or st).selectbox(label, options, key=key, **initial, **options_kw)
    to_link(key, param, as_text(value))
    if refused is not None:
        shown = f"{param} {options_kw.get('format_func', as_text)(value)}" if as_text(value) else f"no {param}"
        link_refused(param, refused, f"which is not among this page's {param} choices", shown, container)
    return value


LEVELS = [0.01, 0.05, 0.1, 0.2]


def significance_level() -> float:
    """The false discovery rate at which a drop is called significant (sidebar; query parameter ``fdr``)."""
    return linked_select("Significance: q below", LEVELS, "fdr", "fdr", default=LEVELS.index(0.05), text=str,
                         container=st.sidebar, help="A class drop is significant when its Benjamini-Hochberg q-value "
                         "(over the layer's units x classes, from exact McNemar tests on the images it flips each "
                         "way) is below this false discovery rate.")


def choose_layer(store, section: str, key: str = "layer") -> str | None:
    """A layer picker limited to layers that hold ``section``; says which command computes it when none do."""
    layers = [layer for layer in store.layers if store.has_section(layer, section)]
    if not layers:
        try:
            store.require(store.layers[0] if store.layers else "?", section)
        except StoreError as error:
            st.warning(str(error))
        return None
    return linked_select("Layer", layers, "layer", key, default=len(layers) - 1)


def store_and_layer(title: str, section: str):
    """A page's header: the title and a picker of the chosen store's layers that hold ``section``. Returns
    (store, layer), or None when there is no store or no such layer (after saying so)."""
    store = current_store()
    if store is None:
        return None
    st.title(title)
    layer = choose_layer(store, section)
    return None if layer is None else (store, layer)


def guarded(render):
    """Run a page body; a broken or incomplete store shows its one-line message instead of a traceback."""
    try:
        render()
    except StoreError as error:
        st.error(str(error))


def compare_store():
    """The store picked under "Compare with" in the sidebar (another run, variant or model), or None."""
    return _open_chosen("compare_path") if st.session_state.get("compare_path") else None


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


def chart_downloads(chart, name: str, frame: pd.DataFrame | None = None) -> None:
    """PNG, SVG (and the chart's numbers as CSV) download buttons in one row; images are rendered only when clicked,
    and a click does not rerun the page (nothing on it changes)."""
    name = _slug(name)
    row = st.container(horizontal=True, gap="small")
    for fmt in ("png", "svg"):
        row.download_button(fmt.upper(), lambda fmt=fmt: render_chart(chart, fmt), file_name=f"{name}.{fmt}",
                            mime="image/png" if fmt == "png" else "image/svg+xml", key=f"download-{name}-{fmt}",
                            icon=":material/download:", type="tertiary", width="content", on_click="ignore")
    if frame is not None:
        row.download_button("CSV", lambda: frame.to_csv(index=False).encode(), file_name=f"{name}.csv",
                            mime="text/csv", key=f"download-{name}-csv", icon=":material/download:",
                            type="tertiary", width="content", on_click="ignore")


def table(frame: pd.DataFrame, name: str, **options) -> None:
    """A table with a CSV download button under it (index kept when it carries labels)."""
    st.dataframe(frame, **options)
    keep_index = not options.get("hide_index", False)
    st.download_button("CSV", lambda: frame.to_csv(index=keep_index).encode(), file_name=f"{_slug(name)}.csv",
                       mime="text/csv", key=f"download-{_slug(name)}-table", icon=":material/download:",
                       type="tertiary", on_click="ignore")


def split() -> bool:
    """Whether the page shows two stores side by side (each in half the width)."""
    return bool(st.session_state.get("compare_path"))


def grid(cells: int) -> list:
    """``cells`` containers in one row, or in rows of two when the page is split (metrics stay readable)."""
    if not split():
        return list(st.columns(cells))
    return [column for _ in range(0, cells, 2) for column in st.columns(2)][:cells]


def side_by_side(store, layer: str, section: str, body) -> None:
    """``body(store, layer)`` for the chosen store, and beside it for the compared store when one is picked and
    holds ``section`` for the same layer (else a note says why it is missing)."""
    other = compare_store()
    if other is None:
        body(store, layer)
        return
    for column, shown in zip(st.columns(2), (store, other)):
        with column:
            st.subheader(shown.name)
            if layer in shown.layers and shown.has_section(layer, section):
                body(shown, layer)
            else:
                st.info(f"{shown.name} has no {section} results for layer {layer}.")
