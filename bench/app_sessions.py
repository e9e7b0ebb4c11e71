"""Concurrent app sessions changing units on one store: lost changes, errors, render time per change, server memory.

    python -m bench.app_sessions STORE_DIR [--sessions 10] [--seconds 60] [--overlap S] [--json OUT.json]

One ``streamlit run app/main.py --server.headless true --server.fileWatcherType none`` (loopback, free port,
UNIT_ABLATION_STORES=STORE_DIR) and one headless Chromium (Debian's, as in tests/browser.py) with N browser contexts,
one page each, driven concurrently through Playwright's asyncio API. One browser with N contexts rather than N
browsers: every context is its own browser profile and every page its own websocket, so each is a separate Streamlit
session with its own session state and URL, while the browser's shared processes (browser, GPU-less compositor,
network service) are paid once; on the same 2 cores as the server, N whole browsers would take more of the CPU the
measurement is about. Each page opens ``/unit?store=<newest store>&layer=<deepest ablation layer>&unit=0``.

Each session then changes the unit again and again until ``--seconds`` have passed: it types a new number into the
Unit input and presses Enter, waits until the app is idle (connected, script not running, no stale element:
tests/browser.py's IDLE) after a run that ended since the Enter, or idle showing the new number (a run too short to
be drawn as running is never seen ending), and checks that the page title reads "<layer> · unit <n>" and the URL's
``unit`` is n. A change is *lost* when either does not hold once the app is idle; *stuck* when the app did not go idle
within ``--change-timeout``. Each change records its client-side latency (Enter to idle, polled every 100 ms), any
exception element and any console error (less the offline noise tests/browser.py filters). Before the next change
the page's images are given up to 30 s to load (a user looks at them), and any image shown broken is an error. A 404
for a media file that the idle page no longer shows (an image of the page being replaced, dropped by Streamlit's
media manager while its rerun ran) is counted apart, not as an error.

``--overlap S`` makes each change the way a hurried user makes it: a first number, Enter, then, a random 0 to S seconds
after that rerun has started (while it still runs), the final number and Enter; the change counts as applied when the
final number shows once the app has been idle for 2 s (the latency then includes those 2 s and the first rerun).

Server side, every script run is timed in the server process itself: the server is ``streamlit run`` started through
``serve()`` below, which wraps Streamlit's ``exec_func_with_error_handling`` (the call that runs the page script) and
appends (start, seconds, session, outcome, query string, the Unit value the run started with and ended with) to a
JSON-lines file; Streamlit logs no per-run timing itself, not even at debug level. ``--plain`` starts the stock
``python -m streamlit`` instead (no server-side times). Every second the server's resident set (VmRSS of it and its
children) and CPU time, and the CPU time of everything else this script started (Playwright's driver, Chromium, this
script), are sampled from /proc; the CPU shares are over the ``--seconds`` window. In the summary, *server p50 / p95*
are whole runs (not those stopped for a newer rerun) started in that window, and "the URL overrode the Unit value the
browser sent" counts whole runs that ended on another unit than the browser's input asked for.

Caveat: the browsers run on the same machine as the server, so the client-side latency includes the browsers'
own work and their competition with the server for the cores; the summary says how the CPU time was split.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.browser import (CHROMIUM, CHROMIUM_ARGS, IDLE, VIEWPORT, Watch, start_streamlit,  # noqa: E402
                           stop_streamlit)

TIMING_ENV = "APP_SESSIONS_TIMING"
POLL_MS = 100  # how often the pages are polled: finer costs the cores the server needs
LOAD_TIMEOUT_S = 300  # N first loads at once on 2 cores
IMAGE_WAIT_S = 30
# Run ends counted from the mutation records' old values, so a run too short to be seen between two polls still counts.
RUN_ENDS = """
window.__stEnded = 0;
new MutationObserver((mutations) => {
    for (const m of mutations) if (m.oldValue === 'running') window.__stEnded += 1;
}).observe(document, {subtree: true, attributes: true, attributeOldValue: true,
                      attributeFilter: ['data-test-script-state']});
