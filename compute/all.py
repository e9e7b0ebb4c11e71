"""Run the whole offline pipeline for one model into one store: ``python -m compute.all --model demo``.

Stages (each resumable; a killed run restarts at the first unfinished one): set-up (classes, labels), the activation
pass, then per layer the single-unit ablation sweep, the unit attributes and the further analyses, and the live data
for the app. The store appears under its final name only when every stage is done.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from compute import distributed, paths
from compute.errors import MissingWeights, StageSkipped, UserError, disk_full, no_space_left, run_cli
from compute.models import get_spec, model_names
from store import StoreError, StoreWriter
from store.writer import write_array

CODE_VERSION_FALLBACK = "unknown"


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or CODE_VERSION_FALLBACK
    except (OSError, subprocess.SubprocessError):
        return CODE_VERSION_FALLBACK


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m compute.all", description=__doc__.splitlines()[0],
        epilog="models: " + ", ".join(f"{name}" for name in model_names()))
    parser.add_argument("--model", default="demo", help="model name (see below)")
    parser.add_argument("--layers", nargs="+", default=None, help="layers to analyse (default: the model's)")
    parser.add_argument("--weights", default=None, help="checkpoint file (default: looked up for the model)")
    parser.add_argument("--seed", type=int, default=0, help="instance seed of a demo model (trained if missing)")
    parser.add_argument("--data", default=None, help="validation set folder (default: the model's data set)")
    parser.add_argument("--dataset", default=None, choices=("synthscenes", "places365", "imagenet", "imagefolder"),
                        help="layout of --data (default: the model's; imagefolder = any <class>/<image> folder)")
    parser.add_argument("--concepts", default=None, help="Broden-layout concept data set for dissection")
    parser.add_argument("--per-class", type=int, default=None, help="use the first N validation images per class")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    parser.add_argument("--store", default=None, help="store file (.h5) or directory (default <data>/stores)")
    parser.add_argument("--name", default=None, help="run name, the store's file name (default model[-seedN])")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--max-memory", type=float, default=1.0, help="GiB for one ablation chunk (default 1)")
    parser.add_argument("--live-layers", nargs="*", default=None,
                        help="layers whose activations are kept for live work in the app (default: the deepest)")
    parser.add_argument("--force", action="store_true", help="recompute even if the store is up to date")
    for option in EXTRA_OPTIONS:
        option(parser)
    return check_options(parser.parse_args(argv))


# Numeric options: the values that make sense, and what to pass instead. None (not given) is always fine.
OPTION_RANGES = {
    "seed": (lambda v: v >= 0, "a seed of 0 or more"),
    "per_class": (lambda v: v >= 1, "at least 1 image per class (leave it out to use every image)"),
    "batch_size": (lambda v: v >= 1, "a batch size of at least 1"),
    "max_memory": (lambda v: 0 < v < math.inf, "a positive number of GiB"),
    "top_k": (lambda v: v >= 0, "0 or more top images per unit (0 = skip)"),
    "quantile": (lambda v: 0 < v < 1, "a quantile between 0 and 1, e.g. 0.005 for the top 0.5%"),
    "iou_threshold": (lambda v: 0 <= v <= 1, "an IoU from 0 to 1, e.g. 0.04"),
    "greedy_steps": (lambda v: v >= 0, "0 or more units per class (0 = skip)"),
    "random_orders": (lambda v: v >= 0, "0 or more random orders"),
    "rotations": (lambda v: v >= 0, "0 or more rotations per layer (0 = skip)"),
}


def check_options(args: argparse.Namespace) -> argparse.Namespace:
    """Refuse a numeric option outside its range before any work starts (a negative --per-class would slice the
    validation set from its end, a zero one take every image), in one line that says what to pass."""
    for name, (valid, expected) in OPTION_RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):  # NaN fails every comparison, so is refused too
            shown = f"{value:g}" if isinstance(value, float) else value
            raise UserError(f"--{name.replace('_', '-')} {shown} is out of range: pass {expected}")
    return args


def resolve_device(name: str | None) -> torch.device:
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no GPU here: use --device cpu")
    if name not in ("cpu",) and not name.startswith("cuda"):
        raise UserError(f"unknown device '{name}': use cpu or cuda")
    return torch.device(name)


def use_float32_everywhere() -> None:
    """The store says float32: keep cuDNN and cuBLAS from silently using TF32 (10-bit mantissa) on Ampere+ GPUs."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def store_path(args, run_name: str) -> Path:
    if args.store and str(args.store).endswith(".h5"):
        return Path(args.store).resolve()
    directory = paths.store_dir(args.store, args.data_dir)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create store directory {directory} ({error.strerror}): pass a writable --store")
    return directory / f"{run_name}.h5"


