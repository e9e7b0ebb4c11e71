"""Table 1 from stores of instances of one model: ``python -m compute.predict STORE... [--layer conv5] [--train 3]``.

The command around compute.analysis.prediction (the table itself, torch-free, which the app and the report import).
"""

from __future__ import annotations

import argparse

from compute.analysis.prediction import N_RESAMPLES, format_table, predict_table, save_table
from compute.errors import UserError, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.predict", description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", help="store files (.h5), one per instance; the first --train train")
    parser.add_argument("--layer", default=None, help="layer (default: the deepest one with ablation results)")
    parser.add_argument("--train", type=int, default=3, help="instances used for training (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random state of the classifiers and the bootstrap")
    parser.add_argument("--resamples", type=int, default=N_RESAMPLES,
                        help=f"bootstrap resamples for the intervals (default {N_RESAMPLES})")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the table into the stores")
    args = parser.parse_args(argv)
    if args.resamples < 1:
        raise UserError(f"--resamples must be at least 1 (got {args.resamples})")
    table = predict_table(args.stores, layer=args.layer, n_train=args.train, seed=args.seed,
                          n_resamples=args.resamples)
    print(format_table(table))
    if not args.no_save:
        save_table(table)
        print(f"stored under prediction/{table['layer']}/ in {len(table['paths'])} stores")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
