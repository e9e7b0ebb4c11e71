"""Ablation engine against the naive way, in one run on one machine: unit-image evaluations per second.

    python bench/ablation.py [--device cpu|cuda] [--quick] [--images N] [--repeats N] [--max-memory GiB] [--threads N]
                             [--only TEXT ...]

The naive way removes one unit (its channel set to zero after the nonlinearity, which for conv + ReLU equals zeroing
the conv's weight and bias) and runs the whole network over the images; it is timed on a sample of units and counted
per unit-image. The engine runs the prefix once per image, the baseline, then every ablation of the sample of units
through the tail (``AblationEngine.evaluate_units`` with ``probabilities=False``: a sweep needs predictions only, so
rows certified unchanged skip the tail), as the single-unit sweep does batch by batch. Models are randomly initialised
(``random_model``), AlexNet and ResNet18 at 224x224, the demo CNN at 64x64; and the trained demo
(``python -m compute.train``, weights under the data directory) on SynthScenes validation images rendered here.

Printed per case: unit-image evaluations per second for both and their ratio, end to end (the engine's time includes
the prefix, which caps the ratio near the number of units: ResNet18 layer4 has 512) and for the tail alone; the
end-to-end ratio of the engine without certificates (``probabilities=True``, the engine before certified skipping),
timed in the same run; the shares of rows the engine computed and certified (the rest were skipped as unchanged);
the arithmetic rate (FLOPs counted by ``torch.utils.flop_counter``) as a fraction of the machine's fp32 peak, measured
with a large matmul in the same run; the peak memory of each side (on the CPU the rise of the process's peak resident
set, reset before each side; on a GPU ``torch.cuda.max_memory_allocated``); and whether the engine's predictions
equal the naive ones for every unit-image the naive side computed (and, every unit, the engine's without
certificates). On a GPU it also estimates the full AlexNet-Places365 conv5 sweep (256 units x 36,500 images).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from compute.lib import ties  # noqa: E402
from compute.run import peak  # noqa: E402
from compute.lib.engine import AblationEngine, single_unit_masks  # noqa: E402
from compute.models import get_spec  # noqa: E402
from compute.lib.sequence import run_to, step_names, tail_of  # noqa: E402
from bench import any_models  # noqa: E402

PLACES_VAL_IMAGES = 36_500


@dataclass(frozen=True)
class Case:
    model: str
    layer: str
    engine_units: int | None  # units the engine sweeps (None: every unit)
    naive_units: int
    trained: bool = False  # the trained demo on SynthScenes images, instead of random weights and images
    images_factor: int = 1  # images of this case per --images (the demo is small: more images, steadier times)


TRAINED = "demo (trained)"
CASES = (
    Case("demo", "conv5", None, 4),
    Case("demo", "conv3", None, 4, trained=True, images_factor=8),
    Case("demo", "conv4", None, 4, trained=True, images_factor=8),
    Case("demo", "conv5", None, 4, trained=True, images_factor=8),
    Case("alexnet-places", "conv3", 32, 2),
    Case("alexnet-places", "conv5", None, 2),
    Case("resnet18-places", "layer3", 16, 2),
    Case("resnet18-places", "layer4", None, 2),
)


# -- random models, shared with tests/test_engine_models.py -----------------------------------------------------------
def random_images(spec, count: int, seed: int, device="cpu") -> torch.Tensor:
    """Standard-normal images at the model's input size (the scale of normalised photographs)."""
    generator = torch.Generator().manual_seed(seed)
    size = spec.preprocess.crop
    return torch.randn(count, 3, size, size, generator=generator).to(device)


@torch.no_grad()
def random_model(name: str, seed: int = 0, calibration: int = 8):
    """(spec, model, step sequence) of a model of the registry with random He-scaled weights, in eval mode.

    Convolutions and linear layers get He-normal weights (activations keep their scale through the ReLUs) and small
    random biases; batch norm keeps its identity statistics. The classifier's bias is then shifted so that every
    class's mean logit over ``calibration`` random images is zero: otherwise the features' shared positive mean decides
    the class (a random ResNet18 gives every image the same one), and no single ablation flips a prediction.
    """
    torch.manual_seed(seed)
    spec = get_spec(name)
    model = spec.build(spec.num_classes)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
            if module.bias is not None:
                module.bias.uniform_(-0.05, 0.05)
    sequence = spec.to_sequence(model).eval()
    classifier = [m for m in sequence.modules() if isinstance(m, nn.Linear)][-1]
    classifier.bias -= sequence(random_images(spec, calibration, seed + 1)).mean(0)
    return spec, model.eval(), sequence


