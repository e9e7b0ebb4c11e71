"""Render time and memory of every app page on a store directory (a paper-sized one from bench.paper_store).

    python -m bench.app_pages STORE_DIR [--pages overview unit ...] [--json OUT.json]

Each page is measured in its own process with ``streamlit.testing.v1.AppTest`` (the real script, navigation and
caches, without a browser): imports are warmed first on an empty store directory, then the caches are cleared and
the page is rendered on STORE_DIR (``first``: the cold render that loads the store), rendered again unchanged
(``rerun``) and after changing its main controls (``change``). One more process visits every page in turn, as a
user would (``tour``: each page's first visit once the store is loaded), and reports what the app process then holds.
Memory is the process's peak resident set (``resource.getrusage``) and current one (/proc/self/status), both
including the ~0.4 GB of Python, Streamlit, torch and pandas the warm-up loads (reported as ``base``).

Where the time goes: every ``StoreReader.read`` (dataset, selection, seconds, bytes) and every ``altair_chart``,
``dataframe``, ``table`` and ``image`` call (seconds, rows sent) is recorded per render; ``--detail`` prints the
largest of them for pages that miss a target. Targets (issue 10): a render after the store's first load under 1 s;
the app process under 2 GB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAIN = str(ROOT / "app" / "main.py")
RENDER_TARGET_S = 1.0
MEMORY_TARGET_MB = 2048


def page_files() -> dict[str, str]:
    """{url name: page file} in the app's order, from app/main.py's PAGES (read as text: importing runs the app)."""
    import ast

    tree = ast.parse((ROOT / "app" / "main.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "PAGES" for t in node.targets):
            return {url: path for path, _, url, _ in ast.literal_eval(node.value)}
    raise RuntimeError("no PAGES list in app/main.py")


# -- controls changed on each page (the interaction a researcher makes most) -----------------------------------------
def _by_label(widgets, label: str):
    return next(w for w in widgets if w.label == label)


def _slide(slider, value):
    return slider.set_value(min(value, slider.max))


CHANGES = {
    "overview": [("layer conv5 -> conv4", lambda at: at.selectbox(key="layer").set_value("conv4"))],
    "unit": [("unit 0 -> 1", lambda at: _by_label(at.number_input, "Unit").set_value(1)),
             ("layer conv5 -> conv4", lambda at: at.selectbox(key="layer").set_value("conv4"))],
    "greedy": [("step 0 -> 10", lambda at: _slide(at.slider(key="greedy_step"), 10)),
               ("class 0 -> 1", lambda at: at.selectbox(key="greedy_class").set_value(1))],
    "attributes": [("rank by overall drop", lambda at: at.selectbox(key="rank_by").set_value("overall drop")),
                   ("layer conv5 -> conv4", lambda at: at.selectbox(key="layer").set_value("conv4"))],
    "dissection": [("threshold 0.04 -> 0.08", lambda at: at.slider(key="dissection_threshold").set_value(0.08))],
    "rotation": [("layer conv5 -> conv4", lambda at: at.selectbox(key="layer").set_value("conv4"))],
    "variants": [("IoU threshold -> 0.10",
                  lambda at: _by_label(at.number_input, "Best-concept IoU above").set_value(0.10))],
    "prediction": [],
}


# -- instrumentation -------------------------------------------------------------------------------------------------
class Recorder:
    """Store reads and element calls of the renders in this process, collected per phase."""

    def __init__(self):
        self.events: list[dict] = []

    def add(self, **event) -> None:
        self.events.append(event)

    @contextmanager
    def phase(self):
        start = len(self.events)
        found: list[dict] = []
        yield found
        found.extend(self.events[start:])


def _frame_rows(data) -> int:
    import pandas as pd

    if isinstance(data, pd.DataFrame):
        return len(data)
    if hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
        try:
            return len(data)
        except TypeError:
            return 0
    return 0


def chart_rows(chart, seen=None) -> int:
    """Rows of the distinct data frames an Altair chart (layered, concatenated or faceted) carries."""
    import pandas as pd

    seen = set() if seen is None else seen
    total = 0
    data = getattr(chart, "data", None)
    if isinstance(data, pd.DataFrame) and id(data) not in seen:
        seen.add(id(data))
        total += len(data)
    for attr in ("layer", "hconcat", "vconcat", "concat"):
        parts = getattr(chart, attr, None)
        if isinstance(parts, list):
            total += sum(chart_rows(part, seen) for part in parts)
    spec = getattr(chart, "spec", None)
    if spec is not None and hasattr(spec, "to_dict"):
        total += chart_rows(spec, seen)
    return total


@contextmanager
def instrumented(recorder: Recorder):
    """Within the block, StoreReader's reads and the data-carrying Streamlit elements are timed and sized."""
    import streamlit as st
    from streamlit.delta_generator import DeltaGenerator

    from store.reader import StoreReader

    saved = [(StoreReader, name, getattr(StoreReader, name)) for name in ("read", "__init__", "read_attrs")]
    saved += [(DeltaGenerator, name, getattr(DeltaGenerator, name)) for name in SIZES]
    saved += [(st, name, getattr(st, name)) for name in SIZES]
    _wrap(recorder, StoreReader, DeltaGenerator, st)
    try:
        yield recorder
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