"""
TITLE = """(document.querySelector('[data-testid="stMain"] h1')?.innerText || '').trim()"""
IDLE_AFTER = f"""([endedBefore, title, unit]) => {{
    if (!({IDLE})()) return false;
    if (window.__stEnded > endedBefore) return true;
    return {TITLE} === title && new URL(location.href).searchParams.get('unit') === unit;
}}"""
# What keeps IDLE false: recorded for a change that did not go idle.
DIAGNOSIS = """() => {
    const app = document.querySelector('[data-testid="stApp"]');
    return {connection: app?.dataset.testConnectionState ?? null, script: app?.dataset.testScriptState ?? null,
            ended: window.__stEnded, stale: [...document.querySelectorAll('[data-stale="true"]')].slice(0, 8).map(
                e => e.dataset.testid || e.className.toString().slice(0, 40) || e.tagName)};
}"""
# The main area's images, once each has loaded or failed (a user looks at them; the next change would drop them).
IMAGES_SETTLED = """() => [...document.querySelectorAll('[data-testid="stMain"] img')].every(i => i.complete)"""
IMAGES_BROKEN = """() => [...document.querySelectorAll('[data-testid="stMain"] img')]
    .filter(i => i.complete && i.naturalWidth === 0).map(i => i.src.split('/').pop())"""
IMAGE_NAMES = """() => [...document.querySelectorAll('[data-testid="stMain"] img')].map(i => i.src.split('/').pop())"""
# A console error about one of the server's media files (404, or the image list's "Image source error").
MEDIA_ERROR = re.compile(r"/media/([0-9a-f]+\.\w+)")
RUNNING = """() => document.querySelector('[data-testid="stApp"]')?.dataset.testScriptState === 'running'"""
SHOWN = """() => ({
    title: (document.querySelector('[data-testid="stMain"] h1')?.innerText || '').trim(),
    unit: new URL(location.href).searchParams.get('unit'),
    input: document.querySelector('[data-testid="stMain"] [data-testid="stNumberInput"] input')?.value ?? null,
    exception: [...document.querySelectorAll('[data-testid="stException"]')].map(e => e.innerText.slice(0, 300)),
})"""


# -- the server: streamlit run, each script run timed ----------------------------------------------------------------
def _peek(state, key: str):
    """``state[key]`` as JSON, or None (absent or unreadable): state is Streamlit's (Safe)SessionState."""
    try:
        if key not in state:
            return None
        value = state[key]
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    except Exception:  # noqa: BLE001 - a diagnostic must never disturb the run
        return None


def install_run_timing(path: str) -> None:
    """Append one JSON line per page-script run to ``path`` (this process is the Streamlit server)."""
    from streamlit.runtime.scriptrunner import script_runner
    from streamlit.runtime.state import session_state

    out = open(path, "a", buffering=1)  # noqa: SIM115 - open for the server's life
    lock = threading.Lock()
    local = threading.local()
    original_exec = script_runner.exec_func_with_error_handling
    original_will_rerun = session_state.SessionState.on_script_will_rerun

    def on_script_will_rerun(self, *args, **kwargs):
        original_will_rerun(self, *args, **kwargs)
        local.unit_in = _peek(self, "unit")  # the browser's widget value for this run, before the page's code

    def exec_timed(func, ctx):
        local.unit_in = None
        query, started, wall = ctx.query_string, time.perf_counter(), time.time()
        result = original_exec(func, ctx)
        seconds = time.perf_counter() - started
        _, _, rerun_data, premature_stop, uncaught = result
        # fastReruns (the default) stops a run for a newer rerun from outside (premature stop), a rerun inside
        # the run is rerun_data; neither run drew a whole page
        outcome = "stopped_for_rerun" if rerun_data is not None or premature_stop else \
            "exception" if uncaught is not None else "ok"
        record = {"t": wall, "seconds": seconds, "session": ctx.session_id, "outcome": outcome, "query": query,
                  "unit_in": getattr(local, "unit_in", None), "unit_out": _peek(ctx.session_state, "unit")}
        with lock:
            out.write(json.dumps(record) + "\n")
        return result

    session_state.SessionState.on_script_will_rerun = on_script_will_rerun
    script_runner.exec_func_with_error_handling = exec_timed


