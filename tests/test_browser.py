"""End to end in a real browser: ``streamlit run app/main.py`` against copies of the session's tiny store, driven in
Debian's headless Chromium by Playwright. Every page is opened (also through links with query parameters), its main
controls are changed, and the charts, images and metrics it should draw are checked, with no exception element and no
console error. A full-page screenshot of each page is kept under test-artifacts/browser/ (or $BROWSER_ARTIFACTS).

Skipped when Chromium or Playwright is missing, unless REQUIRE_BROWSER=1 (CI) makes that a failure.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from tests.browser import (TIMEOUT_MS, Watch, act, artifacts_dir, chromium, copy_stores, full_screenshot,
                           missing_browser, page_paths, settle, shoot_pages, streamlit_server)

STORE, COPY = "demo", "demo-copy"  # two copies of the tiny store: a second store to compare with
PAGES = page_paths()
HOME = ""  # the first page of PAGES is the app's default page, served at the root URL
CHARTS_DRAWN = """(minimum) => {
    const drawn = [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].filter((chart) => {
        const canvas = chart.querySelector('canvas');
        if (canvas) return canvas.width > 0 && canvas.height > 0;
        return chart.querySelectorAll('svg.marks .role-mark > *').length > 0;
    });
    return drawn.length >= minimum;
}"""
WIDTHS = (1500, 1000)  # the widths the screenshots are taken at (a laptop's window, and half a wide screen)
IMAGES_LOADED = """(minimum) => {
    const images = [...document.querySelectorAll('[data-testid="stImage"] img')];
    return images.length >= minimum && images.every((image) => image.complete && image.naturalWidth > 0);
}"""


@pytest.fixture(scope="module")
def app(request, tmp_path_factory):
    """The base URL, store reader and layer sizes of a Streamlit server on copies of the tiny store, for the module."""
    reason = missing_browser()
    if reason:
        if os.environ.get("REQUIRE_BROWSER") == "1":
            pytest.fail(f"REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    from store import StoreReader

    run = request.getfixturevalue("tiny_run")
    stores = copy_stores(Path(run["store"]), tmp_path_factory.mktemp("browser-stores"), (STORE, COPY))
    reader = StoreReader(stores / f"{STORE}.h5")
    sizes = {layer: int(reader.layer(layer, "ablation", "overall_drop").shape[0]) for layer in reader.layers}
    log = artifacts_dir() / "streamlit.log"
    with streamlit_server(stores, Path(run["data_dir"]), log) as url:
        yield SimpleNamespace(url=url, sizes=sizes, reader=reader, stores=stores, data_dir=Path(run["data_dir"]))


@pytest.fixture(scope="module")
def browser(app, tmp_path_factory):
    """One Chromium page and its console watch, shared by every test of the module."""
    with chromium(tmp_path_factory.mktemp("chromium-profile")) as context:
        page = context.new_page()
        page.goto(app.url)  # the front door first: test_link_opened_first covers a link as the first request
        settle(page)
        yield page, Watch(page, app.url)


@contextmanager
def visit(browser, app, path: str, shot: str):
    """Open ``path``, yield the page for checks; then keep a screenshot and require no exception and no console
    error (a failed check keeps a screenshot named ``<shot>-failed``)."""
    page, watch = browser
    watch.take()
    page.goto(f"{app.url}/{path}")
    page.wait_for_function("window.__stRuns > 0")  # the page's first run has started (idle before it means nothing)
    settle(page)
    try:
        yield page
    except BaseException:
        full_screenshot(page, artifacts_dir() / f"{shot}-failed.png")
        raise
    full_screenshot(page, artifacts_dir() / f"{shot}.png")
    exceptions = page.get_by_test_id("stException")
    assert exceptions.count() == 0, f"{path}: {exceptions.first.inner_text()}"
    assert page.get_by_role("dialog").count() == 0, f"{path}: {page.get_by_role('dialog').first.inner_text()}"
    assert watch.take() == [], path


# -- reading and driving the page ------------------------------------------------------------------------------
def main(page):
    return page.get_by_test_id("stMain")


def title(page):
    return main(page).locator("h1").first


def wait_charts(page, minimum: int = 1) -> None:
    """At least ``minimum`` Vega-Lite charts with marks drawn."""
    page.wait_for_function(CHARTS_DRAWN, arg=minimum)


def wait_images(page, minimum: int) -> None:
    page.wait_for_function(IMAGES_LOADED, arg=minimum)


def metrics(page) -> dict[str, str]:
    """{label: value} of the metrics shown in the main area (waiting for the first to be drawn)."""
    main(page).get_by_test_id("stMetricValue").first.wait_for(state="visible")
    found = {}
    for metric in main(page).get_by_test_id("stMetric").all():
        label = metric.get_by_test_id("stMetricLabel").inner_text().strip()
        found[label] = metric.get_by_test_id("stMetricValue").inner_text().strip()
    return found


def control(page, role: str, label: str):
    """The visible main-area control of ARIA ``role`` (combobox, spinbutton, slider, switch) named ``label``."""
    return main(page).get_by_role(role, name=label, exact=role != "slider").locator("visible=true").first


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox (or multiselect) labelled ``label``, and wait for the rerun."""
    box = control(page, "combobox", label)
    box.click()
    box.fill(option)  # the list is filtered as one types (and long lists render only what is in view)
    act(page, lambda: page.get_by_role("option", name=option, exact=True).click())


