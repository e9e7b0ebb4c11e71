"""A store with the shape of AlexNet on Places365, from seeded synthetic numbers, to benchmark the app at paper size.

    python -m bench.paper_store OUT_DIR [--live] [--units 384 256 256] [--classes 365] [--per-class 100] ...

Writes ``OUT_DIR/alexnet-places-synthetic.h5`` through ``store.writer.StoreWriter``, stage by stage as
``compute.all`` does (same stage names, dataset paths, dataset and group attributes, provenance with the settings of
``compute.all --model alexnet-places``), so ``python -m store.check`` and the app treat it as a real run. The numbers
are synthetic but keep what the pages depend on: 100 validation images per class, so accuracies and drops are
multiples of 1/100 (greedy held-out halves 1/50); a few classes per unit with large drops; sparse concept IoUs;
smooth thumbnails and blob masks; monotone greedy curves. Attributes, best concepts, top-image ranking and the
relations table come from the project's own functions (``compute.lib.attributes``, ``compute.lib.dissection``,
``compute.lib.topimages``, ``compute.analysis.relations``) applied to the synthetic activations and drops.

Live data (``--live``) is what a real run keeps for the deepest layer: every image's conv5 map, float32
[36,500, 256, 13, 13] = 6.3 GB before compression, plus the tail weights (fc6..fc8, 57M floats, 0.23 GB). It is off
by default: compressed it is 5x the rest of the store (2.2 of 2.6 GB, 259 s to build instead of 46 s), and the
app's greedy page loads all of it into memory.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from compute.all import code_version, parse_args
from compute.run.pipeline import digest
from compute.lib.attributes import class_correlation, class_selectivity
from compute.lib.dissection import best_concepts
from compute.lib.greedy import SPLIT, TIE_BREAK
from compute.analysis.relations import BOOTSTRAP_SEED, CONFIDENCE, drop_targets, relation_table, scalar_attributes
from compute.stages.ablation import drops, write_drops
from compute.lib.topimages import top_indices
from store.writer import StoreWriter, create_array, write_array

MODEL = "alexnet-places"
NAME = "alexnet-places-synthetic"
CATEGORIES = ("object", "part", "scene", "material", "texture")
MAP = 13  # AlexNet conv3..conv5 maps at 224x224 input
ALEXNET_NOTE = "unit = ReLU output channel of the conv layer, set to zero (equals zeroing the conv's weight and bias)"


@dataclass(frozen=True)
class Shape:
    """Sizes of the store; the defaults are the paper's AlexNet-Places365 run."""

    units: dict = field(default_factory=lambda: {"conv3": 384, "conv4": 256, "conv5": 256})
    classes: int = 365
    per_class: int = 100
    concepts: int = 1198
    top_k: int = 8
    thumb: int = 96  # compute.lib.topimages keeps thumbnails of min(crop, 96) pixels: 96 for a 224 crop
    greedy_steps: int = 20
    random_orders: int = 3
    rotations: int = 3
    n_resamples: int = 199  # relations bootstrap (compute.all uses 999; the page shows the same table either way)
    live: bool = False

    @property
    def images(self) -> int:
        return self.classes * self.per_class

    @property
    def layers(self) -> list[str]:
        return list(self.units)

    @property
    def deepest(self) -> str:
        return self.layers[-1]


# -- run settings and provenance, as compute.all writes them --------------------------------------------------------
def settings(shape: Shape) -> dict:
    """compute.all's recorded settings for the equivalent command line (same keys, so provenance reads the same)."""
    argv = ["--model", MODEL, "--layers", *shape.layers, "--top-k", str(shape.top_k),
            "--greedy-steps", str(shape.greedy_steps), "--random-orders", str(shape.random_orders),
            "--rotations", str(shape.rotations), "--data", "synthetic", "--dataset", "places365",
            "--live-layers", *([shape.deepest] if shape.live else [])]
    args = parse_args(argv)
    chosen = {name: value for name, value in vars(args).items()
              if name not in ("store", "device", "force", "data_dir", "name", "batch_size", "max_memory")}
    chosen.update(layers=shape.layers, live_layers=[shape.deepest] if shape.live else [])
    return chosen