def trained_demo():
    """(spec, model, step sequence) of the trained demo, or None when its weights are not there."""
    from compute.errors import MissingWeights
    from compute.paths import data_dir

    spec = get_spec("demo")
    try:
        model, _ = spec.load(None, data_dir())
    except MissingWeights:
        return None
    return spec, model, spec.to_sequence(model).eval()


def synthscenes_images(spec, count: int, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` SynthScenes validation images (seed 0, classes in turn) normalised as the demo expects, and their
    classes: rendered, so no data set needs to be on disk."""
    from compute.data import synthscenes

    classes = len(synthscenes.CLASSES)
    pixels = [synthscenes.render(0, "val", i % classes, i // classes).rgb for i in range(count)]
    images = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (spec.preprocess.mean, spec.preprocess.std))
    labels = torch.arange(count) % classes
    return ((images - mean) / std).to(device), labels.to(device)


@torch.no_grad()
def naive_predictions(sequence: nn.Sequential, step: str, unit: int, images: torch.Tensor) -> torch.Tensor:
    """The definition: the whole network on the images, with channel ``unit`` of step ``step``'s output zeroed
    (predictions under ``compute.lib.ties``' rule, as the engine's)."""
    x = run_to(sequence, images, [step])[step].clone()
    x[:, unit] = 0
    return ties.predict(tail_of(sequence, step), x)


# -- measuring ----------------------------------------------------------------------------------------------------
@contextmanager
def peak_memory(device: torch.device, result: dict):
    """Peak bytes above the starting level while the block runs, as the pipeline's stages measure it
    (``compute.run.peak``): the resident set on the CPU (Linux), torch's allocation on a GPU."""
    _sync(device)
    peak.reset(device)
    yield
    _sync(device)
    used = peak.read(device)
    top, start = ("device_mib", "device_start_mib") if device.type == "cuda" else ("host_mib", "start_mib")
    result["bytes"] = int((used.get(top, 0.0) - used.get(start, 0.0)) * 2**20)


def _timed(fn, device: torch.device):
    _sync(device)
    start = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - start, value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device, repeats: int):
    """(seconds, FLOPs, peak bytes, value) of ``fn``: the fastest of ``repeats`` timed calls (the machine is shared,
    so the fastest is the least disturbed), the FLOPs of one call, the peak memory over the timed calls.

    On a GPU a first call, under the FLOP counter, warms up and is not timed. On the CPU the first call is counted and
    timed: the counter adds microseconds per operation, nothing next to products that take seconds.
    """
    counter = FlopCounterMode(display=False)
    memory: dict = {}
    times = []
    with peak_memory(device, memory):
        with counter:
            seconds, value = _timed(fn, device)
        if device.type == "cpu":
            times.append(seconds)
        while len(times) < repeats:
            times.append(_timed(fn, device)[0])
    return min(times), counter.get_total_flops(), memory["bytes"], value


def fp32_peak(device: torch.device, quick: bool) -> float:
    """FLOP/s of a large fp32 matmul: the arithmetic peak the achieved rates are compared to."""
    n = 2048 if quick else (8192 if device.type == "cuda" else 4096)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best = float("inf")
    for _ in range(2 if quick else 4):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * n ** 3 / best


def spread(total: int, count: int | None) -> torch.Tensor:
    """``count`` units spread evenly over ``total`` (all of them for None)."""
    if count is None or count >= total:
        return torch.arange(total)
    return torch.linspace(0, total - 1, count).round().long()


# -- one case ------------------------------------------------------------------------------------------------------
@torch.no_grad()
def run_case(case: Case, images_count: int, device: torch.device, quick: bool, repeats: int, max_memory: int,
             models: dict) -> dict:
    """Time both sides of one case; ``models`` caches the models between cases."""
    key = TRAINED if case.trained else case.model
    if key not in models:
        models[key] = trained_demo() if case.trained else random_model(case.model)
    spec, _, sequence = models[key]
    sequence = sequence.to(device)
    step = spec.layers[case.layer]
    images_count *= case.images_factor
    if case.trained:
        images, labels = synthscenes_images(spec, images_count, device)
    else:
        images = random_images(spec, images_count, seed=7, device=device)
        labels = torch.zeros(images_count, dtype=torch.long, device=device)
    prefix = nn.Sequential(*list(sequence.children())[: step_names(sequence).index(step) + 1])
    engine = AblationEngine(tail_of(sequence, step), max_memory=max_memory)
    engine32 = AblationEngine(tail_of(sequence, step), max_memory=max_memory, reduced_precision=False)
    channels = run_to(sequence, images[:1], [step])[step].shape[1]
    sample = None if device.type == "cuda" else case.engine_units  # a GPU sweeps every unit
    units = spread(channels, 8 if quick else sample)
    naive_units = units[spread(len(units), 1 if quick else case.naive_units)]
    masks = single_unit_masks(channels, device)[units.to(device)]

    phases = []  # (prefix, tail) seconds of each engine call

    def engine_sweep(probabilities=False, engine=engine):
        prefix_seconds, acts = _timed(lambda: prefix(images), device)
        tail_seconds, outcome = _timed(lambda: engine.evaluate_units(
            acts, labels, masks, engine.baseline(acts, labels), probabilities=probabilities), device)
        phases.append((prefix_seconds, tail_seconds))
        return outcome.pred

    def naive_sweep():
        return torch.stack([naive_predictions(sequence, step, int(u), images) for u in naive_units])

    e_seconds, e_flops, e_bytes, engine_pred = measure(engine_sweep, device, repeats)
    computed, certified, reduced = engine.rows_computed, engine.rows_certified, engine.rows_reduced
    tail_seconds = min(seconds for _, seconds in phases[-repeats:])  # the timed calls' phases
    prefix_seconds = min(seconds for seconds, _ in phases[-repeats:])
    u_seconds, _, _, uncertified_pred = measure(lambda: engine_sweep(probabilities=True), device, repeats)
    f_seconds, _, _, float32_pred = measure(lambda: engine_sweep(engine=engine32), device, repeats)
    n_seconds, n_flops, n_bytes, naive_pred = measure(naive_sweep, device, repeats)
    position = {int(u): i for i, u in enumerate(units)}
    agree = (torch.equal(engine_pred[[position[int(u)] for u in naive_units]], naive_pred)
             and torch.equal(engine_pred, uncertified_pred) and torch.equal(engine_pred, float32_pred))
    e_evals, n_evals = len(units) * images_count, len(naive_units) * images_count
    return {
        "case": f"{key} {case.layer}", "units": len(units), "images": images_count,
        "naive_rate": n_evals / n_seconds, "engine_rate": e_evals / e_seconds,
        "uncertified_rate": e_evals / u_seconds, "float32_rate": e_evals / f_seconds,
        "ablation_rate": e_evals / tail_seconds,
        "prefix_rate": images_count / prefix_seconds, "computed": computed / e_evals,
        "certified": certified / e_evals, "reduced": reduced / e_evals, "naive_flops": n_flops / n_seconds,
        "engine_flops": e_flops / e_seconds, "naive_bytes": n_bytes, "engine_bytes": e_bytes, "agree": agree,
    }


# -- report -------------------------------------------------------------------------------------------------------
def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor())
    return (f"{os.cpu_count()} CPUs ({model}), torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"load average {os.getloadavg()[0]:.1f}")


def print_table(results: list[dict], peak: float) -> None:
    print(f"{'case':<23} {'units x images':>14} {'naive u-i/s':>11} {'engine u-i/s':>12} {'ratio':>7} "
          f"{'tail-only u-i/s':>15} {'ratio':>7} {'no-cert ratio':>13} {'fp32 ratio':>10} {'computed':>8} {'bf16':>5} "
          f"{'certified':>9} "
          f"{'naive %peak':>11} {'engine %peak':>12} {'naive MiB':>9} {'engine MiB':>10} agree")
    for r in results:
        print(f"{r['case']:<23} {r['units']:>6} x {r['images']:<5} {r['naive_rate']:>11.1f} {r['engine_rate']:>12.1f} "
              f"{r['engine_rate'] / r['naive_rate']:>6.1f}x {r['ablation_rate']:>15.1f} "
              f"{r['ablation_rate'] / r['naive_rate']:>6.0f}x {r['uncertified_rate'] / r['naive_rate']:>12.1f}x "
              f"{r['float32_rate'] / r['naive_rate']:>9.1f}x {r['computed']:>8.0%} {r['reduced']:>5.0%} "
              f"{r['certified']:>9.0%} "
              f"{r['naive_flops'] / peak:>11.1%} {r['engine_flops'] / peak:>12.1%} "
              f"{r['naive_bytes'] / 2**20:>9.0f} {r['engine_bytes'] / 2**20:>10.0f} {'yes' if r['agree'] else 'NO'}")


def full_sweep_estimate(result: dict) -> str:
    """Seconds for AlexNet-Places365 conv5 over Places365 val from the measured rates: the prefix once per image and
    the ablations; the conservative figure assumes every row computed (a trained network skips more than a random
    one)."""
    rows = 256 * PLACES_VAL_IMAGES
    prefix = PLACES_VAL_IMAGES / result["prefix_rate"]
    every_row = result["ablation_rate"] * max(result["computed"], 1e-9)  # computed rows per second
    return (f"full AlexNet-Places365 conv5 sweep (256 units x {PLACES_VAL_IMAGES:,} images): "
            f"~{prefix + rows / result['ablation_rate']:.1f} s at this run's skip rate, "
            f"~{prefix + rows / every_row:.1f} s with every row computed (prefix {prefix:.1f} s of it)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--quick", action="store_true",
                        help="a few images and units, one timing: checks that it runs (its rates mean little)")
    parser.add_argument("--images", type=int, default=None, help="images per case (default 32 on cpu, 512 on cuda)")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per measurement, fastest kept")
    parser.add_argument("--max-memory", type=float, default=1.0, help="GiB an engine call may hold (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None,
                        help="run the cases whose name (as printed, e.g. 'demo (trained) conv3') contains one of these")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            parser.error("--device cuda asked for, but torch sees no GPU")
        torch.backends.cudnn.allow_tf32 = False  # fp32 throughout, as the engine's exactness needs
        torch.backends.cuda.matmul.allow_tf32 = False
    if args.threads:
        torch.set_num_threads(args.threads)
    images = args.images or (4 if args.quick else (512 if device.type == "cuda" else 32))
    repeats = 1 if args.quick else args.repeats
    started = time.time()
    print(f"machine: {machine(device)}")
    peak = fp32_peak(device, args.quick)
    print(f"fp32 matmul peak: {peak / 1e9:.0f} GFLOP/s")
    models: dict = {}
    results = []
    for case in CASES:
        name = f"{TRAINED if case.trained else case.model} {case.layer}"
        if args.only and not any(text in name for text in args.only):
            continue
        if case.trained and trained_demo() is None:
            print(f"  {name}: skipped, no trained weights (python -m compute.train)", flush=True)
            continue
        results.append(run_case(case, images, device, args.quick, repeats, int(args.max_memory * 2**30), models))
        print(f"  {results[-1]['case']}: done ({time.time() - started:.0f} s)", flush=True)
    print()
    print_table(results, peak)
    others = [(name, layer) for name, layer in any_models.CASES
              if not args.only or any(text in f"{name} {layer}" for text in args.only)]
    if others:  # any torchvision CNN, split with torch.fx (compute.models.graph): 224 px, random weights
        print()
        rows = [any_models.measure(name, layer, images=2 if args.quick else 8, naive_units=2 if args.quick else 8,
                                   repeats=repeats, device=args.device) for name, layer in others]
        any_models.print_table(rows)
        results += [{"case": f"{row['model']} {row['layer']}", "agree": row["agree"]} for row in rows]
    conv5 = [r for r in results if r["case"] == "alexnet-places conv5"]
    if device.type == "cuda" and conv5:
        print(full_sweep_estimate(conv5[0]))
    print(f"total {time.time() - started:.0f} s; machine at the end: {machine(device)}")
    return 0 if all(r["agree"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