def serve() -> None:
    """``streamlit <sys.argv[1:]>`` with every script run timed into $APP_SESSIONS_TIMING."""
    install_run_timing(os.environ[TIMING_ENV])
    from streamlit.web.cli import main

    main(args=sys.argv[1:], prog_name="streamlit")


def start_server(store_dir: Path, data_dir: Path, log: Path, timing: Path | None, timeout: float = 120.0):
    """(process, base URL) of the app on a free loopback port, once /_stcore/health answers; with ``timing``, every
    script run is timed into that file (``serve``)."""
    if timing is None:
        return start_streamlit(store_dir, data_dir, log, timeout)
    return start_streamlit(store_dir, data_dir, log, timeout, env={TIMING_ENV: str(timing)},
                           head=[sys.executable, "-c", "from bench.app_sessions import serve; serve()"])


# -- /proc sampling --------------------------------------------------------------------------------------------------
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def descendants(pid: int) -> list[int]:
    """pid and every process below it (bounded: a few thousand at most)."""
    found, todo = [], [pid]
    while todo and len(found) < 4096:
        current = todo.pop()
        found.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo.extend(int(child) for child in handle.read().split())
        except OSError:
            continue
    return found


def rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of a live process (its own threads, not waited-for children)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    except (OSError, IndexError, ValueError):
        return 0.0


class Sampler(threading.Thread):
    """Every second: the server tree's RSS and CPU, and the CPU of everything else this process started."""

    def __init__(self, server_pid: int, limit_s: float):
        super().__init__(daemon=True)
        self.server_pid, self.limit_s = server_pid, limit_s
        self.samples: list[dict] = []
        self.stop = threading.Event()
        self.cpu_last: dict[int, float] = {}  # per pid, so processes that exit keep what they used
        self.server_pids: set[int] = set()
        self.marks: dict[str, tuple[float, float, float]] = {}
        self.lock = threading.Lock()

    def totals(self) -> tuple[float, float, float]:
        server = set(descendants(self.server_pid))
        others = [pid for pid in descendants(os.getpid()) if pid not in server]
        with self.lock:
            self.server_pids |= server
            for pid in list(server) + others:
                self.cpu_last[pid] = max(cpu_s(pid), self.cpu_last.get(pid, 0.0))
            server_cpu = sum(v for pid, v in self.cpu_last.items() if pid in self.server_pids)
            client_cpu = sum(v for pid, v in self.cpu_last.items() if pid not in self.server_pids)
        return sum(rss_mb(pid) for pid in server), server_cpu, client_cpu

    def mark(self, end: bool = False) -> None:
        """Start (or end) of the measured phase: CPU shares are counted between the two."""
        _, server_cpu, client_cpu = self.totals()
        self.marks["end" if end else "start"] = (time.monotonic(), server_cpu, client_cpu)

    def shares(self) -> tuple[float, float]:
        """Cores' worth of CPU the server and the client side (Playwright, Chromium, this script) used in the phase."""
        if "start" not in self.marks or "end" not in self.marks:
            return float("nan"), float("nan")
        (t0, server0, client0), (t1, server1, client1) = self.marks["start"], self.marks["end"]
        wall = max(t1 - t0, 1e-9)
        return (server1 - server0) / wall, (client1 - client0) / wall

    def run(self) -> None:
        started = time.monotonic()
        while not self.stop.is_set() and time.monotonic() - started < self.limit_s:
            rss, server_cpu, client_cpu = self.totals()
            self.samples.append({"t": time.time(), "rss_mb": rss, "server_cpu_s": server_cpu,
                                 "client_cpu_s": client_cpu, "load1": os.getloadavg()[0]})
            self.stop.wait(1.0)


