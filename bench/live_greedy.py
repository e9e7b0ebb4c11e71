"""Benchmark: live greedy ablation for one class of a store, as the app runs it (store alone, no images/checkpoint).

    python bench/live_greedy.py [--store /work/demo-data/stores/demo.h5] [--layer conv5] [--class 0] [--steps 20]

Prints the seconds of each part: rebuilding the session from the store (cached once per store in the app; mostly
importing torchvision through the model registry), the greedy run itself (the number the < 10 s target is about),
and scoring the chosen order on every image (the app's "classes that lose most"). CPU seconds and the machine's load
are printed too: on a shared machine wall time depends on the load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


from compute.live_session import load_session  # noqa: E402


def timed(label: str, work):
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    print(f"{label:<34} {time.perf_counter() - wall:7.2f} s   (cpu {time.process_time() - cpu:6.2f} s)")
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="/work/demo-data/stores/demo.h5")
    parser.add_argument("--layer", default="conv5")
    parser.add_argument("--class", dest="class_index", type=int, default=0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the live work (the app uses 1)")
    parser.add_argument("--hold-gb", type=float, help="live-memory budget (default: $UNIT_ABLATION_LIVE_MEMORY or 2); "
                                                       "0 streams the layer from the store")
    parser.add_argument("--score", action="store_true", help="also score the order on every image (slow on a CPU "
                                                             "for a paper-sized layer)")
    args = parser.parse_args(argv)
    hold = None if args.hold_gb is None else int(args.hold_gb * (1 << 30))
    session = timed("load session from the store", lambda: load_session(args.store, args.layer, hold=hold))
    print(f"activations {session.acts.nbytes / 2**20:,.0f} MB, "
          f"{'held in memory' if session.acts.held is not None else 'streamed from the store'}")
    timed("read one class's activations", lambda: session.acts.take(session.images_of([args.class_index])))
    session.threads = args.threads
    images = len(session.images_of([args.class_index]))
    print(f"{args.layer}: {session.units} units, class {session.class_names[args.class_index]} ({images} images), "
          f"{args.steps} steps, torch threads {args.threads}, machine load {os.getloadavg()[0]:.1f}")

    def run_greedy():
        state = session.start_greedy([args.class_index])
        for _ in range(args.steps):
            session.advance(state)
        return state

    state = timed(f"live greedy, {args.steps} steps", run_greedy)
    if args.score:
        timed("score the order on all images", lambda: session.path_accuracy(state.chosen))
    print(f"order {state.chosen}")
    print(f"class accuracy {state.scores[0]:.3f} -> {state.scores[-1]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