def provenance(shape: Shape, config: dict, seed: int) -> dict:
    return {
        "model": MODEL, "arch": "alexnet", "run_name": NAME,
        "description": "SYNTHETIC numbers with the shape of torchvision AlexNet on Places365 (bench.paper_store)",
        "weights_path": "synthetic", "weights_sha256": "synthetic", "data_kind": "places365",
        "data_path": "synthetic", "data_fingerprint": f"synthetic-seed{seed}", "num_images": shape.images,
        "num_classes": shape.classes, "concepts_path": "synthetic", "config": config, "code_version": code_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "device": "cpu", "precision": "float32",
        "torch_version": "synthetic", "ablation_note": ALEXNET_NOTE, "layer_order": shape.layers, "seed": seed,
        "synthetic": 1,
    }


# -- synthetic numbers ------------------------------------------------------------------------------------------------
def class_names(count: int) -> list[str]:
    return [f"/s/scene_{k:03d}" for k in range(count)]


def softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits - logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def predictions(rng, labels: np.ndarray, classes: int) -> np.ndarray:
    """Class probabilities [N, K] float32 with about AlexNet-Places365's top-1 accuracy (~50%)."""
    logits = rng.standard_normal((len(labels), classes), dtype=np.float32)
    logits[np.arange(len(labels)), labels] += 3.0
    return softmax(logits).astype(np.float32)


def activation_means(rng, labels: np.ndarray, classes: int, units: int) -> tuple[np.ndarray, np.ndarray]:
    """Spatial mean and max per image and unit [N, U]: unit scales, a few preferred classes per unit, gamma noise."""
    scale = rng.lognormal(0.0, 0.5, units).astype(np.float32)
    prefer = 1.0 + 2.0 * (rng.random((classes, units)) < 0.02).astype(np.float32)
    mean = rng.gamma(2.0, 0.5, (len(labels), units)).astype(np.float32) * scale * prefer[labels]
    peak = mean * (2.0 + rng.gamma(2.0, 1.0, mean.shape).astype(np.float32))
    return mean, peak


def correct_counts(rng, base: np.ndarray, counts: np.ndarray, units: int, spike: float) -> np.ndarray:
    """Correct images per class [U, K] with each unit ablated: small losses everywhere, large ones for a few classes,
    and a few gains (an ablation can fix an image), within [0, images of the class]."""
    classes = len(base)
    loss = rng.poisson(0.25, (units, classes)).astype(np.float64)
    hit = rng.random((units, classes)) < 3.0 / classes
    loss[hit] += rng.exponential(spike, hit.sum()).round()
    gain = rng.poisson(0.12, (units, classes))
    return np.clip(base[None, :] - loss + gain, 0, counts[None, :])


def sweep_result(base_correct: np.ndarray, unit_correct: np.ndarray, counts: np.ndarray) -> dict:
    """Drops with the paired counts a real sweep keeps: a unit's net loss of a class as lost images, a net gain as
    gained ones (the synthetic numbers carry no finer pairing)."""
    lost = np.maximum(base_correct[None, :] - unit_correct, 0)
    gained = np.maximum(unit_correct - base_correct[None, :], 0)
    return drops({"base_correct": base_correct, "lost": lost, "gained": gained, "counts": counts})


def thumbnails(rng, count: int, size: int) -> np.ndarray:
    """Smooth RGB images [count, size, size, 3] uint8 (bicubic blow-ups of 6x6 noise): photo-like compressibility."""
    small = rng.integers(0, 256, (count, 6, 6, 3), dtype=np.uint8)
    return np.stack([cv2.resize(image, (size, size), interpolation=cv2.INTER_CUBIC) for image in small])


