"""The demo store set in one command: ``python -m compute.suite``.

Trains (where no weights exist yet) and analyses the three demo variants of the paper's Sec. 3.5 on SynthScenes:
``demo`` (baseline), ``demo-bn`` (batch norm after every conv) and ``demo-dropout`` (channel dropout on conv5), one
store each, so the Variants page can compare them. ``--instances N`` adds demo seeds 1..N-1 (independently trained
instances of one architecture, the paper's Table 1). Every other option goes to ``compute.all`` unchanged, e.g.
``python -m compute.suite --rotations 3 --force``.
"""

from __future__ import annotations

import argparse

from compute import paths
from compute.errors import UserError, run_cli

VARIANT_MODELS = ("demo", "demo-bn", "demo-dropout")


def runs(instances: int) -> list[tuple[str, int]]:
    """(model, seed) pairs of the store set: the variants at seed 0, then the extra instances of the baseline."""
    if instances < 1:
        raise UserError(f"--instances {instances}: need at least 1")
    return [(model, 0) for model in VARIANT_MODELS] + [("demo", seed) for seed in range(1, instances)]


def store_summary(path) -> str:
    """Baseline accuracy of a finished store, as its ablation stage measured it."""
    from store import StoreReader

    store = StoreReader(path)
    layer = next((name for name in store.layers if store.has_section(name, "ablation")), None)
    if layer is None:
        return "no ablation results"
    accuracy = store.read_attrs(f"layers/{layer}/ablation").get("baseline_overall_acc")
    return f"validation accuracy {accuracy:.3f}, layers {', '.join(store.layers)}"


def main(argv=None) -> int:
    from compute.all import main as compute_all
    from compute.all import parse_args as all_args
    from compute.all import store_path
    from compute.models.demo import weights_file
    from compute.train import train_demo

    # No abbreviations: compute.all's --data must not be taken for this parser's --data-dir.
    parser = argparse.ArgumentParser(prog="python -m compute.suite", description=__doc__.splitlines()[0],
                                     epilog="Other options are passed to compute.all (see python -m compute.all -h).",
                                     allow_abbrev=False)
    parser.add_argument("--instances", type=int, default=1, help="demo instances (seeds 0..N-1; Table 1 uses 5)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: compute.train's)")
    parser.add_argument("--retrain", action="store_true", help="train again even where weights exist")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    args, passed = parser.parse_known_args(argv)
    data_dir = paths.data_dir(args.data_dir)
    chosen = all_args(passed)
    if chosen.name or chosen.model != "demo" or chosen.seed != 0:
        raise UserError("compute.suite picks --model, --seed and --name for each store itself: leave them out")
    done = []
    for model, seed in runs(args.instances):
        if args.retrain or not weights_file(model, seed, data_dir).exists():
            train_demo(model, seed=seed, data_dir=data_dir, epochs=args.epochs)
        argv_all = [*passed, "--model", model, "--seed", str(seed), "--data-dir", str(data_dir)]
        code = compute_all(argv_all)
        if code:
            return code
        done.append((model, seed, store_path(all_args(argv_all), model if seed == 0 else f"{model}-seed{seed}")))
    print("demo store set:")
    for model, seed, path in done:
        print(f"  {model} seed {seed}: {path} ({store_summary(path)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
