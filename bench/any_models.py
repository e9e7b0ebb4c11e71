"""Any torchvision CNN through the fx split and the engine, against a naive forward-hook ablation, in one run.

    python bench/any_models.py [--device cpu|cuda] [--images N] [--image-size PX] [--naive-units N] [--repeats N]

Cases: resnet50 ``layer4`` (the tail is avgpool -> fc: the engine's rank-one logit update) and vgg16 ``features.28``
(its last conv; the tail ReLU -> max pool -> avgpool -> flatten -> Linear enters the engine's Linear shortcut), both
with random weights (``torchvision.models.get_model(..., weights=None)``) on random images. The naive way registers a
forward hook that zeroes one channel of the module's output and runs the whole model; it is timed on a sample of
units. The engine runs the prefix up to the layer once (``compute.models.graph`` split of the traced model), the
baseline, then every unit of the layer through ``AblationEngine.evaluate_units``, as the single-unit sweep does.

Printed per case: milliseconds per unit for each (the engine's time includes its prefix and baseline, shared by all
units), their ratio, and whether the engine's predictions equal the naive ones (``compute.lib.ties.predict``'s rule) for
every unit-image the naive side computed. ``measure`` returns the same numbers for bench/ablation.py.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compute.lib import ties  # noqa: E402
from compute.lib.engine import AblationEngine, single_unit_masks  # noqa: E402
from compute.models import get_spec  # noqa: E402
from compute.lib.sequence import run_to, tail_of  # noqa: E402

CASES = (("torchvision:resnet50", "layer4"), ("torchvision:vgg16", "features.28"))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fastest(fn, repeats: int, device: torch.device):
    """(result, seconds) of the fastest of ``repeats`` calls."""
    best, result = float("inf"), None
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        result = fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return result, best


@torch.no_grad()
def naive(model, layer: str, units, images) -> torch.Tensor:
    """Predictions [units, images] with each unit's channel of ``layer``'s output zeroed by a forward hook."""
    module = model.get_submodule(layer)
    rows = []
    for unit in units:
        def zero(_module, _args, out, unit=unit):
            out = out.clone()
            out[:, unit] = 0
            return out

        handle = module.register_forward_hook(zero)
        try:
            rows.append(ties.predict(model, images))
        finally:
            handle.remove()
    return torch.stack(rows)


@torch.no_grad()
def engine_sweep(spec, model, layer: str, images, labels, max_memory: int) -> torch.Tensor:
    """Predictions [units, images] for every unit of ``layer``: prefix once, then the engine over the tail."""
    sequence = spec.to_sequence(model)
    step = spec.layers[layer]
    acts = run_to(sequence, images, [step])[step]
    engine = AblationEngine(tail_of(sequence, step), max_memory=max_memory)
    base = engine.baseline(acts, labels)
    return engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1], images.device), base).pred


def measure(name: str, layer: str, images: int = 8, image_size: int = 224, naive_units: int = 8, repeats: int = 2,
            device: str = "cpu", max_memory: int = 1 << 30, seed: int = 0) -> dict:
    """Engine and naive times per unit for one case, their ratio and agreement (a dict, for printing or tables)."""
    device = torch.device(device)
    torch.manual_seed(seed)
    spec = get_spec(name, image_size=image_size)
    model = spec.build(1000).eval().to(device)
    batch = torch.randn(images, 3, image_size, image_size, device=device)
    labels = torch.zeros(images, dtype=torch.long, device=device)
    engine_pred, engine_time = _fastest(lambda: engine_sweep(spec, model, layer, batch, labels, max_memory),
                                        repeats, device)
    units = engine_pred.shape[0]
    sample = torch.linspace(0, units - 1, naive_units).round().long().unique().tolist()
    naive_pred, naive_time = _fastest(lambda: naive(model, layer, sample, batch), repeats, device)
    engine_ms, naive_ms = 1e3 * engine_time / units, 1e3 * naive_time / len(sample)
    return {"model": name, "layer": layer, "units": units, "images": images, "image_size": image_size,
            "engine_ms_per_unit": engine_ms, "naive_ms_per_unit": naive_ms, "ratio": naive_ms / engine_ms,
            "agree": bool(torch.equal(engine_pred[sample], naive_pred)), "naive_units": len(sample),
            "shortcut": AblationEngine(tail_of(spec.to_sequence(model), spec.layers[layer])).has_shortcut}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--naive-units", type=int, default=8, help="units the naive side ablates (timed per unit)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, fastest kept")
    args = parser.parse_args(argv)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 on both sides, as compute.all runs
    torch.backends.cudnn.allow_tf32 = False
    print(f"{args.images} random images at {args.image_size} px, random weights, {args.device}, "
          f"{torch.get_num_threads()} threads")
    rows = [measure(name, layer, args.images, args.image_size, args.naive_units, args.repeats, args.device)
            for name, layer in CASES]
    print_table(rows)
    return 0 if all(row["agree"] for row in rows) else 1


def print_table(rows: list[dict]) -> None:
    print(f"{'case':34s} {'units':>5s} {'engine ms/unit':>14s} {'naive ms/unit':>13s} {'ratio':>7s}  agree  shortcut")
    for row in rows:
        print(f"{row['model'].split(':')[1] + ' ' + row['layer']:34s} {row['units']:5d} "
              f"{row['engine_ms_per_unit']:14.2f} {row['naive_ms_per_unit']:13.1f} {row['ratio']:7.0f}  "
              f"{str(row['agree']):5s}  {row['shortcut']}")


if __name__ == "__main__":
    raise SystemExit(main())
