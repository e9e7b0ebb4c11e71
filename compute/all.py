"""Run the whole offline pipeline for one model into one store: ``python -m compute.all --model demo``.

The stages and what each depends on are declared in compute.run.pipeline. A run goes: 1. check every option; 2. load the
validation set, the concept set and the model; 3. key every stage and see which ones a finished part or the existing
store already holds (``--plan`` prints this and stops); 4. take those over, compute the rest (each resumable: a killed
run restarts at the first unfinished stage); 5. assemble the new store version, renamed over the old one only when
every stage is done.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

from compute.run import distributed, peak
from compute import paths
from compute.errors import MissingWeights, StageSkipped, UserError, disk_full, no_space_left, run_cli
from compute.models import get_spec, model_names
from store import StoreError, StoreWriter

CODE_VERSION_FALLBACK = "unknown"


def code_version() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or CODE_VERSION_FALLBACK
    except (OSError, subprocess.SubprocessError):
        return CODE_VERSION_FALLBACK


def parse_args(argv=None) -> argparse.Namespace:
    from compute.run import pipeline
    from compute.run.options import RunOptions, add_group

    parser = argparse.ArgumentParser(
        prog="python -m compute.all", description=__doc__.splitlines()[0],
        epilog="models: " + ", ".join(f"{name}" for name in model_names()))
    parser.add_argument("--model", default="demo", help="model name (see below)")
    parser.add_argument("--layers", nargs="+", default=None, help="layers to analyse (default: the model's)")
    parser.add_argument("--weights", default=None, help="checkpoint file (default: looked up for the model)")
    parser.add_argument("--seed", type=int, default=0, help="instance seed of a demo model (trained if missing)")
    parser.add_argument("--image-size", type=int, default=None, help="input crop of a torchvision:/python: model")
    parser.add_argument("--mean", type=float, nargs=3, default=None, help="normalisation mean of such a model")
    parser.add_argument("--std", type=float, nargs=3, default=None, help="normalisation std of such a model")
    parser.add_argument("--data", default=None, help="validation set folder (default: the model's data set)")
    parser.add_argument("--dataset", default=None, choices=("synthscenes", "places365", "imagenet", "imagefolder"),
                        help="layout of --data (default: the model's; imagefolder = any <class>/<image> folder)")
    parser.add_argument("--concepts", default=None, help="Broden-layout concept data set for dissection")
    parser.add_argument("--per-class", type=int, default=None, help="use the first N validation images per class")
    parser.add_argument("--data-dir", default=None, help=f"data directory (default ${paths.DATA_ENV} or ./data)")
    parser.add_argument("--store", default=None, help="store file (.h5) or directory (default <data>/stores)")
    parser.add_argument("--name", default=None, help="run name, the store's file name (default model[-seedN])")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--force", action="store_true", help="recompute every stage, even those the store holds")
    parser.add_argument("--plan", action="store_true",
                        help="print each stage and whether it would be reused or recomputed (and why), then exit")
    add_group(parser, RunOptions, "resources")
    for options in pipeline.option_types(pipeline.stages()):
        add_group(parser, options, options.__name__.removesuffix("Options").lower())
    args = parser.parse_args(argv)
    check_options(args)  # a value out of range is refused here, before anything is loaded
    return args


# Numeric options outside the stage tables: the values that make sense, and what to pass instead.
OPTION_RANGES = {
    "seed": (lambda v: v >= 0, "a seed of 0 or more"),
    "per_class": (lambda v: v >= 1, "at least 1 image per class (leave it out to use every image)"),
    "image_size": (lambda v: v >= 8, "an input size of at least 8 pixels"),
}


def check_options(args: argparse.Namespace) -> dict:
    """Every option checked before any work starts (a negative --per-class would slice the validation set from its
    end, a zero one take every image), in one line that says what to pass; the stages' option dataclasses back."""
    from compute.run import pipeline
    from compute.run.options import RunOptions, from_args

    for name, (valid, expected) in OPTION_RANGES.items():
        value = getattr(args, name, None)
        if value is not None and not valid(value):
            raise UserError(f"--{name.replace('_', '-')} {value} is out of range: pass {expected}")
    try:
        return {kind: from_args(kind, args) for kind in [RunOptions, *pipeline.option_types(pipeline.stages())]}
    except ValueError as error:
        raise UserError(str(error)) from None


def check_layer_choices(options: dict, spec) -> None:
    """--greedy-layers, --rotation-layers and --live-layers name layers of the model (those not chosen with --layers
    are left out of the run)."""
    from compute.run.options import GreedyOptions, LiveOptions, RotationOptions

    for kind, field in ((GreedyOptions, "greedy_layers"), (RotationOptions, "rotation_layers"),
                        (LiveOptions, "live_layers")):
        for layer in getattr(options[kind], field) or ():
            if layer not in spec.layers:
                raise UserError(f"--{field.replace('_', '-')} {layer}: {spec.name} has no such layer; choose from "
                                f"{', '.join(spec.layers)}")


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


