"""End to end in Chromium: the images behind a drop (issue 20) on the greedy replay and the Unit page, drawn with their
captions and no console error. Skipped like tests/test_browser.py where Chromium or Playwright is missing."""

from __future__ import annotations

import os
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from compute import flips
from tests.browser import artifacts_dir, chromium, copy_stores, missing_browser, settle, streamlit_server
from tests.test_browser import (IMAGES_LOADED, choose, expect, main, metrics, press_slider, visit,  # noqa: F401
                                wait_charts)
from tests.test_flips import varied_run  # noqa: F401  (the store with flips: a fixture)

ROOT = Path(__file__).resolve().parent.parent
STORE = "demo"


@pytest.fixture(scope="module")
def app(varied_run, tmp_path_factory):  # noqa: F811
    reason = missing_browser()
    if reason:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from store import StoreReader

    stores = copy_stores(Path(varied_run["store"]), tmp_path_factory.mktemp("browser-flips"), (STORE,))
    reader = StoreReader(stores / f"{STORE}.h5")
    with streamlit_server(stores, Path(varied_run["data_dir"]), artifacts_dir() / "streamlit-flips.log") as url:
        yield SimpleNamespace(url=url, reader=reader, stores=stores)


@pytest.fixture(scope="module")
def browser(app, tmp_path_factory):
    from tests.browser import Watch

    with chromium(tmp_path_factory.mktemp("chromium-flips")) as context:
        page = context.new_page()
        page.goto(app.url)
        settle(page)
        yield page, Watch(page, app.url)


def captions(page) -> list[str]:
    return [text.strip() for text in main(page).get_by_test_id("stImageCaption").all_inner_texts()]


def test_greedy_step_shows_the_images_it_changes(browser, app):
    reader = app.reader
    order = reader.layer("conv5", "greedy", "order")
    table = {name: reader.read(f"layers/conv5/greedy/flips/{name}") for name in (*flips.GREEDY_FIELDS, "start")}
    part = flips.step_slice(table["start"], order.shape[1], 0, 1)
    rows = {name: table[name][part] for name in ("image", "before", "after")}
    kinds = flips.kinds(rows, reader.read("images/labels"))
    lost, gained = int(kinds["lost"].sum()), int(kinds["gained"].sum())
    assert lost + gained > 0
    with visit(browser, app, f"greedy?store={STORE}", "flips-greedy") as page:
        expect(main(page).get_by_text("Step 0 is the unablated network", exact=False)).to_be_visible()
        press_slider(page, "Units ablated", "ArrowRight")
        expect(main(page).get_by_text(f"Images step 1 changes (ablating unit {order[0, 0]})")).to_be_visible()
        shown = min(lost, 20) + min(gained, 20)
        page.wait_for_function(IMAGES_LOADED, arg=shown)
        found = captions(page)
        assert sum("→" in c for c in found) == min(lost, 20)
        assert sum("(was " in c for c in found) == min(gained, 20)


@pytest.mark.skipif("flips_section" not in (ROOT / "app" / "views" / "unit.py").read_text(),
                    reason="the Unit page does not call app.flip_sections.flips_section yet")
def test_unit_page_shows_the_images_behind_a_drop(browser, app):
    reader = app.reader
    lost = reader.layer("conv5", "ablation", "lost")
    unit, target = (int(i) for i in np.unravel_index(np.argmax(lost), lost.shape))
    name = reader.classes[target]
    with visit(browser, app, f"unit?store={STORE}&layer=conv5&unit={unit}&class={name}", "flips-unit") as page:
        expect(main(page).get_by_role("heading", name="Images behind the drop")).to_be_visible()
        assert metrics(page)[f"{name} images lost"] == str(lost[unit, target])
        found = [c for c in captions(page) if "→" in c]
        assert len(found) == lost[unit, target] and all(re.match(rf"#\d+ {re.escape(name)} → ", c) for c in found)
        wait_charts(page, 2)  # the drops and where the lost images go
