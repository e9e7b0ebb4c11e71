"""Kill `python -m compute.all` with SIGKILL at random moments; no reader may ever see a partial store.

    python scripts/fault_kill.py --data-dir DIR [--trials 20] [--seed 0] [--work DIR] [-- compute.all options]

First an uninterrupted run gives the reference store and T, its time from the writer opening the store (once imports
and loading are done; nothing is written before) to the store's rename into place. Then, trial after trial, the same
command writes into a work directory and is killed a delay drawn uniformly from [0, T] after its writer opened; killed
runs are resumed by the next trial, a finished store is kept (the next run, with --force, replaces it) or deleted (the
next run starts afresh) at random. After every kill the directory is read the way the app reads it: every store
``list_stores`` lists must pass ``store.check`` and hold exactly the reference results. Finally one more run
finishes, and its store must equal the reference array by array (time stamps aside), with nothing left behind but the
store.
"""

from __future__ import annotations

import argparse
import random
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store import list_stores  # noqa: E402
from store.check import check_store  # noqa: E402

# Attributes that record when or from which checkout a run happened, not what it computed.
UNCOMPARED_ATTRS = {"created", "completed", "finished", "code_version"}


@dataclass
class Trial:
    delay: float
    killed: bool
    phase: str  # where the kill landed: computing, writing a part, assembling, after the rename; or finished
    stages_done: int
    listed: int  # finished stores a reader could see right after the kill
    problems: list[str] = field(default_factory=list)


@dataclass
class Summary:
    reference_seconds: float
    trials: list[Trial]
    final_problems: list[str]

    @property
    def kills(self) -> int:
        return sum(t.killed for t in self.trials)

    @property
    def problems(self) -> list[str]:
        return [p for t in self.trials for p in t.problems] + self.final_problems

    def report(self) -> str:
        phases: dict[str, int] = {}
        for trial in self.trials:
            if trial.killed:
                phases[trial.phase] = phases.get(trial.phase, 0) + 1
        return (f"{self.kills} kills in {len(self.trials)} trials (T = {self.reference_seconds:.1f} s of writing), "
                f"kills landed: "
                + ", ".join(f"{phase} {count}" for phase, count in sorted(phases.items()))
                + f"; reader checks after kills: {sum(t.listed for t in self.trials if t.killed)} stores listed, "
                  f"{len(self.problems)} problems")


def compute_command(data_dir: Path, store_dir: Path, options: list[str], force: bool = False) -> list[str]:
    command = [sys.executable, "-m", "compute.all", *options, "--data-dir", str(data_dir), "--store", str(store_dir)]
    return command + (["--force"] if force else [])


def run_to_end(command: list[str]) -> None:
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")


def store_content(path: Path) -> dict:
    """Every dataset and attribute of a store by path, time stamps aside (values of /stages are finish times)."""
    content = {}

    def attrs(name: str, item) -> None:
        for key, value in item.attrs.items():
            if key not in UNCOMPARED_ATTRS:
                content[f"{name}@{key}"] = "<time>" if name == "stages" else value

    with h5py.File(path, "r", locking=False) as handle:
        attrs("", handle)

        def visit(name: str, item) -> None:
            attrs(name, item)
            if isinstance(item, h5py.Dataset):
                content[name] = item[()]
        handle.visititems(visit)
    return content


def differences(expected: dict, actual: dict) -> list[str]:
    """One line per path that is missing, extra, or holds different values (NaN equals NaN)."""
    lines = [f"missing {name}" for name in sorted(set(expected) - set(actual))]
    lines += [f"unexpected {name}" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        a, b = np.asarray(expected[name]), np.asarray(actual[name])
        same = a.shape == b.shape and (np.array_equal(a, b, equal_nan=True) if a.dtype.kind in "fc"
                                       else np.array_equal(a, b))
        if not same:
            lines.append(f"differs {name}")
    return lines


def reader_view(store_dir: Path, reference: dict) -> tuple[int, list[str]]:
    """What a reader sees now: every listed store must pass store.check and hold exactly the reference results."""
    problems = []
    listed = list_stores(store_dir)
    for path in listed:
        problems += [f"{path.name}: {p}" for p in check_store(path)]
        if not problems:
            problems += [f"{path.name}: {d}" for d in differences(reference, store_content(path))]
    return len(listed), problems


def store_identity(store_dir: Path) -> set:
    """(name, inode, mtime) of each finished store: a rename into place changes it."""
    found = set()
    for path in list_stores(store_dir):
        stat = path.stat()
        found.add((path.name, stat.st_ino, stat.st_mtime_ns))
    return found


def kill_phase(store_dir: Path, before: set, finished: bool) -> tuple[str, int]:
    """Where the run was when it died, from what it left behind; and how many stages it had finished."""
    parts = list(store_dir.glob(".*.parts"))
    done = sum(len(list(p.glob("*.h5"))) for p in parts)
    if finished:
        return "finished", done
    if store_identity(store_dir) - before:
        return "after the rename", done
    if any(store_dir.glob(".*.assembling")):
        return "assembling", done
    if any(t for p in parts for t in p.glob("*.h5.tmp")):
        return "writing a part", done
    return "computing", done  # a stage computes before it writes its part


def start_run(command: list[str], store_dir: Path) -> tuple[subprocess.Popen, float | None]:
    """Start a run and wait until its writer holds the store (StoreWriter rewrote the lock in the parts folder).

    Returns the process and the moment its writer opened, or None when it ended before (nothing to kill then).
    Before that moment the run only imports and loads, and writes nothing a kill could damage.
    """
    started = time.time_ns() - 10_000_000  # file times come from a coarser clock, a few milliseconds behind
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    while process.poll() is None:
        if any(lock.stat().st_mtime_ns >= started for lock in store_dir.glob(".*.parts/lock")):
            return process, time.perf_counter()
        time.sleep(0.01)
    return process, None


def reference_run(command: list[str], store_dir: Path) -> float:
    """The uninterrupted run: seconds from its writer opening the store to the store's rename into place."""
    process, opened = start_run(command, store_dir)
    while opened is not None and process.poll() is None and not list_stores(store_dir):
        time.sleep(0.01)
    renamed = time.perf_counter()
    _, errors = process.communicate()
    if process.returncode != 0 or opened is None:
        raise RuntimeError(f"{' '.join(command)} failed ({process.returncode}): {errors.strip()[-2000:]}")
    return renamed - opened


def kill_trial(command: list[str], store_dir: Path, delay: float) -> tuple[bool, int]:
    """Run, and SIGKILL the run ``delay`` seconds after its writer opened; (killed, exit status)."""
    before = time.perf_counter()
    process, opened = start_run(command, store_dir)
    try:
        process.communicate(timeout=max(0.0, (opened or before) + delay - time.perf_counter()))
        return False, process.returncode
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGKILL)
        process.communicate()
        return True, process.returncode


