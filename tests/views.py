"""Opening one app page under Streamlit's AppTest, as the sidebar would leave it: the chosen (and compared) store in
session state and the link's query parameters set. AppTest runs a page file alone, without the entry point."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def open_view(name: str, store, compare=None, timeout: int = 120, **params):
    """The page ``app/views/<name>.py`` after one run, which must show no exception."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "views" / f"{name}.py"), default_timeout=timeout)
    at.session_state["store_path"] = str(store)
    at.session_state["compare_path"] = None if compare is None else str(compare)
    for key, value in params.items():
        at.query_params[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def open_through_main(name: str, timeout: int = 120):
    """The page ``app/views/<name>.py`` reached from the entry point (its sidebar picks the store), after one run,
    which must show no exception."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=timeout)
    at.run()
    at.switch_page(f"views/{name}.py")
    at.run()
    assert not at.exception, at.exception
    return at