def model_spec(args):
    """The model's spec; preprocessing options go to specs that take them (torchvision:/python: models)."""
    given = {name: getattr(args, name) for name in ("image_size", "mean", "std") if getattr(args, name) is not None}
    return get_spec(args.model, weights=args.weights, **given)  # the checkpoint gives a generic model's classes


def run_inputs(spec, weights: dict, val, concepts) -> dict:
    """What stages' results depend on besides their options: the keys' inputs (compute.run.pipeline)."""
    from compute.data.broden import fingerprint

    preprocess = spec.preprocess
    return {"model": {"name": spec.name, "crop": preprocess.crop, "resize": preprocess.resize,
                      "mean": list(preprocess.mean), "std": list(preprocess.std)},
            "weights": weights["weights_sha256"], "data": val.fingerprint,
            "concepts": fingerprint(concepts) if concepts else None}


def previous_records(path: Path) -> dict:
    """The finished store's record of each stage (empty if there is none or it cannot be read)."""
    import h5py

    from store.writer import stage_record

    if not path.exists():
        return {}
    try:
        with h5py.File(path, "r", locking=False) as store:
            return {name: stage_record(store, name) for name in (store["stages"].attrs if "stages" in store else [])}
    except (OSError, KeyError, ValueError):
        return {}


def decide(steps, parts_done, previous: dict, force: bool) -> dict:
    """Per step: ("part" | "store" | "compute", why)."""
    from compute.run.pipeline import why_recomputed

    decisions, recomputed = {}, set()
    for step in steps:
        old = previous.get(step.name)
        if force:
            decisions[step.name] = ("compute", "--force")
        elif step.name in parts_done:
            decisions[step.name] = ("part", "finished part of an interrupted run")
        elif old is not None and old.get("key") == step.key:
            decisions[step.name] = ("store", "unchanged")
        else:
            decisions[step.name] = ("compute", why_recomputed(step, old, recomputed))
        if decisions[step.name][0] == "compute":
            recomputed.add(step.name)
    return decisions


def print_plan(path: Path, steps, decisions: dict) -> None:
    width = max(len(step.name) for step in steps)
    verbs = {"part": "reuse", "store": "reuse", "compute": "compute"}
    print(f"plan for {path}:")
    for step in steps:
        how, why = decisions[step.name]
        print(f"  {verbs[how]:8s} {step.name:{width}s}  {why}")
    count = sum(how == "compute" for how, _ in decisions.values())
    print(f"{count} of {len(steps)} stages to compute")


def main(argv=None) -> int:
    from compute.run import pipeline
    from compute.run.context import RunContext
    from compute.lib.greedy import resolve_classes
    from compute.run.imagecache import ImageCache, default_workers
    from compute.run.options import GreedyOptions, RunOptions

    # 1. Every option, before any work.
    args = parse_args(argv)
    options = check_options(args)
    spec = model_spec(args)
    layers = spec.check_layers(args.layers)
    check_layer_choices(options, spec)
    device = resolve_device(args.device)
    use_float32_everywhere()
    dist = distributed.from_environment(device)
    if dist.active and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank)
        torch.cuda.set_device(device)
    data_dir = paths.data_dir(args.data_dir)
    base_name = spec.extra.get("run_name", spec.name)  # a python:path/x.py:f model's name is no file name
    run_name = args.name or (base_name if args.seed == 0 else f"{base_name}-seed{args.seed}")
    path = store_path(args, run_name)
    started = time.time()

    # 2. The data first (a wrong class name fails before a model is trained), then the model.
    val = load_data(spec, args, data_dir)
    if len(val.class_names) != spec.num_classes:
        raise UserError(f"the validation set has {len(val.class_names)} classes but {spec.name} predicts "
                        f"{spec.num_classes}: point --data at the right data set")
    resolve_classes(options[GreedyOptions].greedy_classes, list(val.class_names))
    concepts = concept_root(spec, args, data_dir, val)
    model, weights = load_or_train(spec, args.weights, data_dir, args.seed)

    # 3. Key every stage; see what the parts folder and the finished store already hold.
    table = pipeline.stages()
    steps = pipeline.plan(table, layers, options, run_inputs(spec, weights, val, concepts))
    key = pipeline.digest([step.key for step in steps])
    previous = previous_records(path)
    parts = StoreWriter.parts_of(path)
    parts_done = {step.name for step in steps if StoreWriter.part_matches(parts, step.name, step.key)}
    decisions = decide(steps, parts_done, previous, args.force)
    if args.plan:
        print_plan(path, steps, decisions)
        return 0
    if set(previous) == {step.name for step in steps} and all(how == "store" for how, _ in decisions.values()):
        print(f"{path} is up to date (use --force to recompute)")
        return 0

    # 4. Take over unchanged stages, compute the others.
    run = options[RunOptions]
    settings = {"layers": layers, **{name: value for kind in options.values() for name, value in vars(kind).items()},
                **{name: getattr(args, name) for name in ("model", "weights", "seed", "data", "dataset", "concepts",
                                                          "per_class", "image_size", "mean", "std")}}
    provenance = {
        "model": spec.name, "arch": spec.arch, "run_name": run_name, "description": spec.description,
        "weights_path": weights["weights_path"], "weights_sha256": weights["weights_sha256"],
        "data_kind": val.kind, "data_path": str(val.root), "data_fingerprint": val.fingerprint,
        "num_images": len(val.labels), "num_classes": len(val.class_names),
        "concepts_path": str(concepts) if concepts else "",
        "config": settings, "code_version": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device), "precision": "float32", "torch_version": torch.__version__,
        "ablation_note": spec.ablation_note, "layer_order": list(spec.layers), "seed": args.seed,
    }
    writer = open_writer(path, key, provenance, dist, {step.name: step.record for step in steps})
    workers = default_workers() if device.type == "cuda" else 0
    images = ImageCache(val.dataset, spec.preprocess, data_dir / "cache" / f"{val.fingerprint[:16]}-{spec.preprocess.crop}.u8",
                        workers=workers)
    ctx = RunContext(spec=spec, model=model, images=images, class_names=list(val.class_names), layers=layers,
                     device=device, writer=writer, config=settings, data_dir=data_dir,
                     batch_size=run.batch_size or (128 if device.type == "cuda" else 64),
                     max_memory=int(run.max_memory * (1 << 30)), options=options, concepts=concepts,
                     files=list(val.files), sharded=frozenset(s.section for s in table if s.sharded), dist=dist)
    if dist.is_main:
        taken = [step.name for step in steps if decisions[step.name][0] == "store" and writer.reuse(step.name, path)]
        if taken:
            print(f"{path.name}: reusing {len(taken)} unchanged stages of the existing store")
        if parts_done:
            print(f"resuming {path.name}: {len(parts_done)} stages already done")
    dist.barrier()
    run_steps(ctx, writer, steps, dist)

    # 5. Assemble the new version of the store.
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


