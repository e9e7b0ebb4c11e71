"""The demo store set in one command: ``python -m compute.suite``.

Trains (where no weights exist yet) and analyses the three demo variants of the paper's Sec. 3.5 on SynthScenes:
``demo`` (baseline), ``demo-bn`` (batch norm after every conv) and ``demo-dropout`` (channel dropout on conv5), one
store each, so the Variants page can compare them. ``--instances N`` adds demo seeds 1..N-1 (independently trained
instances of one architecture, the paper's Table 1). Every other option goes to ``compute.all`` unchanged, e.g.
``python -m compute.suite --rotations 3 --force``.

``--first-run`` is what ``scripts/demo.sh`` runs in the background once the demo store is served: the stores that the
Variants and Predicting classes pages need beside ``demo`` (demo-bn, demo-dropout, demo seeds 1..4), each with only
the stages those pages read, then Table 1 over the five instances. It keeps its queue in ``<stores>/.suite.json``
(store/progress.py reads it for the app's sidebar) and holds ``.suite.lock`` while it runs. Rerun, it resumes: weights
that exist are not trained again, compute.all resumes from its parts or skips an up-to-date store, and a table already
stored over the same instances is kept.
"""

from __future__ import annotations

import argparse
import fcntl
import signal
import sys
from pathlib import Path

from compute import paths
from compute.errors import UserError, run_cli
from store.schema import layer_path, prediction_path

VARIANT_MODELS = ("demo", "demo-bn", "demo-dropout")
# The first run's background stores hold only what their pages read, at conv5 only, so that the set fits in the first
# run's 25 minutes on two cores (BENCHMARKS.md): no greedy, rotation, top images or live data. Variants (Figs. 8, 9)
# reads a layer's ablation and dissection, Table 1 conv5's ablation, attributes and concept IoU. conv5 is where the
# dropout variant differs (channel dropout follows it); conv4 would add about 2 minutes to the set (its sweep and
# IoU pass, twice). `python -m compute.suite` computes every layer with every stage.
FIRST_RUN_STAGES = ["--layers", "conv5", "--greedy-steps", "0", "--rotations", "0", "--top-k", "0", "--live-layers"]
TABLE_INSTANCES = 5  # Table 1: seeds 0..4, the first three train
TABLE_LAYER = "conv5"


def runs(instances: int) -> list[tuple[str, int]]:
    """(model, seed) pairs of the store set: the variants at seed 0, then the extra instances of the baseline."""
    if instances < 1:
        raise UserError(f"--instances {instances}: need at least 1")
    return [(model, 0) for model in VARIANT_MODELS] + [("demo", seed) for seed in range(1, instances)]


def first_run_plan() -> list[tuple[str, int, list[str]]]:
    """(model, seed, compute.all options) of the first run's background stores: the variants first (one page needs
    two stores), then the instances for Table 1."""
    plan = [(model, 0, FIRST_RUN_STAGES) for model in VARIANT_MODELS[1:]]
    return plan + [("demo", seed, FIRST_RUN_STAGES) for seed in range(1, TABLE_INSTANCES)]


def run_name(model: str, seed: int) -> str:
    return model if seed == 0 else f"{model}-seed{seed}"