def blob_masks(rng, count: int, size: int) -> np.ndarray:
    """One elliptic active region per mask [count, size, size] bool, as a binarised upsampled map looks."""
    grid = np.arange(size, dtype=np.float32)
    centre = rng.uniform(0.15, 0.85, (count, 2)).astype(np.float32) * size
    radius = rng.uniform(0.08, 0.3, (count, 2)).astype(np.float32) * size
    dy = ((grid[None, :] - centre[:, :1]) / radius[:, :1]) ** 2
    dx = ((grid[None, :] - centre[:, 1:]) / radius[:, 1:]) ** 2
    return dy[:, :, None] + dx[:, None, :] < 1.0


def concept_table(rng, count: int) -> dict:
    names = [f"concept_{i:04d}" for i in range(count)]
    category_index = np.sort(rng.integers(0, len(CATEGORIES), count))
    return {"names": np.array(names, dtype=object),
            "categories": np.array([CATEGORIES[i] for i in category_index], dtype=object),
            "numbers": np.arange(1, count + 1, dtype=np.int64), "category_names": np.array(CATEGORIES, dtype=object),
            "category_index": category_index}


def concept_iou(rng, units: int, concepts: int, depth: float) -> np.ndarray:
    """IoU [U, C]: near zero almost everywhere, one concept per unit at up to ~0.3 (more detectors higher up)."""
    iou = rng.exponential(0.004, (units, concepts))
    iou[np.arange(units), rng.integers(0, concepts, units)] = rng.gamma(2.0, 0.015 + 0.02 * depth, units)
    return np.clip(iou, 0, 1).astype(np.float32)


def decay(rng, start: np.ndarray, steps: int, total: int, slow: float, fast: float) -> np.ndarray:
    """Accuracy curves [rows, steps + 1] on a 1/total grid, non-increasing from ``start`` counts."""
    tau = rng.uniform(slow, fast, len(start))[:, None]
    left = np.exp(-np.arange(steps + 1)[None, :] / tau)
    return np.floor(start[:, None] * left + 1e-9) / total


