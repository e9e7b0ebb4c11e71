"""Stock ``F.max_pool2d`` against compute.lib.pooling's sliced form, on the pools of the demo, AlexNet and ResNet18.

    python -m bench.pooling [--threads N] [--repeats R]

Prints, per shape, both times (best of R), their ratio and whether the outputs are equal.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from compute.lib.pooling import sliced_max_pool2d

CASES = [  # (what, input shape, kernel, stride, padding)
    ("demo pool5, 2048 rows", (2048, 128, 8, 8), 2, 2, 0),
    ("demo pool2, 512 images", (512, 64, 16, 16), 2, 2, 0),
    ("demo pool1, 256 images", (256, 32, 32, 32), 2, 2, 0),
    ("AlexNet pool5, 512 rows", (512, 256, 13, 13), 3, 2, 0),
    ("AlexNet pool1, 256 images", (256, 96, 55, 55), 3, 2, 0),
    ("ResNet18 stem pool, 64 images", (64, 64, 112, 112), 3, 2, 1),
]


def best_of(repeats: int, fn) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads")
    print(f"{'case':32s} {'stock ms':>9s} {'sliced ms':>9s} {'ratio':>6s} equal")
    for what, shape, kernel, stride, padding in CASES:
        x = torch.randn(shape)
        stock = best_of(args.repeats, lambda: F.max_pool2d(x, kernel, stride, padding))
        sliced = best_of(args.repeats, lambda: sliced_max_pool2d(x, kernel, stride, padding))
        equal = torch.equal(F.max_pool2d(x, kernel, stride, padding), sliced_max_pool2d(x, kernel, stride, padding))
        print(f"{what:32s} {stock * 1e3:9.1f} {sliced * 1e3:9.1f} {stock / sliced:5.1f}x {equal}")


if __name__ == "__main__":
    main()