def type_number(page, label: str, value) -> None:
    field = control(page, "spinbutton", label)
    field.fill(str(value))
    act(page, lambda: field.press("Enter"))


def press_slider(page, label: str, key: str) -> None:
    thumb = control(page, "slider", label)
    thumb.focus()
    act(page, lambda: thumb.press(key))


def click_button(page, name: str) -> None:
    act(page, lambda: main(page).get_by_role("button", name=name, exact=True).locator("visible=true").first.click())


def download(page, name: str) -> bytes:
    """The file a main-area download button named ``name`` (the first visible one) gives."""
    with page.expect_download() as started:
        main(page).get_by_role("button", name=name, exact=True).locator("visible=true").first.click()
    data = Path(started.value.path()).read_bytes()
    settle(page)
    return data


def query(page) -> dict[str, str]:
    from urllib.parse import parse_qsl, urlparse

    return dict(parse_qsl(urlparse(page.url).query))


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    playwright_expect.set_options(timeout=TIMEOUT_MS)
    return playwright_expect(locator)


def last(layers) -> str:
    return list(layers)[-1]


def sidebar_box(page, label: str):
    return page.get_by_test_id("stSidebar").get_by_role("combobox", name=label, exact=True)


def active_page(page):
    return page.locator('[data-testid="stSidebarNavLink"][aria-current="page"]')


# -- the pages -------------------------------------------------------------------------------------------------
def test_link_opened_first(app, tmp_path):
    """A shared link that is a fresh server's first request opens the app's page (sidebar store picker and page
    navigation from app/main.py), not the bare script of the same name."""
    with streamlit_server(app.stores, app.data_dir, tmp_path / "streamlit.log") as fresh, \
            chromium(tmp_path / "profile") as context:
        page = context.new_page()
        watch = Watch(page, fresh)
        page.goto(f"{fresh}/unit?store={STORE}&layer=conv5&unit=3")
        settle(page)
        full_screenshot(page, artifacts_dir() / "link-opened-first.png")
        expect(active_page(page)).to_have_text(re.compile(rf"{re.escape(PAGES['unit'])}\s*$"))
        expect(title(page)).to_have_text("conv5 · unit 3")
        assert watch.take() == []


def test_every_page_opens(browser, app):
    """Each page of app/main.py opened cold by its URL path, with a compared store and a layer: the page itself (no
    "Page not found" dialog), its query parameters applied, content, no exception, no error."""
    for path in PAGES:
        with visit(browser, app, f"{path}?store={STORE}&compare={COPY}&layer=conv4", f"{path}-compare") as page:
            expect(active_page(page)).to_have_text(re.compile(rf"{re.escape(PAGES[path])}\s*$"))
            assert re.search(rf"/{re.escape(path)}$", page.url.split("?")[0]), page.url
            expect(page.get_by_role("dialog")).to_have_count(0)
            expect(main(page).get_by_test_id("stElementContainer").first).to_be_visible()
            assert query(page).get("store") == STORE and query(page).get("compare") == COPY, page.url
            if path not in ("greedy", "variants", "prediction", "search"):  # pages whose picker offers conv4 keep it
                assert query(page).get("layer") == "conv4", (path, page.url)


