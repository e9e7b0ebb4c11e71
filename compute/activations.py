"""The activation pass: one run of the network over the validation set, kept as per-image summaries.

Per layer: each unit's spatial mean and spatial max per image ([N, units]), and streaming moments over every
position (mean, std, fraction of zeros). Per image: the baseline prediction and class probabilities.
"""

from __future__ import annotations

import numpy as np
import torch

from compute.attributes import RunningMoments
from store.writer import write_array

STAGE = "activations"


def run_stage(ctx) -> None:
    n = len(ctx.images)
    means = {layer: np.zeros((n, ctx.units(layer)), np.float32) for layer in ctx.layers}
    maxes = {layer: np.zeros((n, ctx.units(layer)), np.float32) for layer in ctx.layers}
    moments = {layer: RunningMoments(ctx.units(layer)) for layer in ctx.layers}
    probs = np.zeros((n, ctx.num_classes), np.float32)
    for acts, labels, idx in ctx.activations(ctx.layers, run_all=True, desc="activations"):
        rows = idx.numpy()
        probs[rows] = torch.softmax(acts["logits"].float(), 1).cpu().numpy()
        for layer in ctx.layers:
            a = acts[layer]
            means[layer][rows] = a.mean((2, 3)).cpu().numpy()
            maxes[layer][rows] = a.amax((2, 3)).cpu().numpy()
            moments[layer].update(a.cpu().numpy())
    with ctx.writer.stage(STAGE) as h5:
        write_array(h5, "images/predictions", probs.argmax(1).astype(np.int64))
        write_array(h5, "images/probs", probs)
        for layer in ctx.layers:
            shape = tuple(acts_shape(ctx, layer))
            group = f"layers/{layer}/activations"
            write_array(h5, f"{group}/mean", means[layer], description="spatial mean per image and unit")
            write_array(h5, f"{group}/max", maxes[layer], description="spatial max per image and unit")
            write_array(h5, f"{group}/moment_mean", moments[layer].mean.astype(np.float32))
            write_array(h5, f"{group}/moment_std", moments[layer].std.astype(np.float32))
            write_array(h5, f"{group}/sparsity", moments[layer].sparsity.astype(np.float32))
            h5[f"layers/{layer}"].attrs["units"] = shape[0]
            h5[f"layers/{layer}"].attrs["map_shape"] = shape[1:]


@torch.no_grad()
def acts_shape(ctx, layer: str) -> tuple[int, int, int]:
    """[units, H, W] of a layer's output, from one image's forward pass."""
    images, _, _ = next(ctx.images.batches(1, ctx.device))
    from compute.sequence import run_to

    return tuple(run_to(ctx.sequence, images, [ctx.step(layer)])[ctx.step(layer)].shape[1:])
