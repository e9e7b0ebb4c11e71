"""Runs in progress in a store directory, read from what the writers leave on disk (no torch, no Streamlit).

Two sources, both hidden files beside the stores, so ``list_stores`` never lists them:

* ``.<run>.parts/`` of a ``compute.all`` run (store/writer.py): ``run.json`` holds the run key, the provenance and,
  from newer runs, ``plan``, the ordered stage names; a finished stage is ``<stage, '/' as '__'>.h5`` and the stage
  being written is ``<stage>.h5.tmp``.
* ``.suite.json`` of a ``compute.suite`` run (the store set the first run computes in the background): the stores it
  will write, in order, each with its state (waiting, training, computing, done, failed), and the prediction table.

Whether a run is still alive is read from /proc/locks: its writer holds an flock on ``lock`` in the parts folder (the
suite on ``.suite.lock``) for as long as it runs. Only looking, never taking the lock, so a writer that starts at the
same moment is never refused. Where /proc/locks cannot be read, liveness is unknown (None).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

SUITE_FILE = ".suite.json"
SUITE_LOCK = ".suite.lock"
PARTS_SUFFIX = ".parts"
PROC_LOCKS = Path("/proc/locks")


@dataclass
class Run:
    """One ``compute.all`` run that has not assembled its store yet."""

    name: str  # the store's file stem (demo-bn for .demo-bn.parts/)
    model: str = ""
    plan: list[str] | None = None  # every stage in run order; None for runs that predate the plan in run.json
    done: list[str] = field(default_factory=list)  # finished stages (in plan order where there is a plan)
    running: str | None = None  # the stage whose part is being written, or the next one after the finished
    alive: bool | None = None  # its writer still holds the lock; None where that cannot be known

    def position(self) -> tuple[int, int] | None:
        """(i, n): the running stage is the i-th of n; None without a plan."""
        if not self.plan:
            return None
        if self.running in self.plan:
            return self.plan.index(self.running) + 1, len(self.plan)
        return min(len(self.done) + 1, len(self.plan)), len(self.plan)

    def describe(self) -> str:
        """One line: "stage 5 of 23: ablation/conv4" (or the stages done, for a run without a plan)."""
        position = self.position()
        if position:
            text = f"stage {position[0]} of {position[1]}: {self.running or 'assembling the store'}"
        elif self.running:
            text = f"{len(self.done)} stages done, now {self.running}"
        else:  # a run without a plan between two parts: the stage after the last is not known here
            text = f"{len(self.done)} stages done" + (f", the last {self.done[-1]}" if self.done else "")
        return text if self.alive is not False else f"stopped at {text} (rerun the command to resume)"


def runs_in_progress(directory) -> list[Run]:
    """Every run with a parts folder in ``directory``, by name; an unreadable folder is skipped, never raised."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    held = locked_inodes()
    runs = []
    for parts in sorted(directory.glob("." + "*" + PARTS_SUFFIX)):
        try:
            runs.append(read_run(parts, held))
        except OSError:  # a folder removed by its commit between the listing and the reading
            continue
    return runs


def read_run(parts: Path, held: set | None = None) -> Run:
    info = _json(parts / "run.json")
    provenance = info.get("provenance") if isinstance(info.get("provenance"), dict) else {}
    plan = info.get("plan") if _is_plan(info.get("plan")) else None
    # oldest first: without a plan, the order the stages finished in is the run order
    files = sorted(parts.glob("*.h5"), key=_mtime)
    finished = {_stage(path, ".h5"): None for path in files}
    writing = [_stage(path, ".h5.tmp") for path in parts.glob("*.h5.tmp")]
    done = [stage for stage in plan if stage in finished] if plan else list(finished)
    run = Run(name=str(provenance.get("run_name") or parts.name[1: -len(PARTS_SUFFIX)]),
              model=str(provenance.get("model", "")), plan=plan, done=done,
              alive=_alive(parts / "lock", held))
    run.running = _running(plan, finished, writing)
    return run


def _running(plan, finished, writing: list[str]) -> str | None:
    """The stage being written; else, with a plan, the one after the last finished (a stage may compute for minutes
    before it opens its part)."""
    if writing:
        return _owner(writing[0], plan)
    if not plan:
        return None
    last = max((plan.index(stage) for stage in finished if stage in plan), default=-1)
    return plan[last + 1] if last + 1 < len(plan) else None


def _owner(part: str, plan) -> str:
    """The plan's stage a part belongs to: a stage may write sub-parts of its own (one per pass, one per torchrun
    rank: ``<stage>/shard-r-of-w``), named below the stage's name."""
    name = part
    while plan and name not in plan and "/" in name:
        name = name.rsplit("/", 1)[0]
    return name if not plan or name in plan else part


def _stage(path: Path, suffix: str) -> str:
    return path.name[: -len(suffix)].replace("__", "/")


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def _is_plan(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(stage, str) for stage in value)