def test_every_page_fits_at_1500_and_1000_px(browser, app):
    """Every page opened cold at each width of WIDTHS, alone and beside a compared store: no chart drawn wider than
    its place (cut off at the right), no dialog, exception or console error; full-page screenshots are kept as
    <page>-<width>[-compare].png for a look by eye."""
    page, watch = browser
    watch.take()
    out = artifacts_dir()
    problems = shoot_pages(page, app.url, PAGES, WIDTHS, out, f"?store={STORE}")
    problems.update(shoot_pages(page, app.url, PAGES, WIDTHS, out, f"?store={STORE}&compare={COPY}", "-compare"))
    assert {shot: found for shot, found in problems.items() if found} == {}
    assert watch.take() == []


def test_root_opens_overview_with_the_link(browser, app):
    """The root URL is not a page of its own: it opens Overview with the link's parameters."""
    with visit(browser, app, f"?store={STORE}&layer=conv4", "root") as page:
        expect(active_page(page)).to_have_text(re.compile(rf"{re.escape(PAGES['overview'])}\s*$"))
        expect(page).to_have_url(re.compile(r"/overview\?"))
        expect(page.get_by_role("dialog")).to_have_count(0)
        assert query(page).get("layer") == "conv4", page.url


def test_overview(browser, app):
    """Fig. 3 for the last layer, then another layer; its chart downloads as SVG and its numbers as CSV."""
    sizes = app.sizes
    with visit(browser, app, f"{HOME}?store={STORE}", "overview") as page:
        expect(title(page)).to_contain_text("Overview")
        wait_charts(page)
        assert metrics(page)["Units"] == str(sizes[last(sizes)])
        first = list(sizes)[0]
        choose(page, "Layer", first)
        expect(control(page, "combobox", "Layer")).to_have_value(first)
        expect(main(page).get_by_test_id("stMetricValue").first).to_have_text(str(sizes[first]))
        assert query(page)["layer"] == first
        wait_charts(page)
        runs = page.evaluate("window.__stRuns")
        svg = download(page, "SVG").decode()
        assert svg.lstrip().startswith(("<svg", "<?xml")) and "</svg>" in svg
        assert page.evaluate("window.__stRuns") == runs  # a download does not rerun the page
        rows = download(page, "CSV").decode().strip().splitlines()
        assert "unit" in rows[0] and len(rows) > sizes[first], rows[:2]


def test_overview_point_opens_unit(browser, app):
    """Clicking a point of the sorted curve opens that unit's page (a link with store, layer and unit)."""
    with visit(browser, app, f"{HOME}?store={STORE}&layer=conv4", "overview-click") as page:
        wait_charts(page)
        point = main(page).locator('[data-testid="stVegaLiteChart"] .mark-symbol path').first
        act(page, lambda: point.click(force=True))
        expect(page).to_have_url(re.compile(r"/unit\?.*unit=\d+"))
        settle(page)
        expect(title(page)).to_have_text(f"conv4 · unit {query(page)['unit']}")


def test_unit_from_link(browser, app):
    """A link to a unit shows its drops (the store's numbers), chart and top images; the unit input and the layer
    picker change the page and its link."""
    reader = app.reader
    with visit(browser, app, f"unit?store={STORE}&layer=conv5&unit=3", "unit") as page:
        expect(title(page)).to_have_text("conv5 · unit 3")
        overall = float(reader.layer("conv5", "ablation", "overall_drop")[3])
        assert metrics(page)["Overall accuracy drop"] == f"{100 * overall:.2f} pts"
        wait_charts(page)
        top_k = reader.layer("conv5", "topimages", "thumbs").shape[1]
        wait_images(page, top_k)
        type_number(page, "Unit", 7)
        expect(title(page)).to_have_text("conv5 · unit 7")
        assert query(page)["unit"] == "7"
        number = main(page).get_by_test_id("stNumberInput").filter(
            has=page.get_by_role("spinbutton", name="Unit", exact=True))
        act(page, lambda: number.get_by_role("button", name="Increment").click())
        expect(title(page)).to_have_text("conv5 · unit 8")
        choose(page, "Layer", "conv3")
        expect(title(page)).to_have_text("conv3 · unit 8")
        overall = float(reader.layer("conv3", "ablation", "overall_drop")[8])
        assert metrics(page)["Overall accuracy drop"] == f"{100 * overall:.2f} pts"
        assert query(page)["layer"] == "conv3" and query(page)["unit"] == "8"
        wait_charts(page)
        wait_images(page, top_k)


