"""Single-unit ablation: every unit of a layer removed alone; overall and per-class accuracy drops.

Drops are accuracy fractions, baseline minus ablated: 0.15 means 15 points. The class drop is a vector over classes;
with the same number of images per class the overall drop is its mean. Each drop is kept with the paired counts it
rests on (images lost and gained, ``compute.analysis.significance``) and its McNemar p-value and layer-wide q-value, and the
images themselves: every (unit, image) whose prediction changed, with the prediction before and after
(``compute.flips``, ``layers/<L>/ablation/flips``).
"""

from __future__ import annotations

import numpy as np
import torch

from compute import flips
from compute.analysis import significance
from compute.lib.engine import correct_counts, single_unit_masks
from store.writer import write_array
from store.schema import layer_path


@torch.no_grad()
def sweep(ctx, layer: str, units: np.ndarray | None = None) -> dict:
    """Per class, the baseline's correct count and, for each unit ablated alone, the images lost and gained; and the
    flip table of these units (``flip_unit``, ``flip_image``, ``flip_before``, ``flip_after``: global unit numbers,
    sorted by unit, then image)."""
    return sweep_layers(ctx, {layer: np.arange(ctx.units(layer)) if units is None else np.asarray(units)})[layer]


@torch.no_grad()
def sweep_layers(ctx, units: dict[str, np.ndarray]) -> dict[str, dict]:
    """``sweep`` of several layers (the given units of each) in one pass over the validation images: each batch runs
    the network's prefix once, up to the deepest layer, and every layer's sweep takes its activations from it."""
    layers = list(units)
    engines = {layer: ctx.engine(layer) for layer in layers}
    masks = {layer: single_unit_masks(ctx.units(layer), ctx.device)[torch.as_tensor(units[layer], device=ctx.device,
                                                                                   dtype=torch.long)]
             for layer in layers}
    k = ctx.num_classes
    totals = {layer: {"base_correct": np.zeros(k), "lost": np.zeros((len(units[layer]), k)),
                      "gained": np.zeros((len(units[layer]), k)), "rows": []} for layer in layers}
    shown = ", ".join(f"{layer} ({len(units[layer])} units)" for layer in layers)
    for acts, labels, indices in ctx.activations(layers, desc=f"ablating {shown}"):
        onehot = torch.nn.functional.one_hot(labels, k).double()
        for layer in layers:
            total, engine = totals[layer], engines[layer]
            base = engine.baseline(acts[layer], labels)
            total["base_correct"] += correct_counts(base.pred, labels, k)
            if not len(units[layer]):  # this rank's share holds none of the layer's units
                continue
            # predictions alone: rows whose prediction is certified unchanged skip the tail (compute.lib.engine)
            outcome = engine.evaluate_units(acts[layer], labels, masks[layer], base, probabilities=False)
            batch_lost, batch_gained = significance.paired_counts(base.pred == labels, outcome.pred == labels, onehot)
            total["lost"] += batch_lost.cpu().numpy()
            total["gained"] += batch_gained.cpu().numpy()
            total["rows"].append(changed_rows(base.pred, outcome.pred, torch.as_tensor(units[layer], dtype=torch.long),
                                              indices))
    counts = np.bincount(ctx.labels, minlength=k).astype(np.float64)
    results = {}
    for layer, total in totals.items():
        table = flips.unit_table(total.pop("rows"))
        results[layer] = {**total, "counts": counts, **{f"flip_{name}": table[name] for name in flips.UNIT_FIELDS}}
    return results


def changed_rows(base_pred: torch.Tensor, pred: torch.Tensor, units: torch.Tensor, images: torch.Tensor) -> dict:
    """One batch's rows of the flip table: (unit, image, before, after) for every ablation s [S] and image b [B] with
    ``pred[s, b] != base_pred[b]``; ``units`` [S] and ``images`` [B] name them."""
    s, b = (pred != base_pred[None]).nonzero(as_tuple=True)  # found on the engine's device, only the rows move
    rows = {"unit": units[s.cpu()], "image": torch.as_tensor(images)[b.cpu()], "before": base_pred[b],
            "after": pred[s, b]}
    return {name: value.cpu().numpy().astype(np.int32) for name, value in rows.items()}


