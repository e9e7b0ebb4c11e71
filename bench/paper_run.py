"""The whole pipeline at the paper's shape, timed per stage: AlexNet on Places365-shaped data, random weights.

    python -m bench.paper_run OUT_DIR [--per-class N] [--greedy-classes K] [--layers L ...] [--device cpu|cuda]
                                      [--threads T] [--report-only]

Writes into OUT_DIR, once (later runs reuse them):

* ``weights/alexnet_places365.pth.tar``: random He-scaled AlexNet weights for 365 classes (``bench.ablation``'s
  ``random_model``, whose classifier bias is centred so that every class is predicted for some images), in the
  published Places365 checkpoint format (``features.module.*`` keys under ``state_dict``);
* ``places365-N/``: the validation set in the Places365 layout (``val_256/``, ``places365_val.txt``,
  ``categories_places365.txt``): ``--per-class`` generated 256x256 images per class (SynthScenes scenes, upscaled,
  centre-cropped to 224 by the model's preprocessing), class i on every 365th image;
* the SynthScenes concept set (Broden layout, 9,600 images with pixel masks) for dissection, from ``--data-dir``.

Then it runs ``python -m compute.all --model alexnet-places`` on them with every stage (conv3..conv5; greedy,
rotation and live data on conv5), reads each stage's wall time and peak memory from the store's records, and prints
them with a projection to the paper's run: 36,500 validation images (100 per class) and greedy on all 365 classes.
Stages over the validation images scale with their number, dissection with the concept images' (to Broden's). Greedy
is projected from the rows it evaluates at the paper's size (``greedy_rows``) times the single-unit sweep's time per
row on the same layer, because a small run's greedy time is mostly fixed costs; the sweeps of all layers run in one
pass (one time for all), so that per-row time is the layer's own only with ``--layers`` naming that layer alone. With
``--per-class 100 --greedy-classes 365 --device cuda`` the run *is* the paper's and every factor is about 1.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PAPER_IMAGES = 36_500
BRODEN_IMAGES = 63_305  # broden1_224, the concept set the paper dissects with
CLASSES = 365
LAYERS = ("conv3", "conv4", "conv5")
CONCEPT_IMAGES = 9_600  # the SynthScenes concept set


def write_weights(path: Path) -> None:
    """Random AlexNet-Places365 weights in the published checkpoint layout."""
    from bench.ablation import random_model

    _, model, _ = random_model("alexnet-places")
    state = {k.replace("features.", "features.module.", 1): v for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 0, "arch": "alexnet", "state_dict": state}, path)


def write_validation(root: Path, per_class: int) -> None:
    """``per_class`` generated images per class in the Places365 validation layout."""
    from compute.data import synthscenes

    folder = root / "val_256"
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    scenes = len(synthscenes.CLASSES)
    for i in range(per_class * CLASSES):
        name = f"Places365_val_{i + 1:08d}.jpg"
        rgb = synthscenes.render(0, "val", i % scenes, i // scenes).rgb
        big = cv2.resize(rgb, (256, 256), interpolation=cv2.INTER_LINEAR)
        cv2.imwrite(str(folder / name), cv2.cvtColor(big, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 90])
        lines.append(f"{name} {i % CLASSES}\n")
    (root / "places365_val.txt").write_text("".join(lines))
    (root / "categories_places365.txt").write_text("".join(f"/c/class_{k:03d} {k}\n" for k in range(CLASSES)))


def units_of(store: Path, layer: str) -> int:
    import h5py

    with h5py.File(store, "r") as handle:
        return int(handle[f"layers/{layer}"].attrs["units"])


def stage_records(store: Path) -> dict:
    import h5py

    with h5py.File(store, "r") as handle:
        return {name: json.loads(value) for name, value in handle["stages"].attrs.items()}


def projection(stage: str, images: int, concepts: int) -> float:
    """Factor from this run to the paper's (36,500 validation images, Broden's 63,305 concept images) for one stage's
    time (greedy: see ``greedy_rows``)."""
    section = stage.split("/")[0]
    if section in ("setup", "attributes", "relations"):
        return 1.0  # arrays of units x classes
    return BRODEN_IMAGES / concepts if section == "dissection" else PAPER_IMAGES / images


def greedy_rows(classes: int, per_class: int, images: int, units: int, steps: int = 20, orders: int = 10) -> float:
    """(unit set, image) rows greedy evaluates: per class, each step's candidates on the class's images and on its
    even half, the random orders and the held-out replay on the class's images, and the order's replay on every image.
    A small run's greedy time is mostly fixed costs (the certificate's norms, thousands of tiny calls), so the paper's
    greedy is projected from its rows at the single-unit sweep's time per row, the same tail."""
    candidates = steps * (units - (steps - 1) / 2)
    return classes * (candidates * 1.5 * per_class + (orders + 0.5) * (steps + 1) * per_class + (steps + 1) * images)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=10, help="validation images per class (paper: 100)")
    parser.add_argument("--greedy-classes", type=int, default=CLASSES, help="classes greedy runs on (paper: 365)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--data-dir", type=Path, default=None, help="where the SynthScenes concept set is")
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), help="layers (paper: conv3 conv4 conv5)")
    parser.add_argument("--report-only", action="store_true", help="print the table of the store a run left")
    args = parser.parse_args(argv)
    from compute.paths import data_dir

    out = args.out.resolve()
    weights = out / "weights" / "alexnet_places365.pth.tar"
    if not weights.exists():
        write_weights(weights)
    places = out / f"places365-{args.per_class}"
    if not (places / "places365_val.txt").exists():
        begun = time.perf_counter()
        write_validation(places, args.per_class)
        print(f"wrote {args.per_class * CLASSES} validation images in {time.perf_counter() - begun:.0f} s")
    concepts = (args.data_dir or data_dir()) / "datasets" / "synthscenes-seed0"
    if not (concepts / "index.csv").exists():
        parser.error(f"no SynthScenes concept set in {concepts}: run python -m compute.all --model demo once")
    store = out / "stores" / f"alexnet-places-{args.per_class}-{args.device}.h5"
    command = [sys.executable, "-m", "compute.all", "--model", "alexnet-places", "--weights", str(weights),
               "--data", str(places), "--dataset", "places365", "--concepts", str(concepts),
               "--layers", *args.layers, "--store", str(store), "--device", args.device, "--force",
               "--greedy-classes", *map(str, range(args.greedy_classes))]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    begun = time.perf_counter()
    if not args.report_only:
        subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - begun
    images = args.per_class * CLASSES
    print(f"alexnet-places, random weights, {images} images ({args.per_class} per class), greedy on "
          f"{args.greedy_classes} classes, {args.device}, threads {torch.get_num_threads() if not args.threads else args.threads}:"
          f" {wall:.0f} s wall in all")
    print(f"{'stage':<22} {'s':>9} {'peak MiB':>9} {'x to paper':>10} {'projected s':>12}")
    total = 0.0
    records = stage_records(store)
    for stage, record in records.items():
        seconds = float(record.get("seconds", 0.0))
        factor = projection(stage, images, CONCEPT_IMAGES)
        if stage.startswith("greedy/"):
            layer = stage.split("/")[1]
            sweep = float(records[f"ablation/{layer}"]["seconds"])
            units = units_of(store, layer)
            per_row = sweep / (units * images)
            factor = greedy_rows(CLASSES, PAPER_IMAGES // CLASSES, PAPER_IMAGES, units) * per_row / seconds
            if len([name for name in records if name.startswith("ablation/")]) > 1:
                print(f"(greedy's projection takes the joint sweep of all layers as {layer}'s: an upper bound)")
        total += seconds * factor
        print(f"{stage:<22} {seconds:>9.1f} {record.get('host_mib', record.get('device_mib', 0)):>9.0f} "
              f"{factor:>10.1f} {seconds * factor:>12.0f}")
    print(f"projected paper run (36,500 images, greedy on 365 classes, Broden) on this machine: {total:.0f} s "
          f"({total / 3600:.1f} h)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
