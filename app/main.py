"""Streamlit entry point: ``streamlit run app/main.py``. Builds the navigation and the store picker."""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run app/main.py` puts app/ on sys.path, not the repository root that holds app/, store/, compute/.
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import streamlit as st  # noqa: E402

from app import loaders, provenance  # noqa: E402
from app.common import linked_select, runs_panel  # noqa: E402

# One file per page under app/views/, not app/pages/: Streamlit treats a pages/ folder beside the entry point as an
# old-style multipage app until some session has run main.py, so a link opened first on a fresh server would run the
# page without the sidebar's store picker.
PAGES = [
    ("views/overview.py", "Overview", "overview", ":material/monitoring:"),
    ("views/unit.py", "Unit", "unit", ":material/neurology:"),
    ("views/greedy.py", "Greedy ablation", "greedy", ":material/trending_down:"),
    ("views/attributes.py", "Attributes", "attributes", ":material/scatter_plot:"),
    ("views/dissection.py", "Dissection", "dissection", ":material/category:"),
    ("views/rotation.py", "Rotation", "rotation", ":material/rotate_right:"),
    ("views/variants.py", "Variants", "variants", ":material/compare:"),
    ("views/prediction.py", "Predicting classes", "prediction", ":material/table_chart:"),
    ("views/search.py", "Search units", "search", ":material/search:"),
]


NONE = ""  # "Compare with: none". Not None: a selectbox shows a value of None as no choice ("Choose an option")


def pick(label: str, paths: list[str], labels: dict, param: str, key: str, optional: bool = False,
         default: int = 0) -> str | None:
    """A sidebar store picker bound to query parameter ``param``: the link names a store by its file stem only, and
    only stores listed in the store directory can be chosen, so no path from the browser reaches the file system."""
    wanted = st.query_params.get(param)
    if wanted and wanted not in {Path(p).stem for p in paths}:
        st.sidebar.warning(f"No store named {wanted[:80]!r} in the store directory; showing another.")
    options = ([NONE] if optional else []) + paths
    chosen = linked_select(label, options, param, key, default=default, text=lambda p: Path(p).stem if p else "",
                           container=st.sidebar, format_func=lambda p: labels[p] if p else "none")
    return chosen or None


def default_store(paths: list[str]) -> int:
    """The store a visitor without a link sees first: the newest, but not one the first run's background work wrote
    for the Variants and Predicting pages (those hold only the stages those pages read)."""
    from store.progress import suite_status

    suite = suite_status(loaders.store_directory())
    background = {name for name, _ in suite.stores} if suite else set()
    return next((i for i, path in enumerate(paths) if Path(path).stem not in background), 0)


def store_picker() -> None:
    directory = loaders.store_directory()
    st.sidebar.caption(f"Stores in `{directory}`")
    try:
        stores = loaders.available_stores(str(directory))
    except Exception as error:  # noqa: BLE001 - shown, never raised: every page runs below the picker
        st.session_state.pop("store_path", None)
        st.sidebar.error(f"The store directory cannot be listed: {str(error).strip().splitlines()[0][:200]}")
        return
    with st.sidebar:
        runs_panel(directory, [path for path, _ in stores])
    if not stores:
        st.session_state.pop("store_path", None)
        st.sidebar.info("No stores yet.")
        return
    labels = dict(stores)
    paths = list(labels)
    chosen = pick("Store", paths, labels, "store", "store_select", default=default_store(paths))
    st.session_state["store_path"] = chosen
    st.session_state["compare_path"] = pick("Compare with", [p for p in paths if p != chosen], labels, "compare",
                                            "compare_select", optional=True)
    try:
        info = loaders.reader(Path(chosen))
    except Exception as error:  # shown, never raised: the picker must survive any file in the directory
        st.sidebar.error(str(error))
        return
    provenance.show(info)


def opens_overview(link: dict):
    """The root URL's page: Overview with the link's parameters as they came (before the pickers rewrote them, so a
    link naming an unknown store still says so). A hidden page of its own, because the default page is served at "/"
    only, and a cold link to its own path (/overview?layer=conv4) would say "Page not found"."""
    def home() -> None:
        st.switch_page(PAGES[0][0], query_params=link)
    return home


def main() -> None:
    st.set_page_config(page_title="Unit ablation", page_icon=":material/science:", layout="wide")
    link = st.query_params.to_dict()
    pages = [st.Page(opens_overview(link), title="Home", url_path="home", default=True, visibility="hidden")]
    pages += [st.Page(path, title=title, url_path=url, icon=icon) for path, title, url, icon in PAGES]
    navigation = st.navigation(pages)
    store_picker()
    navigation.run()


main()
