"""Eight readers load every store's data while a writer replaces and adds stores in the same directory.

    python scripts/concurrent_readers.py STORE_DIR [--readers 8] [--amends 20] [--json OUT] [-- compute.all options]

STORE_DIR must hold at least one finished store. Reader processes loop over ``list_stores``: each pass opens every
listed store with ``StoreReader`` and reads every dataset, then reads them again through the app's cached loaders
(``app.loaders.array``, keyed by path and mtime as the pages use them), and records a digest of every value read.
Meanwhile the writer replaces the first store ``--amends`` times with ``store.writer.amend`` (each round rewrites
``extra/round``), then, given compute.all options, runs ``compute.all --name concurrent-new`` to add a new store.

Passes when no reader met an error and every value any reader read equals that dataset in one of the versions the
writer produced (a partial or torn read would match none), and every reader saw the new store.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store import StoreReader, list_stores  # noqa: E402
from store.writer import amend, write_array  # noqa: E402

NEW_STORE = "concurrent-new"


def digest(value) -> str:
    """A digest of a value as the reader hands it out (numbers by bytes, strings by text)."""
    array = np.asarray(value)
    if array.dtype == object:
        raw = repr(array.tolist()).encode()
    else:
        raw = np.ascontiguousarray(array).tobytes() + str((array.dtype.str, array.shape)).encode()
    return hashlib.sha1(raw).hexdigest()


def versions(path: Path) -> dict[str, str]:
    """Digest of every dataset of one version of a store, read through StoreReader."""
    reader = StoreReader(path)
    return {name: digest(reader.read(name)) for name in sorted(reader.datasets)}


def reader_loop(directory: str, stop, ready, results) -> None:
    """One reader process: passes over every listed store until told to stop, then one last pass.

    Readers run at a somewhat lower priority (nice 5: together they get about half of the processor while the writer
    works): eight busy loops at full priority would starve the writer on a two-core machine.
    """
    import streamlit.logger

    os.nice(5)

    streamlit.logger.set_log_level("error")  # its "no runtime found" warning is expected outside `streamlit run`
    from app import loaders  # imported here: the app's cache lives in this process

    seen: dict[str, set] = {}
    errors: list[str] = []
    passes = reads = 0

    def one_pass() -> None:
        nonlocal reads
        for path in list_stores(directory):
            try:
                reader = StoreReader(path)
                loaders.available_stores.clear()
                loaders.available_stores(directory)
                for name in sorted(reader.datasets):
                    for value in (reader.read(name), loaders.array(path, name)):
                        seen.setdefault(f"{path.name}:{name}", set()).add(digest(value))
                        reads += 1
            except Exception as error:  # noqa: BLE001 - any error at all is what this test counts
                errors.append(f"{path.name}: {type(error).__name__}: {error}")

    one_pass()
    ready.release()
    while not stop.is_set():
        one_pass()
        passes += 1
    one_pass()
    results.put({"pid": os.getpid(), "passes": passes + 2, "reads": reads, "errors": errors,
                 "seen": {key: sorted(value) for key, value in seen.items()}})


def write(directory: Path, amends: int, options: list[str], valid: dict[str, set]) -> list[str]:
    """Replace the first store ``amends`` times, then add a new one with compute.all; record each version."""
    target = list_stores(directory)[-1]
    problems = []
    for round_ in range(amends):
        with amend(target) as handle:
            write_array(handle, "extra/round", np.full(50_000, round_, np.float32))
        record(valid, target)
        time.sleep(0.05)
    if options:
        command = [sys.executable, "-m", "compute.all", *options, "--store", str(directory), "--name", NEW_STORE]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            problems.append(f"compute.all failed ({done.returncode}): {done.stderr.strip()[-1000:]}")
        else:
            record(valid, directory / f"{NEW_STORE}.h5")
    return problems


def record(valid: dict[str, set], path: Path) -> None:
    for name, value in versions(path).items():
        valid.setdefault(f"{path.name}:{name}", set()).add(value)


def run(directory: Path, readers: int = 8, amends: int = 20, options: list[str] | None = None) -> dict:
    """Start the readers, run the writer, and judge every value they read."""
    directory = Path(directory)
    stores = list_stores(directory)
    if not stores:
        raise SystemExit(f"no finished store in {directory}: compute one first")
    valid: dict[str, set] = {}
    for path in stores:
        record(valid, path)
    context = multiprocessing.get_context("spawn")  # no HDF5 state shared through fork
    stop, ready, results = context.Event(), context.Semaphore(0), context.Queue()
    workers = [context.Process(target=reader_loop, args=(str(directory), stop, ready, results)) for _ in range(readers)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.acquire()
    problems = write(directory, amends, options or [], valid)
    writer_seconds = time.perf_counter() - started
    stop.set()
    reports = [results.get(timeout=600) for _ in workers]
    for worker in workers:
        worker.join()
    return judge(reports, valid, problems, writer_seconds, bool(options))


def judge(reports: list[dict], valid: dict[str, set], problems: list[str], seconds: float, added: bool) -> dict:
    errors = [f"reader {r['pid']}: {e}" for r in reports for e in r["errors"]]
    torn = [f"reader {r['pid']}: {key} read a value no version of the store holds"
            for r in reports for key, digests in r["seen"].items() for d in digests if d not in valid.get(key, ())]
    missed = [f"reader {r['pid']} never read {NEW_STORE}.h5" for r in reports
              if added and not any(key.startswith(f"{NEW_STORE}.h5:") for key in r["seen"])]
    seen: dict[str, set] = {}
    for report in reports:
        for key, digests in report["seen"].items():
            seen.setdefault(key, set()).update(digests)
    return {"readers": len(reports), "passes": sum(r["passes"] for r in reports),
            "reads": sum(r["reads"] for r in reports), "versions": max((len(v) for v in valid.values()), default=0),
            "versions_read": max((len(v) for v in seen.values()), default=0),
            "seconds": round(seconds, 1), "problems": problems + errors + torn + missed}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="options after -- go to compute.all, which then adds a store")
    parser.add_argument("directory", type=Path, help="store directory holding at least one finished store")
    parser.add_argument("--readers", type=int, default=8)
    parser.add_argument("--amends", type=int, default=20, help="times the writer replaces the first store")
    parser.add_argument("--json", type=Path, default=None, help="write the result here as JSON")
    args, options = parser.parse_known_args(argv)
    result = run(args.directory, args.readers, args.amends, [o for o in options if o != "--"])
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    print(f"{result['readers']} readers, {result['passes']} passes, {result['reads']} reads over "
          f"{result['seconds']} s of writing; up to {result['versions']} versions of a dataset written, "
          f"{result['versions_read']} of them read; {len(result['problems'])} problems")
    for problem in result["problems"]:
        print(f"PROBLEM {problem}")
    return 1 if result["problems"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