# -- stages ------------------------------------------------------------------------------------------------------------
class Builder:
    """Writes each stage of the synthetic run, in compute.all's order, with the arrays later stages reuse."""

    def __init__(self, writer: StoreWriter, shape: Shape, seed: int):
        self.writer, self.shape = writer, shape
        self.rng = np.random.default_rng(seed)
        self.labels = self.rng.permutation(np.repeat(np.arange(shape.classes), shape.per_class))
        self.counts = np.bincount(self.labels, minlength=shape.classes).astype(np.float64)
        self.means: dict[str, np.ndarray] = {}
        self.results: dict[str, dict] = {}
        self.concepts = concept_table(self.rng, shape.concepts)

    def setup(self) -> None:
        files = [f"val_256/Places365_val_{i + 1:08d}.jpg" for i in range(self.shape.images)]
        with self.writer.stage("setup") as h5:
            write_array(h5, "classes", np.array(class_names(self.shape.classes), dtype=object))
            write_array(h5, "images/labels", self.labels.astype(np.int64))
            write_array(h5, "images/files", np.array(files, dtype=object))

    def activations(self) -> None:
        self.probs = predictions(self.rng, self.labels, self.shape.classes)
        self.predicted = self.probs.argmax(1)
        with self.writer.stage("activations") as h5:
            write_array(h5, "images/predictions", self.predicted.astype(np.int64))
            write_array(h5, "images/probs", self.probs)
            for layer, units in self.shape.units.items():
                mean, peak = activation_means(self.rng, self.labels, self.shape.classes, units)
                self.means[layer], self.results[layer] = mean, {"max": peak}
                group = f"layers/{layer}/activations"
                write_array(h5, f"{group}/mean", mean, description="spatial mean per image and unit")
                write_array(h5, f"{group}/max", peak, description="spatial max per image and unit")
                moments = {"moment_mean": mean.mean(0), "moment_std": mean.std(0) * 2.0,
                           "sparsity": self.rng.uniform(0.4, 0.95, units)}
                for name, value in moments.items():
                    write_array(h5, f"{group}/{name}", value.astype(np.float32))
                self.results[layer].update(moments)
                h5[f"layers/{layer}"].attrs["units"] = units
                h5[f"layers/{layer}"].attrs["map_shape"] = (MAP, MAP)

    def ablation(self, layer: str, depth: float) -> None:
        correct = self.labels == self.predicted
        self.base_correct = np.bincount(self.labels[correct], minlength=self.shape.classes).astype(np.float64)
        unit_correct = correct_counts(self.rng, self.base_correct, self.counts, self.shape.units[layer],
                                      4.0 + 8.0 * depth)
        result = sweep_result(self.base_correct, unit_correct, self.counts)
        self.results[layer].update(result)
        with self.writer.stage(f"ablation/{layer}") as h5:
            group = f"layers/{layer}/ablation"
            write_array(h5, f"{group}/baseline_class_acc", result["baseline_class_acc"])
            write_drops(h5, group, result)
            h5[group].attrs["baseline_overall_acc"] = result["baseline_overall_acc"]
            h5[group].attrs["method"] = ALEXNET_NOTE

    def attributes(self, layer: str) -> None:
        mean, units = self.means[layer], self.shape.units[layer]
        found = self.results[layer]
        found["l1"] = self.rng.lognormal(np.log(20.0), 0.3, units).astype(np.float32)
        found["selectivity"] = class_selectivity(mean, self.labels, self.shape.classes).astype(np.float32)
        found["correlation"] = class_correlation(mean, self.probs).astype(np.float32)
        with self.writer.stage(f"attributes/{layer}") as h5:
            out = f"layers/{layer}/attributes"
            write_array(h5, f"{out}/l1", found["l1"], source=f"synthetic {layer}")
            write_array(h5, f"{out}/selectivity", found["selectivity"])
            write_array(h5, f"{out}/correlation", found["correlation"])
            for name in ("sparsity", "moment_mean", "moment_std"):
                write_array(h5, f"{out}/{name.replace('moment_', 'act_')}", found[name].astype(np.float32))

    def dissection(self, layer: str, depth: float) -> None:
        table, units = self.concepts, self.shape.units[layer]
        iou = concept_iou(self.rng, units, self.shape.concepts, depth)
        best = best_concepts(iou, table["category_index"], len(CATEGORIES))
        thresholds = self.rng.uniform(2.0, 12.0, units).astype(np.float32)
        self.results[layer].update(best, thresholds=thresholds)
        with self.writer.stage(f"dissection/{layer}") as h5:
            for name in ("names", "categories", "numbers", "category_names"):
                write_array(h5, f"concepts/{name}", table[name])
            group = f"layers/{layer}/dissection"
            write_array(h5, f"{group}/iou", iou, description="[units, concepts]")
            write_array(h5, f"{group}/thresholds", thresholds,
                        description="top 0.005 quantile of each unit over the concept images")
            for name, value in best.items():
                write_array(h5, f"{group}/{name}", value)
            h5[group].attrs.update({"iou_threshold": 0.04, "quantile": 0.005, "concept_images": 63305,
                                    "concepts_path": "synthetic", "concepts_fingerprint": "synthetic"})

    def topimages(self, layer: str) -> None:
        k, size = self.shape.top_k, self.shape.thumb
        order, scores = top_indices(self.results[layer]["max"], k)
        chosen, slot = np.unique(order, return_inverse=True)
        thumbs = thumbnails(self.rng, len(chosen), size)[slot.reshape(order.shape)]
        masks = blob_masks(self.rng, order.size, size).reshape(order.shape + (size, size))
        with self.writer.stage(f"topimages/{layer}") as h5:
            group = f"layers/{layer}/topimages"
            write_array(h5, f"{group}/indices", order.astype(np.int64), description="validation image index [units, k]")
            write_array(h5, f"{group}/scores", scores.astype(np.float32), description="max of the activation map")
            write_array(h5, f"{group}/thumbs", thumbs,
                        description="[units, k, h, w, 3] RGB thumbnails of the model's centre crop")
            write_array(h5, f"{group}/masks", masks, description="upsampled activation map > threshold")
            write_array(h5, f"{group}/thresholds", self.results[layer]["thresholds"])
            h5[group].attrs.update({"threshold_source": "dissection (concept images)", "quantile": 0.005, "k": k})

    def relations(self, layer: str) -> None:
        found = self.results[layer]
        sections = {"attributes": ("selectivity", "correlation", "l1", "sparsity"), "dissection": ("best_iou",),
                    "ablation": ("overall_drop", "class_drop")}
        renamed = {"act_mean": "moment_mean", "act_std": "moment_std"}

        def read(section: str, name: str):
            if name in sections.get(section, ()) or (section == "attributes" and name in renamed):
                return found[renamed.get(name, name)]
            return None

        table = relation_table(scalar_attributes(read), drop_targets(read), n_resamples=self.shape.n_resamples)
        with self.writer.stage(f"relations/{layer}") as h5:
            group = f"layers/{layer}/relations"
            for name, value in table.items():
                write_array(h5, f"{group}/{name}", value)
            h5[group].attrs.update({"n_resamples": self.shape.n_resamples, "bootstrap_seed": BOOTSTRAP_SEED,
                                    "confidence": CONFIDENCE, "ci_method": "BCa", "units": len(found["overall_drop"])})

    def greedy(self, layer: str) -> None:
        """Every class's greedy curves on the deepest layer (compute.all's default --greedy-layers)."""
        shape, rng = self.shape, self.rng
        k, steps, units = shape.classes, min(shape.greedy_steps, shape.units[layer]), shape.units[layer]
        classes = np.arange(k)
        half = shape.per_class // 2
        base = self.base_correct
        curves = {
            "order": np.argsort(rng.random((k, units)), 1)[:, :steps],
            "heldout_order": np.argsort(rng.random((k, units)), 1)[:, :steps],
            "class_acc": decay(rng, base, steps, shape.per_class, 3.0, 10.0),
            "heldout_select_acc": decay(rng, np.floor(base / 2), steps, half, 2.0, 8.0),
            "heldout_acc": decay(rng, np.floor(base / 2), steps, half, 8.0, 30.0),
        }
        random = np.stack([decay(rng, base, steps, shape.per_class, 40.0, 120.0) for _ in range(shape.random_orders)])
        lost = np.cumsum(rng.poisson(0.04, (k, steps, k)), axis=1)
        others = np.clip(base[None, None, :] - np.concatenate([np.zeros((k, 1, k)), lost], 1), 0, None)
        all_class = others / self.counts[None, None, :]
        all_class[classes, :, classes] = curves["class_acc"]
        overall = (all_class * self.counts).sum(-1) / shape.images
        with self.writer.stage(f"greedy/{layer}") as h5:
            group = f"layers/{layer}/greedy"
            write_array(h5, f"{group}/classes", classes.astype(np.int64))
            for name in ("order", "heldout_order"):
                write_array(h5, f"{group}/{name}", curves[name].astype(np.int64))
            for name in ("class_acc", "heldout_acc", "heldout_select_acc"):
                write_array(h5, f"{group}/{name}", curves[name].astype(np.float32))
            write_array(h5, f"{group}/random_class_acc", random.astype(np.float32))
            write_array(h5, f"{group}/overall_acc", overall.astype(np.float32))
            write_array(h5, f"{group}/all_class_acc", all_class.astype(np.float32),
                        axes="greedy class row, step, class")
            attrs = h5[group].attrs
            attrs["steps"] = steps
            attrs["random_orders"] = shape.random_orders
            attrs["random_seeding"] = "numpy default_rng((seed r, class index)), first S units of a permutation"
            attrs["tie_break"] = TIE_BREAK
            attrs["split"] = SPLIT
            attrs["rows"] = "rows follow 'classes'; step 0 is the unablated baseline"

    def rotation(self, layer: str) -> None:
        """Random directions: the same small losses as units, without the large class-specific ones."""
        units = self.shape.units[layer]
        results = [sweep_result(self.base_correct, correct_counts(self.rng, self.base_correct, self.counts, units, 1.5),
                                self.counts) for _ in range(self.shape.rotations)]
        with self.writer.stage(f"rotation/{layer}") as h5:
            group = f"layers/{layer}/rotation"
            write_drops(h5, group, {name: np.stack([r[name] for r in results]) for name in results[0]
                                    if name != "baseline_overall_acc"})
            write_array(h5, f"{group}/seeds", np.arange(self.shape.rotations, dtype=np.int64))
            h5[group].attrs["baseline_overall_acc"] = results[0]["baseline_overall_acc"]
            h5[group].attrs["method"] = ("direction q_j of a Haar-random orthogonal Q (scipy.stats.ortho_group, "
                                         "random_state=seed) removed at every position: a' = a - q_j (q_j^T a)")

    def live(self, layer: str) -> None:
        """Every image's map of the deepest layer (sparse, as after a ReLU) and AlexNet's tail after it."""
        from compute.models import get_spec
        from compute.lib.sequence import tail_of

        spec = get_spec(MODEL)
        tail = tail_of(spec.to_sequence(spec.build(self.shape.classes)), spec.layers[layer])
        units, n, batch = self.shape.units[layer], self.shape.images, 64
        with self.writer.stage(f"live/{layer}") as h5:
            group = f"layers/{layer}/live"
            data = create_array(h5, f"{group}/acts", (n, units, MAP, MAP), np.float32,
                                chunks=(1, units, MAP, MAP))  # as compute/stages/live.py writes it
            for start in range(0, n, batch):
                size = min(batch, n - start)
                values = self.rng.random((size, units, MAP, MAP), dtype=np.float32)
                data[start:start + size] = np.where(values > 0.8, (values - 0.8) * 40.0, 0.0).astype(np.float32)
            for name, tensor in tail.state_dict().items():
                write_array(h5, f"{group}/tail/{name}", tensor.numpy())
            h5[group].attrs["step"] = spec.layers[layer]
            h5[group].attrs["model"] = MODEL
            h5[group].attrs["num_classes"] = self.shape.classes