def run_trials(data_dir: Path, options: list[str], trials: int = 20, seed: int = 0, work: Path | None = None,
               log=print, budget: float | None = None) -> Summary:
    """The reference run, ``trials`` kills at random moments (resuming in between), and the final rerun.

    Each kill comes a uniform random delay in [0, T] after the run's writer opened the store, T being the
    reference run's time from that moment to its store's rename; resumed runs have less left to do, so some finish
    first. ``budget``: seconds after which no further trial starts (the summary then holds fewer kills).
    """
    work = Path(work) if work else data_dir / "fault-kill"
    shutil.rmtree(work, ignore_errors=True)
    reference_dir, store_dir = work / "reference", work / "stores"
    reference_dir.mkdir(parents=True)
    store_dir.mkdir()
    seconds = reference_run(compute_command(data_dir, reference_dir, options), reference_dir)
    reference = store_content(list_stores(reference_dir)[0])
    log(f"reference run: {seconds:.1f} s of writing, {len(reference)} datasets and attributes")
    rng = random.Random(seed)
    done: list[Trial] = []
    deadline = time.perf_counter() + (budget if budget is not None else float("inf"))
    while sum(t.killed for t in done) < trials and len(done) < 4 * trials and time.perf_counter() < deadline:
        delay = rng.uniform(0, seconds)
        before = store_identity(store_dir)
        killed, status = kill_trial(compute_command(data_dir, store_dir, options, force=True), store_dir, delay)
        phase, stages = kill_phase(store_dir, before, finished=not killed)
        listed, problems = reader_view(store_dir, reference)
        if not killed and status != 0:
            problems.append(f"the run exited with status {status} before its kill")
        done.append(Trial(delay, killed, phase, stages, listed, problems))
        log(f"trial {len(done):2d}: {'killed' if killed else 'finished'} after {delay:5.1f} s ({phase}, "
            f"{stages} stages done), {listed} stores listed, {len(problems)} problems")
        if not killed and rng.random() < 0.5:
            for path in list_stores(store_dir):
                path.unlink()  # the next trial starts from nothing rather than replacing a finished store
    run_to_end(compute_command(data_dir, store_dir, options, force=True))
    final = reader_view(store_dir, reference)[1]
    leftovers = sorted(p.name for p in store_dir.iterdir() if not p.name.endswith(".h5") or p.name.startswith("."))
    if leftovers:
        final.append(f"left behind after the final run: {', '.join(leftovers)}")
    if len(list_stores(store_dir)) != 1:
        final.append(f"the final run left {len(list_stores(store_dir))} stores, expected 1")
    summary = Summary(seconds, done, final)
    log(summary.report())
    for problem in summary.problems:
        log(f"PROBLEM {problem}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     epilog="options after -- go to compute.all (default: --model demo)")
    parser.add_argument("--data-dir", required=True, type=Path, help="data directory compute.all runs on (a copy)")
    parser.add_argument("--trials", type=int, default=20, help="kills to make (default 20)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None, help="scratch directory (default DATA_DIR/fault-kill)")
    parser.add_argument("--budget", type=float, default=None, help="seconds after which no further trial starts")
    args, options = parser.parse_known_args(argv)
    options = [o for o in options if o != "--"] or ["--model", "demo"]
    summary = run_trials(args.data_dir, options, args.trials, args.seed, args.work, budget=args.budget)
    return 1 if summary.problems or summary.kills < args.trials else 0


if __name__ == "__main__":
    raise SystemExit(main())
