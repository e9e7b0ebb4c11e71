"""Benchmark: greedy ablation's two engine paths against the ones they replaced, in one run on one store.

    python -m bench.greedy [--store data/stores/demo.h5] [--layer conv5] [--classes 6] [--steps 20] [--orders 10]
                           [--threads N] [--repeats 2]

For the first ``--classes`` classes, from the store's live data (activations and tail weights, no images):

* **greedy steps**: ``greedy.greedy`` as the stage runs it, where a step first asks the engine for predictions alone
  (rows certified unchanged skip the tail) and computes probabilities for the tied candidates only, against every
  candidate's full outcome in one call (``GreedyState.certifies = False``, the code before), with the rows each
  computed and certified;
* **order replays**: ``greedy.ablation_paths`` over every image for one order per class plus ``--orders`` random
  ones, where the engine sums single-unit updates along each order (a chain), against the general path for unit
  sets (the same masks given in an order that forms no chain, results put back in place).

Both sides must give the same greedy orders and the same predictions; the ratios are the old path's time over the
new one's (best of ``--repeats``). On a shared machine wall time depends on the load, which is printed too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compute.lib import greedy  # noqa: E402
from compute.live_session import load_session  # noqa: E402


def best_of(repeats: int, work):
    """(fastest wall seconds, the last result)."""
    fastest, result = float("inf"), None
    for _ in range(repeats):
        begun = time.perf_counter()
        result = work()
        fastest = min(fastest, time.perf_counter() - begun)
    return fastest, result


def greedy_runs(session, classes, steps: int, two_phase: bool):
    """Each class's greedy order on its images, and the rows the engine computed and certified over all steps."""
    engine, counted = session.engine, {"computed": 0, "certified": 0}
    evaluate = engine.evaluate_units

    def counting(*args, **kwargs):
        outcome = evaluate(*args, **kwargs)
        counted["computed"] += engine.rows_computed
        counted["certified"] += engine.rows_certified
        return outcome

    engine.evaluate_units = counting
    try:
        orders = []
        for class_index in classes:
            images = session.images_of([class_index])
            state = greedy.start(engine, session.acts.take(images), session.labels[images], [class_index])
            state.certifies = two_phase
            for _ in range(steps):
                greedy.advance(engine, state)
            orders.append(state.chosen)
        return orders, counted
    finally:
        engine.evaluate_units = evaluate


def replays(session, orders: np.ndarray, chained: bool) -> torch.Tensor:
    """Predictions [R, S+1, N] along each order over every image; ``chained=False`` reverses the masks' order, so the
    engine sees no chain and takes its general path for unit sets."""
    acts, labels = session.acts.take(np.arange(len(session.labels))), session.labels
    if chained:
        return greedy.ablation_paths(session.engine, acts, labels, orders)
    masks = greedy.prefix_masks(orders, acts.shape[1]).flatten(0, 1)
    reverse = torch.arange(len(masks) - 1, -1, -1)
    pred = session.engine.evaluate_units(acts, labels, masks[reverse], probabilities=False).pred[reverse]
    return pred.reshape(len(orders), -1, len(labels))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="data/stores/demo.h5")
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--classes", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--orders", type=int, default=10, help="random orders per class replayed (the stage: 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    session = load_session(args.store, args.layer)
    if args.threads:
        torch.set_num_threads(args.threads)
    classes = list(range(min(args.classes, session.num_classes)))
    print(f"{args.store} {args.layer}: {session.units} units, {len(session.labels)} images, classes {classes}, "
          f"{args.steps} steps, torch threads {torch.get_num_threads()}, machine load {os.getloadavg()[0]:.1f}")

    old_s, (old_orders, old_rows) = best_of(args.repeats, lambda: greedy_runs(session, classes, args.steps, False))
    new_s, (new_orders, new_rows) = best_of(args.repeats, lambda: greedy_runs(session, classes, args.steps, True))
    print(f"greedy steps, every candidate's full outcome: {old_s:7.2f} s, rows computed {old_rows['computed']:,}")
    print(f"greedy steps, predictions first:               {new_s:7.2f} s, rows computed {new_rows['computed']:,}, "
          f"certified {new_rows['certified']:,}")
    print(f"  ratio {old_s / new_s:.2f}x, same orders: {old_orders == new_orders}")

    orders = np.array(list(new_orders) + [row for class_index in classes
                                          for row in greedy.random_orders(session.units, args.steps, args.orders,
                                                                          class_index)])
    general_s, general = best_of(args.repeats, lambda: replays(session, orders, chained=False))
    chain_s, chain = best_of(args.repeats, lambda: replays(session, orders, chained=True))
    print(f"replays of {len(orders)} orders x {args.steps + 1} prefixes x {len(session.labels)} images: "
          f"general {general_s:.2f} s, chains {chain_s:.2f} s, ratio {general_s / chain_s:.2f}x, "
          f"same predictions: {bool(torch.equal(general, chain))}")
    return 0 if old_orders == new_orders and torch.equal(general, chain) else 1


if __name__ == "__main__":
    sys.exit(main())