def _wrap(recorder: Recorder, StoreReader, DeltaGenerator, st) -> None:
    original_read = StoreReader.read

    def read(self, path, selection=()):
        started = time.perf_counter()
        value = original_read(self, path, selection)
        recorder.add(kind="read", what=f"{path}{'' if selection == () else f'[{selection}]'}",
                     seconds=time.perf_counter() - started, bytes=int(getattr(value, "nbytes", 0)))
        return value

    StoreReader.read = read
    for name in ("__init__", "read_attrs"):  # opening a store (its table of contents) and reading group attributes
        original = getattr(StoreReader, name)

        def timed(self, *args, _original=original, _name=name):
            started = time.perf_counter()
            result = _original(self, *args)
            recorder.add(kind="read", what=f"StoreReader.{_name}{args[1:] if _name == '__init__' else args}",
                         seconds=time.perf_counter() - started, bytes=0)
            return result

        setattr(StoreReader, name, timed)
    for name, size in SIZES.items():
        original = getattr(DeltaGenerator, name)

        def wrapped(self, data=None, *args, _original=original, _name=name, _size=size, **kwargs):
            started = time.perf_counter()
            result = _original(self, data, *args, **kwargs)
            recorder.add(kind=_name, what=_name, seconds=time.perf_counter() - started, rows=_size(data))
            return result

        setattr(DeltaGenerator, name, wrapped)
        setattr(st, name, getattr(st._main, name))  # st.<element> is a method bound at import: rebind it


SIZES = {"altair_chart": chart_rows, "dataframe": _frame_rows, "table": _frame_rows,
         "image": lambda data: _frame_rows(data) if isinstance(data, list) else 1}


# -- memory ----------------------------------------------------------------------------------------------------------
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kilobytes on Linux


def current_rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


# -- rendering -------------------------------------------------------------------------------------------------------
def point_at(store_dir) -> None:
    os.environ["UNIT_ABLATION_STORES"] = str(Path(store_dir).resolve())
    os.environ["UNIT_ABLATION_DATA"] = str(Path(store_dir).resolve().parent)


def clear_caches() -> None:
    import streamlit as st

    st.cache_data.clear()
    st.cache_resource.clear()


def problems(at) -> list[str]:
    """Exceptions and error boxes of the last render (an error box is how a page reports a broken store)."""
    found = [str(e.value)[:200] for e in at.exception]
    found += [f"st.error: {e.value}"[:200] for e in at.error]
    return found


def timed_run(at, recorder: Recorder, label: str) -> dict:
    with recorder.phase() as events:
        started = time.perf_counter()
        at.run(timeout=900)
        seconds = time.perf_counter() - started
    return {"label": label, "seconds": seconds, "problems": problems(at), "events": events}