def test_greedy(browser, app):
    """Replay a class step by step, the Fig. 4 curves, and a live greedy run of three units."""
    reader = app.reader
    layer = next(layer for layer in reader.layers if reader.has_section(layer, "greedy"))
    classes = list(reader.classes)
    rows = reader.layer(layer, "greedy", "classes")
    with visit(browser, app, f"greedy?store={STORE}", "greedy") as page:
        wait_charts(page)
        assert len(metrics(page)) == 3
        second = classes[int(rows[1])]
        choose(page, "Class", second)
        expect(control(page, "combobox", "Class")).to_have_value(second)
        expect(main(page).get_by_text("Ablated: nothing yet")).to_be_visible()
        press_slider(page, "Units ablated", "ArrowRight")
        first_unit = int(reader.layer(layer, "greedy", "order")[1, 0])
        expect(main(page).get_by_text(f"Ablated: {first_unit}", exact=True)).to_be_visible()
        act(page, lambda: page.get_by_role("tab", name=re.compile("Greedy vs random")).click())
        wait_charts(page, 4)
        act(page, lambda: page.get_by_role("tab", name=re.compile("Live")).click())
        compare = sidebar_box(page, "Compare with")
        expect(compare).to_have_value("none")
        load = main(page).get_by_role("switch", name=re.compile("^Load")).locator("visible=true")
        if load.count():  # live data is loaded on request
            act(page, lambda: load.first.click(force=True))
            expect(compare).to_have_value("none")  # the toggle's rerun once reset it to an empty choice
            act(page, lambda: load.first.click(force=True))
            expect(compare).to_have_value("none")
            act(page, lambda: load.first.click(force=True))
        type_number(page, "Units to ablate", 3)
        click_button(page, "Run")
        expect(main(page).get_by_test_id("stMetric").filter(has_text="Units ablated")
               .get_by_test_id("stMetricValue")).to_have_text("3")
        wait_charts(page, 5)
        heading = page.get_by_role("heading", name="Classes that lose most", exact=True)
        losers = main(page).get_by_test_id("stColumn").filter(has=heading).get_by_test_id("stVegaLiteChart")
        if losers.count():  # some other class lost accuracy: one label per bar, none dropped for want of room
            bars = losers.last.locator("svg.marks .role-mark path").count()
            labels = losers.last.locator('svg.marks g.role-axis[aria-label^="Y-axis"] .role-axis-label text').count()
            assert bars > 0 and labels == bars, (bars, labels)
        expect(compare).to_have_value("none")


def test_attributes(browser, app):
    """Fig. 5 grid and the ranking table; ranking and layer controls."""
    with visit(browser, app, f"attributes?store={STORE}&layer=conv4", "attributes") as page:
        expect(title(page)).to_contain_text("Attributes")
        wait_charts(page)
        expect(control(page, "combobox", "Layer")).to_have_value("conv4")
        expect(main(page).get_by_test_id("stDataFrame").first).to_be_visible()
        choose(page, "Rank units by", "overall drop")
        expect(control(page, "combobox", "Rank units by")).to_have_value("overall drop")
        act(page, lambda: control(page, "switch", "Ascending").click(force=True))
        expect(control(page, "switch", "Ascending")).to_be_checked()
        choose(page, "Layer", "conv5")
        assert query(page)["layer"] == "conv5"
        wait_charts(page)