def load_data(spec, args, data_dir: Path):
    from compute.data.validation import load_validation

    kind = args.dataset or spec.dataset
    path = args.data
    if path is None and kind == "synthscenes":
        from compute.data import synthscenes

        path = synthscenes.ensure(data_dir)
    elif path is None:
        raise UserError(f"{spec.name} needs its validation set: pass --data PATH (see README, 'Running on the "
                        f"paper's models')")
    return load_validation(kind, Path(path), spec.preprocess, per_class=args.per_class, num_classes=spec.num_classes)


def concept_root(spec, args, data_dir: Path, val) -> Path | None:
    if args.concepts:
        root = Path(args.concepts)
        if not (root / "index.csv").exists():
            raise UserError(f"no Broden index.csv in {root}: pass --concepts pointing at an unzipped broden1_224")
        return root
    if val.kind == "synthscenes":  # SynthScenes carries its own concept masks in the Broden layout
        root = Path(val.root)
        return root if (root / "index.csv").exists() else root.parent
    default = data_dir / "datasets" / "broden1_224"
    return default if (default / "index.csv").exists() else None


def load_or_train(spec, weights, data_dir: Path, seed: int):
    """The model's weights; a demo model without a checkpoint is trained first (the loader itself never trains)."""
    try:
        return spec.load(weights, data_dir, seed=seed)
    except MissingWeights as missing:
        from compute.train import train_demo

        train_demo(missing.model, seed=missing.seed, data_dir=data_dir)
        return spec.load(weights, data_dir, seed=seed)


def run_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def setup_stage(ctx, val) -> None:
    with ctx.writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(val.class_names, dtype=object))
        write_array(h5, "images/labels", np.asarray(val.labels, np.int64))
        write_array(h5, "images/files", np.array(val.files, dtype=object))