# -- the sessions ----------------------------------------------------------------------------------------------------
def first_store_and_layer(store_dir: Path) -> tuple[str, str, int]:
    """The picker's default store (newest first), its deepest layer with ablation results, and that layer's units."""
    from store import StoreReader, list_stores

    stores = list_stores(store_dir)
    if not stores:
        raise SystemExit(f"no store in {store_dir}")
    reader = StoreReader(stores[0])
    layers = [layer for layer in reader.layers if reader.has_section(layer, "ablation")]
    if not layers:
        raise SystemExit(f"{stores[0]} has no ablation results")
    units = int(reader.layer(layers[-1], "ablation", "overall_drop").shape[0])
    return stores[0].stem, layers[-1], units


async def wait_idle_after(page, ended_before: int, timeout_s: float, title: str, unit: str) -> bool:
    """Whether, within ``timeout_s``, the app went idle after a run that ended after ``ended_before``, or went idle
    showing ``title`` with ``unit`` in its URL. The second covers a run too short to show as running at all (React
    draws "running" and "not running" as one frame): seen here on a 0.2 s run, the run counter alone then waits
    forever on a change that did apply."""
    try:
        await page.wait_for_function(IDLE_AFTER, arg=[ended_before, title, unit], timeout=timeout_s * 1000,
                                     polling=POLL_MS)
        return True
    except Exception:  # noqa: BLE001 - Playwright's TimeoutError (or a closed page): reported as stuck
        return False