def registered_app():
    """An AppTest that has run once on an empty store directory, so st.navigation has registered every page.

    AppTest needs one run before switch_page; after switching it runs the page script alone, without main.py's
    sidebar, so callers set what the store picker would (session_state["store_path"]).
    """
    from streamlit.testing.v1 import AppTest

    point_at(tempfile.mkdtemp(prefix="app-pages-empty-"))
    at = AppTest.from_file(MAIN, default_timeout=900)
    at.run(timeout=900)
    return at


def open_page(at, page: str, store_dir):
    """Point ``at`` at the newest store of ``store_dir`` as the sidebar's picker does, and switch to ``page``."""
    from store import list_stores

    point_at(store_dir)
    stores = list_stores(store_dir)
    at.session_state["store_path"] = str(stores[0]) if stores else None
    at.session_state["compare_path"] = None
    return at.switch_page(page_files()[page])


def warm_imports(pages) -> None:
    """Run each page once on an empty store directory: Python imports and Streamlit's start-up are paid here."""
    at = registered_app()
    empty = os.environ["UNIT_ABLATION_STORES"]
    for page in pages:
        open_page(at, page, empty).run(timeout=900)
    clear_caches()


def measure_page(page: str, store_dir, recorder: Recorder) -> dict:
    """first (cold caches), rerun, then each of the page's control changes, in one AppTest session."""
    at = registered_app()
    clear_caches()
    open_page(at, page, store_dir)
    runs = [timed_run(at, recorder, "first")]
    runs.append(timed_run(at, recorder, "rerun"))
    for label, change in CHANGES.get(page, []):
        if runs[-1]["problems"]:
            break
        try:
            change(at)
        except (KeyError, StopIteration) as error:
            runs.append({"label": label, "seconds": float("nan"), "problems": [f"control not found: {error}"],
                         "events": []})
            continue
        runs.append(timed_run(at, recorder, f"change: {label}"))
    return {"page": page, "runs": runs}


def tour(store_dir, pages, recorder: Recorder) -> dict:
    """Every page in turn in one session (one app process): first visits with the store already loaded."""
    at = registered_app()
    clear_caches()
    runs = []
    for page in pages:
        open_page(at, page, store_dir)
        result = timed_run(at, recorder, page)
        runs.append(result)
    return {"page": "tour", "runs": runs}


def child(store_dir, page: str) -> dict:
    """What one measuring process reports: its runs and its memory."""
    pages = list(page_files())
    recorder = Recorder()
    warm_imports(pages if page == "tour" else [page])
    base = current_rss_mb()
    with instrumented(recorder):
        result = tour(store_dir, pages, recorder) if page == "tour" else measure_page(page, store_dir, recorder)
    result.update(base_mb=base, peak_mb=peak_rss_mb(), now_mb=current_rss_mb())
    return result


def run_child(store_dir, page: str, timeout: float) -> dict:
    command = [sys.executable, "-m", "bench.app_pages", str(store_dir), "--child", page]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        return {"page": page, "runs": [], "error": (done.stderr or done.stdout).strip().splitlines()[-5:]}
    return json.loads(lines[-1])


# -- report ----------------------------------------------------------------------------------------------------------
def summarise(events: list[dict], kind: str) -> tuple[float, int]:
    chosen = [e for e in events if e["kind"] == kind]
    return sum(e["seconds"] for e in chosen), len(chosen)


def verdict(result: dict) -> str:
    runs = result["runs"]
    if result.get("error") or any(run["problems"] for run in runs):
        return "ERROR"
    later = [run["seconds"] for run in runs if run["label"] != "first"]
    misses = []
    if later and max(later) >= RENDER_TARGET_S:
        misses.append(f"render {max(later):.1f} s")
    if result.get("peak_mb", 0) >= MEMORY_TARGET_MB:
        misses.append(f"memory {result['peak_mb'] / 1024:.1f} GB")
    return "miss: " + ", ".join(misses) if misses else "met"