def main(argv=None) -> int:
    from compute import activations, live
    from compute.context import RunContext
    from compute.imagecache import ImageCache, default_workers

    args = parse_args(argv)
    spec = get_spec(args.model)
    layers = spec.check_layers(args.layers)
    live_layers = spec.check_layers(args.live_layers) if args.live_layers else [layers[-1]]
    if args.live_layers is not None and len(args.live_layers) == 0:
        live_layers = []
    device = resolve_device(args.device)
    use_float32_everywhere()
    dist = distributed.from_environment(device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    data_dir = paths.data_dir(args.data_dir)
    run_name = args.name or (spec.name if args.seed == 0 else f"{spec.name}-seed{args.seed}")
    path = store_path(args, run_name)
    started = time.time()

    model, weights = load_or_train(spec, args.weights, data_dir, args.seed)
    val = load_data(spec, args, data_dir)
    if len(val.class_names) != spec.num_classes:
        raise UserError(f"the validation set has {len(val.class_names)} classes but {spec.name} predicts "
                        f"{spec.num_classes}: point --data at the right data set")
    concepts = concept_root(spec, args, data_dir, val)
    settings = {name: value for name, value in vars(args).items()
                if name not in ("store", "device", "force", "data_dir", "name", "batch_size", "max_memory")}
    settings.update(layers=layers, live_layers=live_layers)
    key = run_key({"model": spec.name, "weights": weights["weights_sha256"], "data": val.fingerprint,
                   "settings": settings})
    if path.exists() and not args.force:
        from store import StoreReader

        try:
            if StoreReader(path).attrs.get("run_key") == key:
                print(f"{path} is up to date (use --force to recompute)")
                return 0
        except StoreError:
            pass  # a damaged or old store is simply recomputed
    provenance = {
        "model": spec.name, "arch": spec.arch, "run_name": run_name, "description": spec.description,
        "weights_path": weights["weights_path"], "weights_sha256": weights["weights_sha256"],
        "data_kind": spec.dataset, "data_path": str(val.root), "data_fingerprint": val.fingerprint,
        "num_images": len(val.labels), "num_classes": len(val.class_names),
        "concepts_path": str(concepts) if concepts else "",
        "config": settings, "code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device), "precision": "float32", "torch_version": torch.__version__,
        "ablation_note": spec.ablation_note, "layer_order": list(spec.layers), "seed": args.seed,
    }
    writer = open_writer(path, key, provenance, dist)
    workers = default_workers() if device.type == "cuda" else 0
    images = ImageCache(val.dataset, spec.preprocess, data_dir / "cache" / f"{val.fingerprint[:16]}-{spec.preprocess.crop}.u8",
                        workers=workers)
    ctx = RunContext(spec=spec, model=model, images=images, class_names=list(val.class_names), layers=layers,
                     device=device, writer=writer, config=settings, data_dir=data_dir,
                     batch_size=args.batch_size or (128 if device.type == "cuda" else 64),
                     max_memory=int(args.max_memory * (1 << 30)), extra={"concepts": concepts, "args": args},
                     dist=dist)
    if writer.completed_stages() and dist.is_main:
        print(f"resuming {path.name}: {len(writer.completed_stages())} stages already done")
    plan = [("setup", lambda: setup_stage(ctx, val)), ("activations", lambda: activations.run_stage(ctx))]
    for layer in layers:
        for name, stage in LAYER_STAGES:
            plan.append((f"{name}/{layer}", lambda stage=stage, layer=layer: stage(ctx, layer)))
    for layer in live_layers:
        plan.append((f"live/{layer}", lambda layer=layer: live.run_stage(ctx, layer)))
    running = {"stage": "setup"}
    if dist.active:
        distributed.say_when_stopped(lambda: f"during stage {running['stage']}; finished shards are kept in {writer.parts}")
    for name, stage in plan:
        # Other ranks take part only in the sharded stages; rank 0 runs the rest alone.
        if writer.done(name) or not (dist.is_main or name.split("/")[0] in SHARDED_STAGES):
            continue
        running["stage"] = name
        try:
            stage()
        except StageSkipped as skipped:
            if dist.is_main:
                print(f"skipped {name}: {skipped}", file=sys.stderr)
        except Exception as error:
            if no_space_left(error):  # the stage's part is discarded; the finished ones are kept for the rerun
                writer.close()
                raise disk_full(error, name, writer.parts) from None
            if dist.active:  # torchrun stops the other ranks; say what to do before its own report
                print(f"rank {dist.rank} failed in stage {name}: {type(error).__name__}: {error}. Finished shards "
                      f"are kept in {writer.parts}: rerun the same command to resume.", file=sys.stderr)
            raise
    if not dist.is_main:
        writer.close()
        return 0
    try:
        writer.commit()
    except Exception as error:
        if no_space_left(error):  # the half-assembled store is removed; the parts are kept for the rerun
            writer.close()
            raise disk_full(error, f"{path.name} (assembling the finished stages)", path) from None
        raise
    print(f"wrote {path} in {time.time() - started:.0f} s")
    return 0


def open_writer(path: Path, key: str, provenance: dict, dist) -> StoreWriter:
    """Rank 0 opens (and, for a new run, clears) the run's parts first; the other ranks join after it."""
    writer = None
    try:
        if dist.is_main:
            writer = StoreWriter(path, key, provenance)
        dist.barrier()
        if not dist.is_main:
            writer = StoreWriter(path, key, provenance, shard_rank=dist.rank)
    except StoreError as error:
        raise UserError(str(error)) from None
    return writer


def _layer_stages():
    """Per-layer stages in run order; later ones read what earlier ones wrote (writer.read_part)."""
    from compute import attributes, dissection, greedy, relations, rotation, single_unit, topimages

    return [
        ("ablation", single_unit.run_stage),
        ("attributes", attributes.run_stage),
        ("dissection", dissection.run_stage),
        ("topimages", topimages.run_stage),
        ("relations", relations.run_stage),
        ("greedy", greedy.run_stage),
        ("rotation", rotation.run_stage),
    ]


def _analysis_options(parser: argparse.ArgumentParser) -> None:
    from compute.dissection import UNION_RULES

    group = parser.add_argument_group("analyses")
    group.add_argument("--top-k", type=int, default=10, help="top activating images kept per unit")
    group.add_argument("--quantile", type=float, default=0.005, help="dissection: top activation quantile")
    group.add_argument("--iou-threshold", type=float, default=0.04, help="dissection: IoU to call a detector")
    group.add_argument("--union-rule", choices=UNION_RULES, default=UNION_RULES[0],
                       help="dissection: where a unit's active area joins a category's union: on images carrying a "
                            "label of the category (image) or where it touches one, as NetDissect-Lite (pixel)")
    group.add_argument("--greedy-steps", type=int, default=20, help="greedy ablation: units per class (0 = skip)")
    group.add_argument("--greedy-classes", nargs="*", default=None,
                       help="greedy ablation: class names or indices (default: all classes)")
    group.add_argument("--greedy-layers", nargs="*", default=None,
                       help="greedy ablation: layers (default: the deepest chosen layer)")
    group.add_argument("--random-orders", type=int, default=10, help="greedy ablation: random-order seeds")
    group.add_argument("--rotations", type=int, default=1, help="random rotations (seeds) per layer (0 = skip)")
    group.add_argument("--keep-flip-thumbs", action="store_true",
                       help="keep 64 px thumbnails of every image an ablation flips in the store "
                            "(layers/<L>/{ablation,greedy}/flips/thumbs), so the app shows them without the images")
    group.add_argument("--rotation-layers", nargs="*", default=None,
                       help="random rotations: layers (default: the deepest chosen layer)")


LAYER_STAGES = _layer_stages()
# Stages whose work is shared out between torchrun ranks (compute.context.RunContext.run_sharded).
SHARDED_STAGES = {"activations", "ablation", "dissection", "greedy", "rotation"}
EXTRA_OPTIONS: list = [_analysis_options]

if __name__ == "__main__":
    raise SystemExit(run_cli(main))