async def wait_quiet(page, timeout_s: float, quiet_s: float = 2.0) -> bool:
    """Idle, and no run started for ``quiet_s`` seconds (bounded by ``timeout_s``)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ended = await page.evaluate("window.__stEnded")
        try:
            await page.wait_for_function(f"({IDLE})()", timeout=max(1, deadline - time.monotonic()) * 1000,
                                         polling=POLL_MS)
        except Exception:  # noqa: BLE001
            return False
        await asyncio.sleep(quiet_s)
        if await page.evaluate("window.__stEnded") == ended and await page.evaluate(f"({IDLE})()") \
                and not await page.evaluate(RUNNING):
            return True
    return False


async def session(index: int, browser, url: str, layer: str, units: int, args, ready, go, records: list,
                  loads: list) -> None:
    rng = random.Random(args.seed * 1000 + index)
    context = await browser.new_context(viewport=VIEWPORT)
    try:
        await context.add_init_script(script=RUN_ENDS)
        page = await context.new_page()
        page.set_default_timeout(args.change_timeout * 1000)
        watch = Watch(page, url)
        link = f"{url}/unit?store={args.store_name}&layer={layer}&unit=0"
        started = time.monotonic()
        ok, shown, failure = False, {"title": "", "exception": []}, []
        try:
            await page.goto(link, timeout=LOAD_TIMEOUT_S * 1000)
            ok = await wait_idle_after(page, 0, LOAD_TIMEOUT_S, f"{layer} · unit 0", "0")
            shown = await page.evaluate(SHOWN)
        except Exception as error:  # noqa: BLE001 - reported with the loads
            failure = [f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"]
            ok = False
        finally:
            ready()  # counted as loaded even when it failed: the others must not wait for it
        ok = ok and shown["title"] == f"{layer} · unit 0"
        if ok:
            try:
                await page.wait_for_function(IMAGES_SETTLED, timeout=IMAGE_WAIT_S * 1000, polling=POLL_MS)
            except Exception:  # noqa: BLE001 - its console errors, if any, come with the first change
                pass
        loads.append({"session": index, "seconds": time.monotonic() - started, "ok": ok, "title": shown["title"],
                      "errors": failure + watch.take() + shown["exception"]})
        if not ok:
            return
        await go.wait()
        current, deadline = 0, time.monotonic() + args.seconds
        field = page.get_by_test_id("stMain").get_by_role("spinbutton", name="Unit", exact=True)
        for number in range(args.max_changes):
            if time.monotonic() >= deadline:
                break
            target = rng.choice([u for u in range(min(units, 1000)) if u != current])
            record = {"session": index, "change": number, "from": current, "to": target, "t": time.time()}
            try:
                ended = await page.evaluate("window.__stEnded")
                if args.overlap:
                    first = rng.choice([u for u in range(min(units, 1000)) if u not in (current, target)])
                    record["via"] = first
                    await field.fill(str(first))
                    t0 = time.monotonic()
                    await field.press("Enter")
                    await page.wait_for_function(  # the first number's rerun has started (or is over)
                        f"([before, title]) => window.__stEnded > before || ({RUNNING})() || {TITLE} === title",
                        arg=[ended, f"{layer} · unit {first}"], timeout=args.change_timeout * 1000, polling=POLL_MS)
                    await asyncio.sleep(rng.uniform(0, args.overlap))
                    await field.fill(str(target))
                    await field.press("Enter")
                    idle = await wait_quiet(page, args.change_timeout)
                else:
                    await field.fill(str(target))
                    t0 = time.monotonic()
                    await field.press("Enter")
                    idle = await wait_idle_after(page, ended, args.change_timeout, f"{layer} · unit {target}",
                                                 str(target))
                record["latency_s"] = time.monotonic() - t0
                shown = await page.evaluate(SHOWN)
            except Exception as error:  # noqa: BLE001 - a page that broke is a result, not a crash of the bench
                record.update(latency_s=float("nan"), state="stuck", shown=None,
                              errors=[f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"])
                try:
                    record["diagnosis"] = await page.evaluate(DIAGNOSIS)
                    record["shown"] = await page.evaluate(SHOWN)
                except Exception:  # noqa: BLE001
                    pass
                records.append(record)
                continue
            applied = shown["title"] == f"{layer} · unit {target}" and shown["unit"] == str(target)
            if not idle:  # idle now, and not showing the number all this time: lost, though no run end was seen
                record["diagnosis"] = await page.evaluate(DIAGNOSIS)
                idle = await page.evaluate(IDLE)
            record["state"] = "stuck" if not idle else "applied" if applied else "lost"
            record["shown"] = {"title": shown["title"], "unit": shown["unit"], "input": shown["input"]}
            try:  # bounded: images still loading after IMAGE_WAIT_S are left to the next change's console errors
                await page.wait_for_function(IMAGES_SETTLED, timeout=IMAGE_WAIT_S * 1000, polling=POLL_MS)
            except Exception:  # noqa: BLE001
                record["images_unsettled"] = True
            record["images_s"] = time.monotonic() - t0 - record["latency_s"]
            broken = await page.evaluate(IMAGES_BROKEN)
            showing = set(await page.evaluate(IMAGE_NAMES))
            record["errors"], record["replaced_media_404"] = [], 0
            for error in watch.take():
                name = MEDIA_ERROR.search(error)
                if name and name.group(1) not in showing:  # an image of the page this change replaced
                    record["replaced_media_404"] += 1
                else:
                    record["errors"].append(error)
            record["errors"] += [f"exception: {text}" for text in shown["exception"]]
            record["errors"] += [f"broken image shown: {name}" for name in broken]
            records.append(record)
            current = target
            if shown["input"] is not None and shown["input"].isdigit():
                current = int(shown["input"])  # a lost change leaves the input elsewhere: change from there
    finally:
        await context.close()


async def drive(url: str, layer: str, units: int, args, sampler: Sampler) -> tuple[list, list, float]:
    from playwright.async_api import async_playwright

    records: list[dict] = []
    loads: list[dict] = []
    loaded = 0
    all_ready = asyncio.Event()
    go = asyncio.Event()

    def ready() -> None:
        nonlocal loaded
        loaded += 1
        if loaded == args.sessions:
            all_ready.set()

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            tasks = [asyncio.create_task(session(i, browser, url, layer, units, args, ready, go, records, loads))
                     for i in range(args.sessions)]
            try:  # every session calls ready() once its first load is over, failed or not
                await asyncio.wait_for(all_ready.wait(), timeout=LOAD_TIMEOUT_S + 60)
            except asyncio.TimeoutError:
                pass
            sampler.mark()
            phase_start = time.time()
            go.set()
            end_mark = asyncio.get_running_loop().call_later(args.seconds, sampler.mark, True)
            limit = args.seconds + 2 * args.change_timeout + IMAGE_WAIT_S + 60
            _, pending = await asyncio.wait(tasks, timeout=limit)
            if not end_mark.cancelled() and "end" not in sampler.marks:
                end_mark.cancel()
                sampler.mark(end=True)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=30)
            for task in tasks:
                if task.done() and not task.cancelled() and task.exception() is not None:
                    error = task.exception()
                    records.append({"session": -1, "state": "crashed", "latency_s": float("nan"),
                                    "errors": [f"{type(error).__name__}: {str(error)[:300]}"]})
        finally:
            await browser.close()
    return records, loads, phase_start


# -- report ----------------------------------------------------------------------------------------------------------
def quantile(values: list[float], q: float) -> float:
    values = sorted(v for v in values if v == v)
    if not values:
        return float("nan")
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1] if 0 < q < 1 else values[-1]


def read_runs(path: Path | None) -> list[dict]:
    if path is None or not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summary(args, layer: str, units: int, records, loads, runs, phase_start: float, sampler: Sampler) -> dict:
    measured = [r for r in records if r.get("state") in ("applied", "lost", "stuck", "crashed")]
    errors = [r for r in measured if r.get("errors")]
    changed = [r for r in runs if r["t"] >= phase_start]
    ok_runs = [r["seconds"] for r in changed if r["outcome"] == "ok"]
    # in a run stopped for a newer one, the end value is already the newer run's: whole runs only
    overrides = [r for r in changed if r["outcome"] == "ok" and r["unit_in"] is not None
                 and r["unit_out"] is not None and r["unit_in"] != r["unit_out"]]
    server_share, client_share = sampler.shares()
    return {
        "sessions": args.sessions, "seconds": args.seconds, "overlap_s": args.overlap, "layer": layer,
        "units": units, "store": args.store_name,
        "changes": len(measured), "applied": sum(r["state"] == "applied" for r in measured),
        "lost": sum(r["state"] == "lost" for r in measured), "stuck": sum(r["state"] == "stuck" for r in measured),
        "crashed": sum(r["state"] == "crashed" for r in measured), "with_errors": len(errors),
        "replaced_media_404": sum(r.get("replaced_media_404", 0) for r in measured),
        "changes_with_replaced_media_404": sum(bool(r.get("replaced_media_404")) for r in measured),
        "client_p50_s": quantile([r["latency_s"] for r in measured], 0.5),
        "client_p95_s": quantile([r["latency_s"] for r in measured], 0.95),
        "client_max_s": max((r["latency_s"] for r in measured if r["latency_s"] == r["latency_s"]), default=0.0),
        "server_runs": len(changed), "server_ok_runs": len(ok_runs),
        "server_stopped_for_rerun": sum(r["outcome"] == "stopped_for_rerun" for r in changed),
        "server_exceptions": sum(r["outcome"] == "exception" for r in changed),
        "server_p50_s": quantile(ok_runs, 0.5), "server_p95_s": quantile(ok_runs, 0.95),
        "server_url_overrode_widget": len(overrides),
        "load_p50_s": quantile([r["seconds"] for r in loads], 0.5),
        "loads_failed": sum(not r["ok"] or bool(r["errors"]) for r in loads),
        "peak_rss_mb": max((s["rss_mb"] for s in sampler.samples), default=0.0),
        "server_cpu_share": server_share, "client_cpu_share": client_share,
        "load_avg_max": max((s["load1"] for s in sampler.samples), default=0.0),
        "cores": os.cpu_count(),
    }


def table(result: dict) -> str:
    def s(value: float) -> str:
        return "-" if value != value else f"{value:.2f}"

    header = ("| sessions | s | changes | applied | lost | stuck | errors | client p50 / p95 s | server p50 / p95 s "
              "(runs) | peak RSS MB | CPU server / browsers (cores) |")
    row = (f"| {result['sessions']} | {result['seconds']:.0f} | {result['changes']} | {result['applied']} | "
           f"{result['lost']} | {result['stuck']} | {result['with_errors']} | {s(result['client_p50_s'])} / "
           f"{s(result['client_p95_s'])} | {s(result['server_p50_s'])} / {s(result['server_p95_s'])} "
           f"({result['server_ok_runs']}) | {result['peak_rss_mb']:.0f} | {s(result['server_cpu_share'])} / "
           f"{s(result['client_cpu_share'])} of {result['cores']} |")
    return "\n".join([header, "|" + " --- |" * 11, row])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.app_sessions", description=__doc__.splitlines()[0])
    parser.add_argument("store_dir", type=Path, help="directory of stores (UNIT_ABLATION_STORES)")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the sessions keep changing units")
    parser.add_argument("--overlap", type=float, default=0.0,
                        help="type each unit in two steps, the second 0 to OVERLAP s into the first one's rerun")
    parser.add_argument("--change-timeout", type=float, default=120.0, help="seconds a change may take (stuck)")
    parser.add_argument("--max-changes", type=int, default=10_000, help="per session, besides --seconds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path, default=None, help="UNIT_ABLATION_DATA (default: STORE_DIR/..)")
    parser.add_argument("--plain", action="store_true", help="stock `python -m streamlit run` (no server timing)")
    parser.add_argument("--json", type=Path, default=None, help="write the summary, changes and server runs here")
    parser.add_argument("--log", type=Path, default=None, help="the server's output (default: a temporary file)")
    args = parser.parse_args(argv)
    if not (1 <= args.sessions <= 64 and 0 < args.seconds <= 3600):
        parser.error("--sessions 1..64, --seconds up to 3600")
    if not CHROMIUM.exists():
        raise SystemExit(f"{CHROMIUM} is missing (Debian: apt-get install chromium)")
    store_dir = args.store_dir.resolve()
    args.store_name, layer, units = first_store_and_layer(store_dir)
    work = Path(tempfile.mkdtemp(prefix="app-sessions-"))
    timing = None if args.plain else work / "runs.jsonl"
    log = args.log or work / "streamlit.log"
    process, url = start_server(store_dir, (args.data_dir or store_dir.parent).resolve(), log, timing)
    sampler = Sampler(process.pid, limit_s=LOAD_TIMEOUT_S + args.seconds + 4 * args.change_timeout + 300)
    sampler.start()
    try:
        records, loads, phase_start = asyncio.run(drive(url, layer, units, args, sampler))
    finally:
        sampler.stop.set()
        sampler.join(5)
        stop_streamlit(process)
    runs = read_runs(timing)
    result = summary(args, layer, units, records, loads, runs, phase_start, sampler)
    print(f"store {args.store_name}, layer {layer} ({units} units), {args.sessions} sessions for {args.seconds:.0f} s"
          + (f", two-step changes (second 0-{args.overlap:g} s into the first rerun)" if args.overlap else "")
          + f"; server log {log}")
    print(table(result))
    print(f"first loads: p50 {result['load_p50_s']:.1f} s, {result['loads_failed']} failed; server runs in the "
          f"phase: {result['server_runs']} ({result['server_stopped_for_rerun']} stopped for a newer rerun, "
          f"{result['server_exceptions']} raised); runs where the URL overrode the Unit value the browser sent: "
          f"{result['server_url_overrode_widget']}; load average up to {result['load_avg_max']:.1f}")
    print(f"404s for media files of the page being replaced (not shown once idle): {result['replaced_media_404']} "
          f"in {result['changes_with_replaced_media_404']} changes")
    for record in records:
        if record.get("state") != "applied" or record.get("errors"):
            print(f"  session {record.get('session')} change {record.get('change')}: {record.get('from')} -> "
                  f"{record.get('to')} {record.get('state')} after {record.get('latency_s', float('nan')):.1f} s, "
                  f"shown {record.get('shown')}, errors {record.get('errors')}")
    if args.json:
        args.json.write_text(json.dumps({"summary": result, "changes": records, "loads": loads, "runs": runs,
                                         "samples": sampler.samples}, indent=1, default=float))
    return 0 if result["lost"] == result["stuck"] == result["with_errors"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
