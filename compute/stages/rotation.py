"""The pipeline stage of compute.lib.rotation: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
import torch
from compute.analysis import significance
from compute.errors import StageSkipped
from compute.stages.ablation import drops, write_drops
from store.writer import write_array
from compute.lib.engine import correct_counts
from compute.lib.rotation import random_rotation
from store.schema import layer_path


@torch.no_grad()
def sweep(ctx, layer: str, rotations: list[torch.Tensor], directions=None) -> list[dict]:
    """Per class, the baseline's correct count and, for each direction (default: all) of each rotation removed alone,
    the images lost and gained.

    One pass over the images: each batch's prefix and baseline are computed once and shared by every rotation.
    """
    engine = ctx.engine(layer)
    k = ctx.num_classes
    channels = rotations[0].shape[0]
    directions = torch.as_tensor(np.arange(channels) if directions is None else directions, device=ctx.device)
    base_correct = np.zeros(k)
    lost = np.zeros((len(rotations), len(directions), k))
    gained = np.zeros_like(lost)
    for acts, labels, _ in ctx.activations([layer], desc=f"rotating {layer} ({len(rotations)} x {len(directions)})"):
        base = engine.baseline(acts[layer], labels)
        onehot = torch.nn.functional.one_hot(labels, k).double()
        base_correct += correct_counts(base.pred, labels, k)
        for r, rotation in enumerate(rotations):
            outcome = engine.evaluate_directions(acts[layer], labels, rotation, directions, base, probabilities=False)
            batch_lost, batch_gained = significance.paired_counts(base.pred == labels, outcome.pred == labels, onehot)
            lost[r] += batch_lost.cpu().numpy()
            gained[r] += batch_gained.cpu().numpy()
    counts = np.bincount(ctx.labels, minlength=k).astype(np.float64)
    return [{"base_correct": base_correct, "lost": lost[r], "gained": gained[r], "counts": counts}
            for r in range(len(rotations))]


def _share(ctx, layer: str, rotations: list[torch.Tensor], directions: np.ndarray) -> dict:
    """One rank's directions of every rotation: lost and gained counts [directions, rotations, classes]."""
    swept = sweep(ctx, layer, rotations, directions)
    return {"lost": np.stack([result["lost"] for result in swept], axis=1),
            "gained": np.stack([result["gained"] for result in swept], axis=1),
            "base_correct": swept[0]["base_correct"], "counts": swept[0]["counts"]}


def _combine(ctx, shares: list) -> list[dict]:
    """Each rotation's drops, from the shares' directions put back in order."""
    counts = ctx.in_item_order(shares, ["lost", "gained"])
    first = shares[0][1]
    return [drops({"base_correct": first["base_correct"], "lost": counts["lost"][:, r], "gained": counts["gained"][:, r],
                   "counts": first["counts"]}) for r in range(counts["lost"].shape[1])]


def run_stage(ctx, layer: str) -> None:
    """Sweep every direction of each rotation (directions sharded over ranks under torchrun); rank 0 writes."""
    from compute.run.options import RotationOptions

    # Which layers it runs on is the stage table's choice (compute.run.pipeline, --rotation-layers): a direction's
    # ablation runs the whole tail wherever max pooling follows the layer (it does not commute with a rotation).
    count = ctx.option(RotationOptions).rotations
    if count <= 0:
        raise StageSkipped("--rotations 0")
    seeds = np.arange(count)
    channels = ctx.units(layer)
    rotations = [random_rotation(channels, int(s)) for s in seeds]
    stage = f"rotation/{layer}"
    results = ctx.run_sharded(stage, channels, lambda directions: _share(ctx, layer, rotations, directions),
                              lambda shares: _combine(ctx, shares))
    if results is None:
        return
    with ctx.writer.stage(stage) as h5:
        group = layer_path(layer, "rotation")
        write_drops(h5, group, {name: np.stack([r[name] for r in results]) for name in results[0]
                                if name != "baseline_overall_acc"})
        h5[f"{group}/class_drop"].attrs["axes"] = "rotation, direction, class"
        write_array(h5, f"{group}/seeds", seeds.astype(np.int64))
        h5[group].attrs["baseline_overall_acc"] = results[0]["baseline_overall_acc"]
        h5[group].attrs["method"] = ("direction q_j of a Haar-random orthogonal Q (scipy.stats.ortho_group, "
                                     "random_state=seed) removed at every position: a' = a - q_j (q_j^T a)")
    ctx.drop_shards(stage)
