"""Single-unit ablation: every unit of a layer removed alone; overall and per-class accuracy drops.

Drops are accuracy fractions, baseline minus ablated: 0.15 means 15 points. The class drop is a vector over classes;
with the same number of images per class the overall drop is its mean.
"""

from __future__ import annotations

import numpy as np
import torch

from compute.engine import single_unit_masks
from store.writer import write_array


def class_accuracy(correct: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Fraction correct per class from a correctness array [..., N] -> [..., K]."""
    onehot = np.eye(num_classes)[labels]
    return (np.asarray(correct, np.float64) @ onehot) / np.maximum(onehot.sum(0), 1)


@torch.no_grad()
def sweep(ctx, layer: str, units: np.ndarray | None = None) -> dict:
    """Correct counts per class for the baseline and for each unit ablated alone."""
    engine = ctx.engine(layer)
    total = ctx.units(layer)
    units = np.arange(total) if units is None else np.asarray(units)
    masks = single_unit_masks(total, ctx.device)[torch.as_tensor(units, device=ctx.device)]
    k = ctx.num_classes
    base_correct = np.zeros(k)
    unit_correct = np.zeros((len(units), k))
    for acts, labels, _ in ctx.activations([layer], desc=f"ablating {layer} ({len(units)} units)"):
        base = engine.baseline(acts[layer], labels)
        outcome = engine.evaluate_units(acts[layer], labels, masks, base)
        onehot = torch.nn.functional.one_hot(labels, k).double()
        base_correct += ((base.pred == labels).double() @ onehot).cpu().numpy()
        unit_correct += ((outcome.pred == labels).double() @ onehot).cpu().numpy()
    counts = np.bincount(ctx.labels, minlength=k).astype(np.float64)
    return {"base_correct": base_correct, "unit_correct": unit_correct, "counts": counts}


def drops(result: dict) -> dict:
    counts = np.maximum(result["counts"], 1)
    base_acc = result["base_correct"] / counts
    unit_acc = result["unit_correct"] / counts
    n = result["counts"].sum()
    overall_base = result["base_correct"].sum() / n
    overall_unit = result["unit_correct"].sum(1) / n
    return {
        "baseline_class_acc": base_acc.astype(np.float32),
        "class_drop": (base_acc[None, :] - unit_acc).astype(np.float32),
        "overall_drop": (overall_base - overall_unit).astype(np.float32),
        "baseline_overall_acc": float(overall_base),
    }


def _combine(shares: list) -> dict:
    """Put the ranks' unit shares back in unit order (a lone process has one share holding every unit)."""
    from compute.context import RunContext

    first = shares[0][1]
    return {"units": np.sort(np.concatenate([indices for indices, _ in shares])), "base_correct": first["base_correct"],
            "counts": first["counts"], **RunContext.in_item_order(shares, ["unit_correct"])}


def run_stage(ctx, layer: str) -> None:
    """Sweep every unit (sharded over ranks under torchrun); rank 0 writes the drops."""
    stage = f"ablation/{layer}"
    swept = ctx.run_sharded(stage, ctx.units(layer), lambda units: sweep(ctx, layer, units), _combine)
    if swept is None:
        return
    result = drops(swept)
    with ctx.writer.stage(stage) as h5:
        group = f"layers/{layer}/ablation"
        write_array(h5, f"{group}/baseline_class_acc", result["baseline_class_acc"])
        write_array(h5, f"{group}/class_drop", result["class_drop"], units="accuracy fraction, baseline - ablated")
        write_array(h5, f"{group}/overall_drop", result["overall_drop"])
        h5[group].attrs["baseline_overall_acc"] = result["baseline_overall_acc"]
        h5[group].attrs["method"] = ctx.spec.ablation_note
    ctx.drop_shards(stage)
