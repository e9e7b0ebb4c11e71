"""Helpers for the end-to-end browser tests: a ``streamlit run app/main.py`` server on a free port, Debian's headless
Chromium driven by Playwright, and waits that follow Streamlit's own run state instead of fixed sleeps.

Chromium comes from the system (``/usr/bin/chromium``, Debian package ``chromium``), never from ``playwright install``:
the tests must run on machines without internet access.
"""

from __future__ import annotations

import ast
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("CHROMIUM", "/usr/bin/chromium"))
# Without the background-networking flags Chromium keeps calling Google's hosts; on a closed network those calls are
# refused many at a time and slow everything down.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1400, "height": 1000}
TIMEOUT_MS = 30_000  # one page's script run on a 2-core machine shared with other work
IDLE = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return app !== null && app.dataset.testConnectionState === 'CONNECTED'
        && app.dataset.testScriptState === 'notRunning'
        && document.querySelector('[data-stale="true"]') === null;
}"""
# Counts the app's runs: Streamlit sets data-test-script-state="running" on stApp while the page script runs.
RUN_COUNTER = """
window.__stRuns = 0;
new MutationObserver((mutations) => {
    for (const m of mutations) {
        if (m.target.getAttribute('data-test-script-state') === 'running') window.__stRuns += 1;
    }
}).observe(document, {subtree: true, attributes: true, attributeFilter: ['data-test-script-state']});
"""
# Console errors that say nothing about the app: the page icon (":material/..." favicon) comes from fonts.gstatic.com,
# unreachable offline; and a page opened at /<page> first probes /<page>/_stcore/{health,host-config} to find the
# server's base path (Streamlit's frontend, getPossibleBaseUris), answered 404 before it tries /_stcore/.
BASE_PATH_PROBE = re.compile(r"^/[^/]+(/[^/]+)*/_stcore/(health|host-config)$")


def missing_browser() -> str | None:
    """Why the browser tests cannot run here, or None when Chromium and Playwright are both present."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (Debian: apt-get install chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -r requirements.txt)"
    return None