def build(out_dir, shape: Shape = Shape(), seed: int = 0, log=print) -> Path:
    """Write the synthetic store into ``out_dir`` (replacing one there) and return its path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = settings(shape)
    key = digest({"model": MODEL, "synthetic": seed, "settings": config, "units": shape.units})
    writer = StoreWriter(out_dir / f"{NAME}.h5", key, provenance(shape, config, seed))
    builder = Builder(writer, shape, seed)
    started = time.perf_counter()

    def timed(name: str, stage) -> None:
        begun = time.perf_counter()
        stage()
        log(f"  {name:<20} {time.perf_counter() - begun:6.1f} s")

    timed("setup", builder.setup)
    timed("activations", builder.activations)
    for position, layer in enumerate(shape.layers):
        depth = position / max(1, len(shape.layers) - 1)
        timed(f"ablation/{layer}", lambda: builder.ablation(layer, depth))
        timed(f"attributes/{layer}", lambda: builder.attributes(layer))
        timed(f"dissection/{layer}", lambda: builder.dissection(layer, depth))
        timed(f"topimages/{layer}", lambda: builder.topimages(layer))
        timed(f"relations/{layer}", lambda: builder.relations(layer))
        if layer == shape.deepest:
            timed(f"greedy/{layer}", lambda: builder.greedy(layer))
        timed(f"rotation/{layer}", lambda: builder.rotation(layer))
    if shape.live:
        timed(f"live/{shape.deepest}", lambda: builder.live(shape.deepest))
    path = writer.commit()
    log(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.paper_store", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="directory to write alexnet-places-synthetic.h5 into")
    parser.add_argument("--units", type=int, nargs=3, default=[384, 256, 256], metavar=("CONV3", "CONV4", "CONV5"))
    parser.add_argument("--classes", type=int, default=365)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--concepts", type=int, default=1198)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--thumb", type=int, default=96)
    parser.add_argument("--live", action="store_true", help="also keep conv5's live data (6.3 GB before compression)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = Shape(units=dict(zip(("conv3", "conv4", "conv5"), args.units)), classes=args.classes,
                  per_class=args.per_class, concepts=args.concepts, top_k=args.top_k, thumb=args.thumb, live=args.live)
    build(args.out_dir, shape, args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