def test_dissection(browser, app):
    """Detector counts follow the threshold slider (the store's IoUs); "Open unit" opens the best detector."""
    sizes, reader = app.sizes, app.reader
    with visit(browser, app, f"dissection?store={STORE}&layer=conv3", "dissection") as page:
        expect(title(page)).to_contain_text("Dissection")
        wait_charts(page)
        assert metrics(page)["Units"] == str(sizes["conv3"])
        press_slider(page, "IoU threshold for a detector", "Home")  # 0: every unit with any overlap is a detector
        best_iou = reader.layer("conv3", "dissection", "best_iou")
        expect(main(page).get_by_test_id("stMetric").filter(has_text="Detectors")
               .get_by_test_id("stMetricValue")).to_have_text(str(int((best_iou > 0).sum())))
        click_button(page, "Open unit")
        expect(page).to_have_url(re.compile(r"/unit\?.*layer=conv3"))
        settle(page)
        expect(title(page)).to_have_text(f"conv3 · unit {int(np.argmax(best_iou))}")


def test_rotation(browser, app):
    """Fig. 7: two charts (max class drop, overall drop), four metrics, the all-layers table; layer picker."""
    with visit(browser, app, f"rotation?store={STORE}", "rotation") as page:
        expect(title(page)).to_contain_text("random directions")
        wait_charts(page, 2)
        assert len(metrics(page)) == 4
        choose(page, "Layer", "conv3")
        assert query(page)["layer"] == "conv3"
        wait_charts(page, 2)
        expect(main(page).get_by_test_id("stDataFrame").first).to_be_visible()


def test_variants(browser, app):
    """Figs. 8 and 9 for the picked stores; adding a store and changing the IoU threshold redraw them."""
    with visit(browser, app, f"variants?store={STORE}", "variants") as page:
        expect(title(page)).to_contain_text("Variants")
        wait_charts(page, 2)  # max-drop curves and detector counts
        choose(page, "Stores to compare", COPY)
        page.keyboard.press("Escape")
        expect(main(page).get_by_role("button", name=f"Remove {COPY}")).to_be_visible()
        type_number(page, "Best-concept IoU above", 0.0)
        expect(control(page, "spinbutton", "Best-concept IoU above")).to_have_value("0.00")
        wait_charts(page, 2)


def test_prediction(browser, app):
    """Only copies of one run here: the form runs and says why it cannot train (one line, no traceback)."""
    with visit(browser, app, f"prediction?store={STORE}", "prediction") as page:
        expect(title(page)).to_contain_text("Predicting")
        click_button(page, "Train and test")
        expect(main(page).get_by_test_id("stAlertContentError")).to_contain_text("need more than --train 3 stores")


@pytest.mark.skipif("search" not in PAGES, reason="no search page in app/main.py")
def test_search(browser, app):
    """Unit counts (from the store) for no filter and for "matters most for class"; the filter is in the link."""
    sizes, reader = app.sizes, app.reader
    total = sum(sizes.values())
    found = main(browser[0]).get_by_test_id("stMetric").filter(has_text="Units found").get_by_test_id("stMetricValue")
    with visit(browser, app, f"search?store={STORE}", "search") as page:
        expect(title(page)).to_contain_text("Search")
        expect(found).to_have_text(f"{total} of {total}")
        drops = [reader.layer(layer, "ablation", "class_drop") for layer in sizes]
        classes = list(reader.classes)
        worst = int(drops[-1].max(1).argmax())  # the last layer's unit whose ablation hurts a class most
        target = int(drops[-1][worst].argmax())
        expected = sum(int(((drop.max(1) > 0) & (drop.argmax(1) == target)).sum()) for drop in drops)
        choose(page, "Matters most for class", classes[target])
        expect(found).to_have_text(f"{expected} of {total}")
        assert query(page)["class"] == classes[target]
        expect(main(page).get_by_test_id("stDataFrame").first).to_be_visible()


# -- the first run: stores still being computed ----------------------------------------------------------------
PLAN = ["setup", "activations", "ablation/conv5", "attributes/conv5", "dissection/conv5"]