def drops(result: dict) -> dict:
    """Drops from the paired counts: class drop (lost - gained) / n_k, overall (sum lost - sum gained) / N, with the
    counts as int32 and their tests."""
    counts = result["counts"]
    lost = np.rint(result["lost"]).astype(np.int32)
    gained = np.rint(result["gained"]).astype(np.int32)
    n = counts.sum()
    overall_lost, overall_gained = lost.sum(-1, dtype=np.int32), gained.sum(-1, dtype=np.int32)
    return {
        "baseline_class_acc": (result["base_correct"] / np.maximum(counts, 1)).astype(np.float32),
        "class_drop": ((lost - gained) / np.maximum(counts, 1)).astype(np.float32),
        "overall_drop": ((overall_lost - overall_gained) / n).astype(np.float32),
        "baseline_overall_acc": float(result["base_correct"].sum() / n),
        "lost": lost, "gained": gained, "overall_lost": overall_lost, "overall_gained": overall_gained,
        **significance.drop_tests(lost, gained),
    }


def write_drops(h5, group: str, result: dict) -> None:
    """The drops, their counts and their tests under ``group`` (``ablation`` or ``rotation``)."""
    write_array(h5, f"{group}/class_drop", result["class_drop"], units="accuracy fraction, baseline - ablated")
    write_array(h5, f"{group}/overall_drop", result["overall_drop"])
    for name in ("lost", "gained", "overall_lost", "overall_gained"):
        write_array(h5, f"{group}/{name}", result[name], units="images")
    write_array(h5, f"{group}/p_value", result["p_value"], test="exact McNemar: two-sided binomial test of lost in "
                "lost + gained at p = 0.5 (1 where no image changed)")
    write_array(h5, f"{group}/q_value", result["q_value"],
                test="Benjamini-Hochberg over the layer's units x classes (per rotation for directions)")
    write_array(h5, f"{group}/overall_p_value", result["overall_p_value"], test="exact McNemar on the overall counts")
    write_array(h5, f"{group}/overall_q_value", result["overall_q_value"], test="Benjamini-Hochberg over the units")


def _combine(shares: list) -> dict:
    """Put the ranks' unit shares back in unit order (a lone process has one share holding every unit)."""
    from compute.run.context import RunContext

    first = shares[0][1]
    units = np.sort(np.concatenate([indices for indices, _ in shares]))
    # The flip table is ragged (rows per unit vary): its shares' rows carry global unit numbers, so they are merged
    # by unit, not by item position.
    table = flips.combine_unit_tables([{name: arrays[f"flip_{name}"] for name in flips.UNIT_FIELDS}
                                       for _, arrays in shares], len(units))
    return {"units": units, "base_correct": first["base_correct"], "counts": first["counts"],
            **RunContext.in_item_order(shares, ["lost", "gained"]), "flips": table}


def run_stage(ctx, layers: list[str]) -> None:
    """Sweep every unit of every due layer in one pass over the validation images (units shared out between ranks
    under torchrun, every rank's units of all layers in one pass); rank 0 writes a part per layer."""
    joint = f"ablation/{'+'.join(layers)}"
    starts = np.cumsum([0] + [ctx.units(layer) for layer in layers])

    def split(items: np.ndarray) -> dict[str, np.ndarray]:
        """Items (units of the layers numbered one after the other) as each layer's own unit numbers."""
        return {layer: items[(items >= starts[i]) & (items < starts[i + 1])] - starts[i]
                for i, layer in enumerate(layers)}

    def combine(shares: list) -> dict:
        return {layer: _combine([(split(items)[layer], ctx.of_layer(arrays, layer)) for items, arrays in shares])
                for layer in layers}

    swept = ctx.run_sharded(joint, int(starts[-1]), lambda items: ctx.by_layer(sweep_layers(ctx, split(items))),
                            combine)
    if swept is None:
        return
    for layer in layers:
        _write(ctx, layer, swept[layer])
    ctx.drop_shards(joint)


def _write(ctx, layer: str, swept: dict) -> None:
    result = drops(swept)
    with ctx.writer.stage(f"ablation/{layer}") as h5:
        group = layer_path(layer, "ablation")
        write_array(h5, f"{group}/baseline_class_acc", result["baseline_class_acc"])
        write_drops(h5, group, result)
        h5[group].attrs["baseline_overall_acc"] = result["baseline_overall_acc"]
        h5[group].attrs["method"] = ctx.spec.ablation_note
        flips.write_table(h5, f"{group}/flips", swept["flips"], flips.UNIT_FIELDS, flips.UNIT_NOTE)
        flips.write_crop(h5, f"{group}/flips", ctx.spec.preprocess)
        if flips.keep_thumbs(ctx):
            flips.write_thumbs(h5, f"{group}/flips", ctx.images.images, swept["flips"]["image"])
