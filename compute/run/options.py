"""Each stage's own options: one typed dataclass per stage, each default's reason beside it.

A field becomes a command-line option (``top_k`` -> ``--top-k``) in the stage's argparse group; its ``check`` refuses
a value before the first stage runs. A field marked ``keyed=False`` chooses where a stage runs, not what it computes,
so it stays out of the stage's key (asking greedy for one more layer must not recompute the layers it has).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field


def option(default, help: str, check=None, expected: str = "", keyed: bool = True, **argparse_kwargs):
    return field(default=default, metadata={"help": help, "check": check, "expected": expected, "keyed": keyed,
                                            "argparse": argparse_kwargs})


@dataclass(frozen=True)
class RunOptions:
    """How a run goes, not what it computes: none of these is in any stage's key."""
    # A GPU gets batches big enough to keep it busy; on a CPU 64 keeps the working set in the caches.
    batch_size: int | None = option(None, "images per batch (default: 128 on a GPU, 64 on the CPU)",
                                    lambda v: v >= 1, "a batch size of at least 1", keyed=False, type=int)
    # 1 GiB of working memory beside the model and the data fits on any 8 GB GPU and on a laptop.
    max_memory: float = option(1.0, "GiB of working memory for a stage: kept activations, batches, ablation chunks "
                                    "(default 1)", lambda v: 0 < v < math.inf,
                               "a positive number of GiB", keyed=False, type=float)


@dataclass(frozen=True)
class FlipOptions:
    # Off: the app shows flipped images from the validation set where it is at hand; thumbnails grow a store.
    keep_flip_thumbs: bool = option(False, "keep 64 px thumbnails of every image an ablation flips in the store "
                                    "(layers/<L>/{ablation,greedy}/flips/thumbs), so the app shows them without the "
                                    "images", action="store_true")


@dataclass(frozen=True)
class DissectionOptions:
    # Network Dissection's values: the top 0.5% of a unit's activations, and IoU 0.04 to call it a detector.
    quantile: float = option(0.005, "dissection: top activation quantile", lambda v: 0 < v < 1,
                             "a quantile between 0 and 1, e.g. 0.005 for the top 0.5%", type=float)
    iou_threshold: float = option(0.04, "dissection: IoU to call a detector", lambda v: 0 <= v <= 1,
                                  "an IoU from 0 to 1, e.g. 0.04", type=float)
    # "image" is the paper's definition (DESIGN.md); "pixel" reproduces NetDissect-Lite's tally.
    union_rule: str = option("image", "dissection: where a unit's active area joins a category's union: on images "
                             "carrying a label of the category (image) or where it touches one, as NetDissect-Lite "
                             "(pixel)", choices=("image", "pixel"))


@dataclass(frozen=True)
class TopImageOptions:
    # Ten, as the paper's figures show; they are segmented with the dissection threshold.
    top_k: int = option(10, "top activating images kept per unit (0 = skip)", lambda v: v >= 0,
                        "0 or more top images per unit (0 = skip)", type=int)


@dataclass(frozen=True)
class GreedyOptions:
    # Fig. 4 of the paper ablates up to 20 units per class.
    greedy_steps: int = option(20, "greedy ablation: units per class (0 = skip)", lambda v: v >= 0,
                               "0 or more units per class (0 = skip)", type=int)
    greedy_classes: tuple | None = option(None, "greedy ablation: class names or indices (default: all classes)",
                                          nargs="*")
    # Ten random orders give the baseline curve a spread to compare with.
    random_orders: int = option(10, "greedy ablation: random-order seeds", lambda v: v >= 0,
                                "0 or more random orders", type=int)
    # Greedy on a full-conv tail costs ~30 sweeps of the layer: the deepest layer is where the paper runs it.
    greedy_layers: tuple | None = option(None, "greedy ablation: layers (default: the deepest chosen layer)",
                                         keyed=False, nargs="*")


@dataclass(frozen=True)
class RotationOptions:
    # One rotation answers Fig. 7; more give a spread across rotations.
    rotations: int = option(1, "random rotations (seeds) per layer (0 = skip)", lambda v: v >= 0,
                            "0 or more rotations per layer (0 = skip)", type=int)
    # A rotated direction runs the whole tail where max pooling follows: the deepest layer, as in the paper.
    rotation_layers: tuple | None = option(None, "random rotations: layers (default: the deepest chosen layer)",
                                           keyed=False, nargs="*")


@dataclass(frozen=True)
class LiveOptions:
    # The deepest layer: the one greedy runs on by default, and the cheapest to keep.
    live_layers: tuple | None = option(None, "layers whose activations are kept for live work in the app "
                                       "(default: the deepest; none with no value)", keyed=False, nargs="*")


def add_group(parser: argparse.ArgumentParser, options: type, title: str) -> None:
    group = parser.add_argument_group(title)
    for spec in dataclasses.fields(options):
        meta = spec.metadata
        group.add_argument("--" + spec.name.replace("_", "-"), default=spec.default, help=meta["help"],
                           **meta["argparse"])


def from_args(options: type, args: argparse.Namespace):
    """The dataclass filled from parsed arguments, each value checked against its range first."""
    values = {}
    for spec in dataclasses.fields(options):
        value = getattr(args, spec.name)
        check = spec.metadata["check"]
        if value is not None and check is not None and not check(value):  # NaN fails every comparison: refused
            shown = f"{value:g}" if isinstance(value, float) else value
            raise ValueError(f"--{spec.name.replace('_', '-')} {shown} is out of range: pass "
                             f"{spec.metadata['expected']}")
        values[spec.name] = tuple(value) if isinstance(value, list) else value
    return options(**values)


def keyed(options) -> dict:
    """The fields that change what a stage computes: the part of its key the options give."""
    return {spec.name: getattr(options, spec.name) for spec in dataclasses.fields(options) if spec.metadata["keyed"]}
