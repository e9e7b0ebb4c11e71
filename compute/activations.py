"""The activation pass: one run of the network over the validation set, kept as per-image summaries.

Per layer: each unit's spatial mean and spatial max per image ([N, units]), and streaming moments over every
position (mean, std, fraction of zeros). Per image: the baseline prediction and class probabilities. Under torchrun
the batches are shared out between ranks; rank 0 folds the per-batch moments back in batch order, so the result is
the single-process one.
"""

from __future__ import annotations

import numpy as np
import torch

from compute.attributes import RunningMoments, batch_moments
from compute.sequence import run_to
from store.writer import write_array

STAGE = "activations"


def _batch_images(ctx, batches: np.ndarray) -> np.ndarray:
    n, size = len(ctx.images), ctx.batch_size
    return np.concatenate([np.arange(b * size, min((b + 1) * size, n)) for b in batches]) if len(batches) else np.zeros(0, int)


def summarise(ctx, batches: np.ndarray) -> dict:
    """Probabilities, per-image unit means and maxes, and per-batch moments for the given batches."""
    out: dict[str, np.ndarray] = {"probs": [], "rows": []}
    for layer in ctx.layers:
        for key in ("mean", "max", "m_count", "m_mean", "m_m2", "m_zeros"):
            out[f"{layer}/{key}"] = []
    for acts, _, idx in ctx.activations(ctx.layers, indices=_batch_images(ctx, batches), run_all=True,
                                        desc="activations"):
        out["rows"].append(idx.numpy())
        out["probs"].append(torch.softmax(acts["logits"].float(), 1).cpu().numpy())
        for layer in ctx.layers:
            a = acts[layer]
            out[f"{layer}/mean"].append(a.mean((2, 3)).cpu().numpy())
            out[f"{layer}/max"].append(a.amax((2, 3)).cpu().numpy())
            count, mean, m2, zeros = batch_moments(a.cpu().numpy())
            out[f"{layer}/m_count"].append(np.array([count]))
            for key, value in (("m_mean", mean), ("m_m2", m2), ("m_zeros", zeros)):
                out[f"{layer}/{key}"].append(value[None])
    return {key: np.concatenate(value) for key, value in out.items()}


def _combine(ctx):
    def combine(shares):
        order = np.argsort(np.concatenate([batches for batches, _ in shares]), kind="stable")
        merged = {key: np.concatenate([arrays[key] for _, arrays in shares]) for key in shares[0][1]}
        rows = merged["rows"]
        result = {"probs": np.zeros((len(ctx.images), ctx.num_classes), np.float32)}
        result["probs"][rows] = merged["probs"]
        for layer in ctx.layers:
            for key in ("mean", "max"):
                result[f"{layer}/{key}"] = np.zeros((len(ctx.images), ctx.units(layer)), np.float32)
                result[f"{layer}/{key}"][rows] = merged[f"{layer}/{key}"]
            moments = RunningMoments(ctx.units(layer))
            for b in order:
                moments.merge(int(merged[f"{layer}/m_count"][b]), merged[f"{layer}/m_mean"][b],
                              merged[f"{layer}/m_m2"][b], merged[f"{layer}/m_zeros"][b])
            result[f"{layer}/moments"] = moments
        return result
    return combine


def run_stage(ctx) -> None:
    batches = (len(ctx.images) + ctx.batch_size - 1) // ctx.batch_size
    result = ctx.run_sharded(STAGE, batches, lambda mine: summarise(ctx, mine), _combine(ctx))
    if result is None:
        return
    probs = result["probs"]
    with ctx.writer.stage(STAGE) as h5:
        write_array(h5, "images/predictions", probs.argmax(1).astype(np.int64))
        write_array(h5, "images/probs", probs)
        for layer in ctx.layers:
            shape = tuple(acts_shape(ctx, layer))
            group = f"layers/{layer}/activations"
            moments = result[f"{layer}/moments"]
            write_array(h5, f"{group}/mean", result[f"{layer}/mean"], description="spatial mean per image and unit")
            write_array(h5, f"{group}/max", result[f"{layer}/max"], description="spatial max per image and unit")
            write_array(h5, f"{group}/moment_mean", moments.mean.astype(np.float32))
            write_array(h5, f"{group}/moment_std", moments.std.astype(np.float32))
            write_array(h5, f"{group}/sparsity", moments.sparsity.astype(np.float32))
            h5[f"layers/{layer}"].attrs["units"] = shape[0]
            h5[f"layers/{layer}"].attrs["map_shape"] = shape[1:]
    ctx.drop_shards(STAGE)


@torch.no_grad()
def acts_shape(ctx, layer: str) -> tuple[int, int, int]:
    """[units, H, W] of a layer's output, from one image's forward pass."""
    images, _, _ = next(ctx.images.batches(1, ctx.device))
    return tuple(run_to(ctx.sequence, images, [ctx.step(layer)])[ctx.step(layer)].shape[1:])