def held_lock(path: Path):
    """An open file with an flock on it: what a running writer holds (store/progress.py reads /proc/locks)."""
    import fcntl

    handle = open(path, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return handle


def fake_parts(stores: Path, name: str, done: list[str]):
    """A compute.all run of ``name`` in progress: its parts folder with the plan, ``done`` finished, its lock held."""
    import json

    folder = stores / f".{name}.parts"
    folder.mkdir(exist_ok=True)
    (folder / "run.json").write_text(json.dumps({"run_key": "k", "plan": PLAN,
                                                 "provenance": {"model": "demo-bn", "run_name": name}}))
    for stage in done:
        (folder / (stage.replace("/", "__") + ".h5")).write_bytes(b"")
    return held_lock(folder / "lock")


def test_pages_say_which_store_is_coming_and_show_it_when_it_lands(browser, app, tmp_path):
    """While the first run's background work computes demo-bn and the instances, Variants and Predicting classes say
    how far each is (no chart of one store), the sidebar lists the runs, both refresh while the page stays open, and
    a store that lands shows up without a reload."""
    import shutil

    from store import progress

    stores = copy_stores(app.reader.path, tmp_path / "stores", (STORE,))
    if progress.locked_inodes() is None:
        pytest.skip("/proc/locks is not readable here: runs in progress cannot be told alive")
    queue = [("demo-bn", "computing"), ("demo-dropout", "waiting"), ("demo-seed1", "waiting")]
    progress.write_suite_status(stores, queue, "waiting", ["demo", "demo-seed1"])
    locks = [held_lock(stores / progress.SUITE_LOCK), fake_parts(stores, "demo-bn", PLAN[:2])]
    try:
        # A page of the module's browser: a second Playwright would meet the first one's event loop.
        with streamlit_server(stores, app.data_dir, tmp_path / "streamlit.log") as url:
            page = browser[0].context.new_page()
            watch = Watch(page, url)
            page.goto(f"{url}/variants?store={STORE}")
            settle(page)
            notes = main(page).get_by_test_id("stAlert")
            expect(notes).to_contain_text("demo-bn is being computed: stage 3 of 5: ablation/conv5")
            expect(notes).to_contain_text("demo-dropout is coming: 1 store ahead of it")
            expect(main(page).get_by_test_id("stVegaLiteChart")).to_have_count(0)
            sidebar = page.get_by_test_id("stSidebar")
            expect(sidebar).to_contain_text("demo-bn: stage 3 of 5: ablation/conv5")
            expect(sidebar).to_contain_text("Table 1: waiting")
            full_screenshot(page, artifacts_dir() / "variants-coming.png", width=1500)

            (stores / ".demo-bn.parts" / "ablation__conv5.h5").write_bytes(b"")  # the next stage, page left open
            expect(notes).to_contain_text("stage 4 of 5: attributes/conv5")
            expect(sidebar).to_contain_text("demo-bn: stage 4 of 5: attributes/conv5")

            shutil.copy2(stores / f"{STORE}.h5", stores / ".demo-bn.h5.assembling")  # the run commits its store
            (stores / ".demo-bn.h5.assembling").rename(stores / "demo-bn.h5")
            shutil.rmtree(stores / ".demo-bn.parts")
            progress.write_suite_status(stores, [("demo-bn", "done"), *queue[1:]], "waiting", ["demo", "demo-seed1"])
            expect(main(page).get_by_role("button", name="Remove demo-bn")).to_be_visible()  # picked by default
            settle(page)
            wait_charts(page, 2)
            expect(main(page).get_by_test_id("stAlert").first).to_contain_text("demo-dropout is coming: next")
            expect(sidebar).not_to_contain_text("demo-bn:")

            page.goto(f"{url}/prediction?store={STORE}")
            settle(page)
            expect(main(page).get_by_test_id("stAlert").first).to_contain_text("demo-seed1 is coming")
            expect(main(page).get_by_test_id("stAlert").first).to_contain_text("Table 1 is computed over demo, "
                                                                               "demo-seed1 once they are all here")
            full_screenshot(page, artifacts_dir() / "prediction-coming.png", width=1500)
            assert watch.take() == []
            page.close()
    finally:
        for lock in locks:
            lock.close()