def stop_on_sigterm() -> None:
    """SIGTERM (demo.sh's Ctrl-C trap) ends the run through SystemExit, so the stage being written discards its
    temporary part and the queue says where it stopped; a rerun resumes from the finished parts."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


class Queue:
    """The suite's queue file (store/progress.py reads it): each store's state, and the prediction table's."""

    def __init__(self, directory: Path, names: list[str], table_stores: list[str]):
        from store.progress import SUITE_LOCK

        self.directory = directory
        self.states = {name: "waiting" for name in names}
        self.table_stores = table_stores
        self.prediction = "waiting" if table_stores else None
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = open(directory / SUITE_LOCK, "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(f"another compute.suite is running on {directory}: wait for it or stop it") from None
        self.write()

    def set(self, name: str, state: str) -> None:
        if name == "prediction":
            self.prediction = state
        else:
            self.states[name] = state
        self.write()

    def write(self) -> None:
        from store.progress import write_suite_status

        write_suite_status(self.directory, list(self.states.items()), self.prediction, self.table_stores)


class NoQueue:
    """The queue of a plain suite run: nothing to tell the app."""

    def set(self, name: str, state: str) -> None:
        pass


def store_summary(path) -> str:
    """Baseline accuracy of a finished store, as its ablation stage measured it."""
    from store import StoreReader

    store = StoreReader(path)
    layer = next((name for name in store.layers if store.has_section(name, "ablation")), None)
    if layer is None:
        return "no ablation results"
    accuracy = store.read_attrs(layer_path(layer, "ablation")).get("baseline_overall_acc")
    return f"validation accuracy {accuracy:.3f}, layers {', '.join(store.layers)}"


def main(argv=None) -> int:
    # No abbreviations: compute.all's --data must not be taken for this parser's --data-dir.
    parser = argparse.ArgumentParser(prog="python -m compute.suite", description=__doc__.splitlines()[0],
                                     epilog="Other options are passed to compute.all (see python -m compute.all -h).",
                                     allow_abbrev=False)
    parser.add_argument("--instances", type=int, default=1, help="demo instances (seeds 0..N-1; Table 1 uses 5)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: compute.train's)")
    parser.add_argument("--retrain", action="store_true", help="train again even where weights exist")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    parser.add_argument("--first-run", action="store_true",
                        help="the stores the Variants and Predicting pages need beside demo, with only the stages "
                             "they read, then Table 1 (what scripts/demo.sh runs in the background)")
    args, passed = parser.parse_known_args(argv)
    data_dir = paths.data_dir(args.data_dir)
    from compute.all import parse_args as all_args

    chosen = all_args(passed)
    if chosen.name or chosen.model != "demo" or chosen.seed != 0:
        raise UserError("compute.suite picks --model, --seed and --name for each store itself: leave them out")
    if args.first_run:
        return first_run(args, passed, data_dir)
    plan = [(model, seed, []) for model, seed in runs(args.instances)]
    done = compute_stores(plan, args, passed, data_dir, NoQueue())
    if done is None:
        return 1
    print("demo store set:")
    for model, seed, path in done:
        print(f"  {model} seed {seed}: {path} ({store_summary(path)})")
    return 0


def compute_stores(plan, args, passed: list[str], data_dir: Path, queue):
    """Train (where no weights exist) and compute each (model, seed, options) of ``plan``, telling ``queue`` each
    store's state; [(model, seed, store path)], or None when a compute.all run failed (it has said why)."""
    from compute.all import parse_args as all_args
    from compute.all import store_path

    done = []
    for model, seed, options in plan:
        name = run_name(model, seed)
        argv_all = [*passed, *options, "--model", model, "--seed", str(seed), "--data-dir", str(data_dir)]
        try:
            code = compute_store(model, seed, argv_all, args, data_dir, lambda state: queue.set(name, state))
        except Exception:  # the app says it failed; a SystemExit (stopped) leaves it to say "stopped"
            queue.set(name, "failed")
            raise
        queue.set(name, "failed" if code else "done")
        if code:
            return None
        done.append((model, seed, store_path(all_args(argv_all), name)))
    return done


def compute_store(model: str, seed: int, argv_all: list[str], args, data_dir: Path, state) -> int:
    """Train the model where its weights are missing (or with --retrain), then run compute.all on it."""
    from compute.all import main as compute_all
    from compute.models.demo import weights_file
    from compute.train import train_demo

    if args.retrain or not weights_file(model, seed, data_dir).exists():
        state("training")
        train_demo(model, seed=seed, data_dir=data_dir, epochs=args.epochs)
    state("computing")
    return compute_all(argv_all)


def first_run(args, passed: list[str], data_dir: Path) -> int:
    """The first run's background store set, then Table 1 over demo and its instances (see the module's doc)."""
    from compute.all import parse_args as all_args
    from compute.all import store_path

    stop_on_sigterm()
    plan = first_run_plan()
    directory = store_path(all_args([*passed, "--data-dir", str(data_dir)]), "demo").parent
    names = [run_name(model, seed) for model, seed, _ in plan]
    queue = Queue(directory, names, table_stores=["demo"] + [name for name in names if name.startswith("demo-seed")])
    done = compute_stores(plan, args, passed, data_dir, queue)
    if done is None:
        queue.set("prediction", "failed")
        return 1
    instances = [directory / "demo.h5"] + [path for model, seed, path in done if model == "demo"]
    queue.set("prediction", "computing")
    code = table_one(instances)
    queue.set("prediction", "done" if code == 0 else "failed")
    return code


def table_one(instances: list[Path]) -> int:
    """Table 1 over ``instances`` (the first three train), stored in each; kept when already stored for them."""
    from compute.analysis import prediction as predict
    from store import StoreReader

    if not instances[0].exists():
        print(f"no {instances[0].name}: compute it first (python -m compute.all --model demo)", file=sys.stderr)
        return 1
    if all(table_stored(StoreReader(path), instances) for path in instances):
        print(f"Table 1 ({TABLE_LAYER}) is already stored in {', '.join(path.stem for path in instances)}")
        return 0
    table = predict.predict_table([str(path) for path in instances], layer=TABLE_LAYER, n_train=3)
    print(predict.format_table(table))
    predict.save_table(table)
    return 0


def table_stored(store, instances: list[Path]) -> bool:
    """Whether ``store`` holds Table 1 at TABLE_LAYER trained and tested on exactly ``instances``."""
    import json

    group = prediction_path(TABLE_LAYER)
    if not store.has(f"{group}/accuracy"):
        return False
    attrs = store.read_attrs(group)
    try:
        names = json.loads(attrs.get("train_stores", "[]")) + json.loads(attrs.get("test_stores", "[]"))
    except (TypeError, ValueError):
        return False
    return names == [path.stem for path in instances]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