# Stages that stream a layer's activations on every validation image again after the passes before them.
KEPT_FOR = ("greedy", "rotation", "live")


def run_steps(ctx, writer, steps, dist) -> None:
    """Compute every step not done yet; a joint stage computes all its due layers in one call."""
    running = {"stage": "setup"}
    ctx.keep = frozenset(step.layer for step in steps if step.stage.section in KEPT_FOR and not writer.done(step.name))
    if dist.active:
        distributed.say_when_stopped(lambda: f"during stage {running['stage']}; finished shards are kept in {writer.parts}")
    for step in steps:
        # Other ranks take part only in the sharded stages; rank 0 runs the rest alone.
        if writer.done(step.name) or not (dist.is_main or step.stage.sharded):
            continue
        running["stage"] = step.name
        if step.stage.joint:
            due = [s.layer for s in steps if s.stage is step.stage and not writer.done(s.name)]
            call = lambda step=step, due=due: step.stage.run(ctx, due)  # noqa: E731
        elif step.layer is None:
            call = lambda step=step: step.stage.run(ctx)  # noqa: E731
        else:
            call = lambda step=step: step.stage.run(ctx, step.layer)  # noqa: E731
        begun = time.perf_counter()
        peak.reset(ctx.device)
        try:
            call()
            took, used = time.perf_counter() - begun, peak.read(ctx.device)
            names = [f"{step.stage.section}/{layer}" for layer in due] if step.stage.joint else [step.name]
            for name in names:  # a joint stage's layers share one pass's time and memory
                shared = {"shared": [other for other in names if other != name]} if len(names) > 1 else {}
                writer.measured[name] = {"seconds": round(took, 2), **used, **shared}
            if dist.is_main:
                rise = used.get("host_mib", 0) - used.get("start_mib", used.get("host_mib", 0))
                print(f"{' + '.join(names)}: {took:.1f} s, peak {used.get('host_mib', 0):.0f} MiB "
                      f"({rise:+.0f} over its start)", file=sys.stderr)
        except StageSkipped as skipped:
            if dist.is_main:
                print(f"skipped {step.name}: {skipped}", file=sys.stderr)
                writer.skip(step.name, str(skipped))
        except Exception as error:
            if no_space_left(error):  # the stage's part is discarded; the finished ones are kept for the rerun
                writer.close()
                raise disk_full(error, step.name, writer.parts) from None
            if dist.active:  # torchrun stops the other ranks; say what to do before its own report
                print(f"rank {dist.rank} failed in stage {step.name}: {type(error).__name__}: {error}. Finished "
                      f"shards are kept in {writer.parts}: rerun the same command to resume.", file=sys.stderr)
            raise


def open_writer(path: Path, key: str, provenance: dict, dist, plan: dict) -> StoreWriter:
    """Rank 0 opens the run's parts first (dropping stale ones); the other ranks join after it."""
    writer = None
    try:
        if dist.is_main:
            writer = StoreWriter(path, key, provenance, plan=plan)
        dist.barrier()
        if not dist.is_main:
            writer = StoreWriter(path, key, provenance, shard_rank=dist.rank, plan=plan)
    except StoreError as error:
        raise UserError(str(error)) from None
    return writer


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