def table(results: list[dict]) -> str:
    header = ("| page | first s | rerun s | change s (control) | reads s / MB (first) | charts s / rows (first) | "
              "peak RSS MB | verdict |")
    lines = [header, "|" + " --- |" * 8]
    for result in results:
        runs = {run["label"]: run for run in result["runs"]}
        if result.get("error"):
            lines.append(f"| {result['page']} | error: {' '.join(result['error'])[:120]} |" + " |" * 6)
            continue
        first = runs.get("first", {"seconds": float("nan"), "events": []})
        changes = "; ".join(f"{run['seconds']:.2f} ({label[8:]})" for label, run in runs.items()
                            if label.startswith("change"))
        read_s = sum(e["seconds"] for e in first["events"] if e["kind"] == "read")
        read_mb = sum(e.get("bytes", 0) for e in first["events"] if e["kind"] == "read") / 2**20
        chart_s = sum(e["seconds"] for e in first["events"] if e["kind"] != "read")
        chart_rows_ = sum(e.get("rows", 0) for e in first["events"] if e["kind"] == "altair_chart")
        rerun = runs.get("rerun", {}).get("seconds", float("nan"))
        lines.append(f"| {result['page']} | {first['seconds']:.2f} | {rerun:.2f} | {changes or '-'} | "
                     f"{read_s:.2f} / {read_mb:.0f} | {chart_s:.2f} / {chart_rows_} | {result.get('peak_mb', 0):.0f} | "
                     f"{verdict(result)} |")
    return "\n".join(lines)


def tour_table(result: dict) -> str:
    lines = ["| page (visited in turn) | first visit s | reads s / MB | charts+tables s / rows |", "|" + " --- |" * 4]
    for run in result.get("runs", []):
        read_s, _ = summarise(run["events"], "read")
        read_mb = sum(e.get("bytes", 0) for e in run["events"] if e["kind"] == "read") / 2**20
        chart_s = sum(e["seconds"] for e in run["events"] if e["kind"] != "read")
        rows = sum(e.get("rows", 0) for e in run["events"] if e["kind"] != "read")
        lines.append(f"| {run['label']} | {run['seconds']:.2f} | {read_s:.2f} / {read_mb:.0f} | "
                     f"{chart_s:.2f} / {rows} |")
    lines.append(f"\napp process after the tour: peak RSS {result.get('peak_mb', 0):.0f} MB (Python, Streamlit, torch "
                 f"and pandas alone: {result.get('base_mb', 0):.0f} MB)")
    return "\n".join(lines)


def detail(result: dict, top: int = 6) -> str:
    """The slowest reads and element calls of each render of a page that misses."""
    lines = [f"{result['page']}:"]
    for run in result["runs"]:
        events = sorted(run["events"], key=lambda e: -e["seconds"])[:top]
        lines.append(f"  {run['label']} ({run['seconds']:.2f} s): " + "; ".join(
            f"{e['what']} {e['seconds']:.2f} s" + (f" {e['bytes'] / 2**20:.1f} MB" if e.get("bytes") else "")
            + (f" {e['rows']} rows" if e.get("rows") else "") for e in events))
        lines.extend(f"    problem: {p}" for p in run["problems"])
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_pages", description=__doc__.splitlines()[0])
    parser.add_argument("store_dir", help="directory holding the store(s) the app shows (UNIT_ABLATION_STORES)")
    parser.add_argument("--pages", nargs="*", default=None, help="page url names (default: every page, then a tour)")
    parser.add_argument("--json", default=None, help="also write the raw results here")
    parser.add_argument("--detail", action="store_true", help="list the slowest reads and elements of missing pages")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per measuring process")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.store_dir, args.child), default=float))
        return 0
    pages = args.pages or list(page_files()) + ["tour"]
    results = []
    for page in pages:
        started = time.perf_counter()
        results.append(run_child(args.store_dir, page, args.timeout))
        print(f"measured {page} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    per_page = [r for r in results if r["page"] != "tour"]
    print(f"targets: re-render < {RENDER_TARGET_S:.0f} s after the store's first load, app process < "
          f"{MEMORY_TARGET_MB / 1024:.0f} GB\n")
    print(table(per_page))
    for result in results:
        if result["page"] == "tour":
            print("\n" + tour_table(result))
    if args.detail:
        for result in results:
            if result["page"] == "tour" or verdict(result) != "met":
                print("\n" + detail(result))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