def _json(path: Path) -> dict:
    """A JSON object from ``path``; {} for a file missing, half-written or not an object (writers replace it)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


# -- liveness ----------------------------------------------------------------------------------------------------
def locked_inodes() -> set | None:
    """{(major, minor, inode)} of every file with an flock on this machine; None when /proc/locks is unreadable."""
    try:
        lines = PROC_LOCKS.read_text().splitlines()
    except OSError:
        return None
    held = set()
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:  # "->": a process waiting for the lock, not holding it
            continue
        for token in fields:  # "MAJOR:MINOR:INODE", major and minor in hex
            parts = token.split(":")
            if len(parts) == 3 and all(parts):
                try:
                    held.add((int(parts[0], 16), int(parts[1], 16), int(parts[2])))
                except ValueError:
                    continue
                break
    return held


def _alive(lock: Path, held: set | None) -> bool | None:
    if held is None:
        return None
    try:
        stat = lock.stat()
    except OSError:
        return False  # no lock file: nobody has opened the parts for writing
    return (os.major(stat.st_dev), os.minor(stat.st_dev), stat.st_ino) in held


# -- the suite's queue -------------------------------------------------------------------------------------------
@dataclass
class Suite:
    """The store set a ``compute.suite`` run writes: [(store name, state)] in order, and the prediction table's."""

    stores: list[tuple[str, str]]
    prediction: str | None  # state of the prediction table, None when the suite makes none
    alive: bool | None
    table_stores: list[str] = field(default_factory=list)  # the instances the table is computed over

    def state(self, name: str) -> str | None:
        return dict(self.stores).get(name)

    def ahead(self, name: str) -> int:
        """How many stores of the set are still to be written before ``name``."""
        names = [store for store, _ in self.stores]
        if name not in names:
            return 0
        return sum(state != "done" for _, state in self.stores[: names.index(name)])

    def unfinished(self) -> list[str]:
        return [name for name, state in self.stores if state != "done"]


def suite_status(directory) -> Suite | None:
    """The suite's queue in ``directory``, or None when no suite has written one (or the file is unreadable)."""
    info = _json(Path(directory) / SUITE_FILE)
    stores = [(str(item.get("name")), str(item.get("state", "waiting"))) for item in info.get("stores", [])
              if isinstance(item, dict) and item.get("name")] if isinstance(info.get("stores"), list) else []
    if not stores:
        return None
    prediction = info.get("prediction")
    table = info.get("table_stores")
    return Suite(stores=stores, prediction=str(prediction) if prediction else None,
                 alive=_alive(Path(directory) / SUITE_LOCK, locked_inodes()),
                 table_stores=[str(name) for name in table] if isinstance(table, list) else [])


def write_suite_status(directory, stores: list[tuple[str, str]], prediction: str | None,
                       table_stores: list[str] = ()) -> None:
    """Replace the queue file in one rename, so a reader sees the old state or the new, never half of one."""
    path = Path(directory) / SUITE_FILE
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps({"stores": [{"name": name, "state": state} for name, state in stores],
                                     "prediction": prediction, "table_stores": list(table_stores)}))
    os.replace(temporary, path)


def table_coming(directory) -> str | None:
    """A sentence on the prediction table (Table 1) the suite computes last; None when there is none to come."""
    suite = suite_status(directory)
    if suite is None or suite.prediction in (None, "done"):
        return None
    over = f"over {', '.join(suite.table_stores)}" if suite.table_stores else "over the instances"
    if suite.alive is False:
        return f"Table 1 {over} is not computed yet: the background run was stopped (rerun it to resume)."
    if suite.prediction == "computing":
        return f"Table 1 is being computed {over}."
    if suite.prediction == "failed":
        return f"Table 1 {over} could not be computed in the background run: its log says why."
    return f"Table 1 is computed {over} once they are all here."


def coming(directory, name: str) -> str | None:
    """A sentence on how far store ``name`` is, for a page that needs it; None when nothing is computing it."""
    run = next((run for run in runs_in_progress(directory) if run.name == name), None)
    suite = suite_status(directory)
    state = suite.state(name) if suite else None
    if run is not None and run.alive is not False:
        return f"{name} is being computed: {run.describe()}."
    if run is not None:
        return f"{name} was {run.describe()}."
    if state is None or state == "done":
        return None
    if suite.alive is False:
        return (f"{name} is not computed yet: the background run that computes it was stopped (rerun "
                f"`bash scripts/demo.sh` or `python -m compute.suite --first-run` to resume).")
    if state == "training":
        return f"{name} is coming: its network is being trained, then its stages are computed."
    if state == "failed":
        return f"{name} could not be computed in the background run: its log says why."
    ahead = suite.ahead(name)
    return (f"{name} is coming: {ahead} store{'s' if ahead != 1 else ''} ahead of it in the background run."
            if ahead else f"{name} is coming: next in the background run.")


# -- one summary for the app's sidebar -----------------------------------------------------------------------------
STATE_WORDS = {"waiting": "waiting", "training": "training its network", "computing": "starting",
               "failed": "failed (see the background log)"}


def summary(directory) -> tuple[list[str], bool]:
    """(lines, active): one line per run in progress or store still queued ("demo-bn: stage 5 of 19:
    dissection/conv4", "demo-seed3: waiting", "Table 1: waiting"), and whether anything is still running (or
    may be: liveness unknown), i.e. whether the lines are worth refreshing."""
    runs = runs_in_progress(directory)
    suite = suite_status(directory)
    lines = [f"{run.name}: {run.describe()}" for run in runs]
    active = any(run.alive is not False for run in runs)
    if suite is not None:
        suite_on = suite.alive is not False
        active = active or (suite_on and bool(suite.unfinished() or suite.prediction not in (None, "done")))
        stopped = "" if suite_on else " (stopped: rerun to resume)"
        computing = {run.name for run in runs}
        lines += [f"{name}: {STATE_WORDS.get(state, state)}{stopped}" for name, state in suite.stores
                  if state != "done" and name not in computing]
        if suite.prediction not in (None, "done"):
            state = "computing" if suite.prediction == "computing" else STATE_WORDS.get(suite.prediction)
            lines.append(f"Table 1: {state or suite.prediction}{stopped}")
    return lines, active