def page_paths(main: Path = ROOT / "app" / "main.py") -> dict[str, str]:
    """{url path: title} of every page in app/main.py's PAGES, read without running Streamlit."""
    for node in ast.walk(ast.parse(main.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PAGES" for t in node.targets):
            return {url: title for _, title, url, *_ in ast.literal_eval(node.value)}
    raise AssertionError(f"no PAGES list in {main}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def artifacts_dir() -> Path:
    """Where screenshots go: $BROWSER_ARTIFACTS, else test-artifacts/browser/ in the repository (git-ignored)."""
    path = Path(os.environ.get("BROWSER_ARTIFACTS") or ROOT / "test-artifacts" / "browser")
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def streamlit_server(stores: Path, data_dir: Path, log: Path, timeout: float = 60.0):
    """Run the app on a free port against ``stores``; yield its base URL once /_stcore/health answers."""
    process, url = start_streamlit(stores, data_dir, log, timeout)
    try:
        yield url
    finally:
        stop_streamlit(process)


def start_streamlit(stores: Path, data_dir: Path, log: Path, timeout: float = 60.0, head: list | None = None,
                    env: dict | None = None):
    """(process, base URL) of ``streamlit run app/main.py`` on a free loopback port, once /_stcore/health answers.
    ``head`` replaces ``python -m streamlit`` (a wrapper that times script runs), ``env`` adds variables."""
    port = free_port()
    env = dict(os.environ, UNIT_ABLATION_STORES=str(stores), UNIT_ABLATION_DATA=str(data_dir),
               OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), **(env or {}))
    command = (head or [sys.executable, "-m", "streamlit"]) + [
        "run", "app/main.py", "--server.headless", "true", "--server.port", str(port), "--server.address",
        "127.0.0.1", "--browser.gatherUsageStats", "false",
        # a file edited while the tests run must not rerun the page under them
        "--server.fileWatcherType", "none", "--server.runOnSave", "false", "--client.toolbarMode", "viewer"]
    with open(log, "w") as out:
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"streamlit exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            pass
        if time.monotonic() > deadline:
            stop_streamlit(process)
            raise RuntimeError(f"streamlit did not answer in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


def stop_streamlit(process) -> None:
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def chromium(user_data_dir: Path):
    """One headless Chromium (Debian's) with a fresh profile; yields a Playwright browser context."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport=VIEWPORT, accept_downloads=True)
        context.set_default_timeout(TIMEOUT_MS)
        context.add_init_script(RUN_COUNTER)
        try:
            yield context
        finally:
            context.close()


class Watch:
    """Console errors and uncaught page errors of one page, less the offline noise described at BASE_PATH_PROBE."""

    def __init__(self, page, base_url: str):
        self.base_url = base_url
        self.errors: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"pageerror: {error}"))

    def _console(self, message) -> None:
        if message.type != "error":
            return
        source = message.location.get("url", "") if message.location else ""
        if message.text.startswith("Failed to load resource") and self._expected_failure(source):
            return
        self.errors.append(f"console: {message.text} ({source})")

    def _expected_failure(self, url: str) -> bool:
        if not url.startswith(self.base_url):
            return True  # another host: unreachable here, and nothing the app itself asks for
        return bool(BASE_PATH_PROBE.match(url[len(self.base_url):].split("?")[0]))

    def take(self) -> list[str]:
        """The errors seen since the last call."""
        errors, self.errors = self.errors, []
        return errors


def settle(page, timeout: int = TIMEOUT_MS) -> None:
    """Wait until the app is connected, its script has finished and no element is stale (left from a former run);
    an exception element then fails the test with its message."""
    page.wait_for_function(IDLE, timeout=timeout)
    exception = page.locator('[data-testid="stException"]')
    if exception.count():  # final once the run is over: fail now with its message rather than time out later
        raise AssertionError(f"{page.url}: {exception.first.inner_text()}")


def act(page, action, rerun_within: int = 3000) -> None:
    """Do ``action`` (a widget change) and wait for the rerun it causes to finish.

    The rerun is seen through the run counter; a run too short to be seen is covered by the IDLE check that follows.
    """
    before = page.evaluate("window.__stRuns")
    action()
    try:
        page.wait_for_function(f"window.__stRuns > {before}", timeout=rerun_within)
    except Exception:  # playwright's TimeoutError: the run may have come and gone between two polls
        pass
    settle(page)


def full_screenshot(page, path: Path, width: int = VIEWPORT["width"]) -> None:
    """A screenshot of the whole page at ``width`` px: Streamlit scrolls inside its main area, so the viewport is
    grown to fit it."""
    page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
    settle(page)
    page.wait_for_timeout(300)  # the new width's layout, before its height is read
    height = page.evaluate("""() => Math.max(...['stMain', 'stAppViewContainer', 'stSidebarContent'].map(
        id => document.querySelector(`[data-testid="${id}"]`)?.scrollHeight || 0))""")
    page.set_viewport_size({"width": width, "height": max(VIEWPORT["height"], int(height))})
    try:
        settle(page)
        page.screenshot(path=str(path), full_page=True)
    finally:
        page.set_viewport_size(VIEWPORT)


# Charts drawn wider than the element Streamlit gives them are clipped at its right edge (the Attributes grid's fifth
# column was): every visible chart's drawing must fit in its element and in the main area.
CHARTS_CUT = """() => {
    const main = document.querySelector('[data-testid="stMain"]').getBoundingClientRect();
    const cut = [];
    document.querySelectorAll('[data-testid="stVegaLiteChart"]').forEach((chart, i) => {
        const box = chart.getBoundingClientRect();
        const drawn = chart.querySelector('canvas, svg.marks');
        if (!drawn || box.width === 0) return;  // not drawn yet, or in a tab not shown
        const right = drawn.getBoundingClientRect().right;
        if (right > box.right + 1 || right > main.right + 1 || chart.scrollWidth > chart.clientWidth + 1)
            cut.push(`chart ${i}: drawn to x=${Math.round(right)}, element ends at ${Math.round(box.right)}`);
    });
    return cut;
}"""


def charts_cut(page) -> list[str]:
    """The visible charts that do not fit their element or the main area (one line each)."""
    return page.evaluate(CHARTS_CUT)


def copy_stores(store: Path, target: Path, names: tuple[str, ...]) -> Path:
    """Copies of one store under several names in a directory of its own (pages may write into their store)."""
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy2(store, target / f"{name}.h5")
    return target


# Every chart in view has drawn its marks (a chart still being embedded has no canvas or svg yet).
ALL_CHARTS_DRAWN = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')]
    .filter((chart) => chart.getBoundingClientRect().width > 0)
    .every((chart) => chart.querySelector('canvas, svg.marks') !== null)"""


def shoot_pages(page, url: str, paths, widths, out: Path, query: str = "", suffix: str = "") -> dict[str, list[str]]:
    """Open every page path cold at every width, keep a full-page screenshot ``<path>-<width><suffix>.png`` in
    ``out``, and return {shot: problems}: charts cut off, dialogs (an exception element fails in ``settle``)."""
    problems = {}
    for width in widths:
        page.set_viewport_size({"width": width, "height": VIEWPORT["height"]})
        for path in paths:
            shot = f"{path}-{width}{suffix}"
            page.goto(f"{url}/{path}{query}")
            page.wait_for_function("window.__stRuns > 0")
            settle(page)
            page.wait_for_function(ALL_CHARTS_DRAWN)
            found = charts_cut(page)
            found += [f"dialog: {text}" for text in page.get_by_role("dialog").all_inner_texts()]
            full_screenshot(page, out / f"{shot}.png", width=width)
            problems[shot] = found
    page.set_viewport_size(VIEWPORT)
    return problems


def main(argv=None) -> int:
    """``python -m tests.browser STORE_DIR [OUT]``: serve the app on STORE_DIR and take full-page screenshots of every
    page at 1500 and 1000 px (into OUT, default test-artifacts/browser/shots) for a look by eye; lists the charts
    cut off, dialogs and console errors it meets."""
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(prog="python -m tests.browser")
    parser.add_argument("stores", type=Path)
    parser.add_argument("out", type=Path, nargs="?", default=None)
    parser.add_argument("--query", default="", help="query string for every page, e.g. '?store=demo'")
    args = parser.parse_args(argv)
    out = args.out or artifacts_dir() / "shots"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch, \
            streamlit_server(args.stores.resolve(), args.stores.resolve().parent, Path(scratch) / "log") as url, \
            chromium(Path(scratch) / "profile") as context:
        page = context.new_page()
        watch = Watch(page, url)
        problems = shoot_pages(page, url, page_paths(), (1500, 1000), out, args.query)
        problems["console"] = watch.take()
    for shot, found in problems.items():
        print(f"{shot}: {'; '.join(found) if found else 'ok'}")
    print(f"screenshots in {out}")
    return int(any(problems.values()))


if __name__ == "__main__":
    raise SystemExit(main())
