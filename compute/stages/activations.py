"""The activation pass: one run of the network over the validation set, kept as per-image summaries.

Per layer (a part each, all due layers computed in one pass): each unit's spatial mean and spatial max per image
([N, units]), and streaming moments over every position (mean, std, fraction of zeros). Per image (the ``baseline``
stage): the unablated prediction and class probabilities. Under torchrun the batches are shared out between ranks;
rank 0 folds the per-batch moments back in batch order, so the result is the single-process one.
"""

from __future__ import annotations

import numpy as np
import torch

from compute.lib.attributes import RunningMoments, batch_moments
from compute.lib.sequence import run_to
from store.writer import write_array
from store.schema import layer_path

STAGE = "activations"


def _batch_images(ctx, batches: np.ndarray) -> np.ndarray:
    n, size = len(ctx.images), ctx.batch_size
    return np.concatenate([np.arange(b * size, min((b + 1) * size, n)) for b in batches]) if len(batches) else np.zeros(0, int)


def summarise(ctx, layers: list[str], batches: np.ndarray) -> dict:
    """Per-image unit means and maxes, and per-batch moments, of ``layers`` for the given batches."""
    out: dict[str, list] = {"rows": []}
    for layer in layers:
        for key in ("mean", "max", "m_count", "m_mean", "m_m2", "m_zeros"):
            out[f"{layer}/{key}"] = []
    for acts, _, idx in ctx.activations(layers, indices=_batch_images(ctx, batches), desc="activations"):
        out["rows"].append(idx.numpy())
        for layer in layers:
            a = acts[layer]
            out[f"{layer}/mean"].append(a.mean((2, 3)).cpu().numpy())
            out[f"{layer}/max"].append(a.amax((2, 3)).cpu().numpy())
            count, mean, m2, zeros = batch_moments(a.cpu().numpy())
            out[f"{layer}/m_count"].append(np.array([count]))
            for key, value in (("m_mean", mean), ("m_m2", m2), ("m_zeros", zeros)):
                out[f"{layer}/{key}"].append(value[None])
    return {key: np.concatenate(value) for key, value in out.items()}


def _combine(ctx, layers: list[str]):
    def combine(shares):
        order = np.argsort(np.concatenate([batches for batches, _ in shares]), kind="stable")
        merged = {key: np.concatenate([arrays[key] for _, arrays in shares]) for key in shares[0][1]}
        rows = merged["rows"]
        result = {}
        for layer in layers:
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


def _batches(ctx) -> int:
    return (len(ctx.images) + ctx.batch_size - 1) // ctx.batch_size


def run_layers(ctx, layers: list[str]) -> None:
    """One pass over the validation images for every layer whose activation summaries are due; a part per layer."""
    result = ctx.run_sharded(f"{STAGE}/{'+'.join(layers)}", _batches(ctx), lambda mine: summarise(ctx, layers, mine),
                             _combine(ctx, layers))
    if result is None:
        return
    for layer in layers:
        shape = tuple(acts_shape(ctx, layer))
        group = layer_path(layer, "activations")
        moments = result[f"{layer}/moments"]
        with ctx.writer.stage(f"{STAGE}/{layer}") as h5:
            write_array(h5, f"{group}/mean", result[f"{layer}/mean"], description="spatial mean per image and unit")
            write_array(h5, f"{group}/max", result[f"{layer}/max"], description="spatial max per image and unit")
            write_array(h5, f"{group}/moment_mean", moments.mean.astype(np.float32))
            write_array(h5, f"{group}/moment_std", moments.std.astype(np.float32))
            write_array(h5, f"{group}/sparsity", moments.sparsity.astype(np.float32))
            h5[layer_path(layer)].attrs["units"] = shape[0]
            h5[layer_path(layer)].attrs["map_shape"] = shape[1:]
    ctx.drop_shards(f"{STAGE}/{'+'.join(layers)}")


def _probabilities(ctx, batches: np.ndarray) -> dict:
    rows, probs = [], []
    for images, _, idx in ctx.images.batches(ctx.batch_size, ctx.device, _batch_images(ctx, batches)):
        rows.append(idx.numpy())
        probs.append(torch.softmax(run_to(ctx.sequence, images, [], run_all=True)["logits"].float(), 1).cpu().numpy())
    return {"rows": np.concatenate(rows), "probs": np.concatenate(probs)}


def _in_image_order(ctx):
    def combine(shares):
        probs = np.zeros((len(ctx.images), ctx.num_classes), np.float32)
        for _, arrays in shares:
            probs[arrays["rows"]] = arrays["probs"]
        return probs
    return combine


def run_baseline(ctx) -> None:
    """The unablated network's class probabilities and prediction for every validation image."""
    probs = ctx.run_sharded("baseline", _batches(ctx), lambda mine: _probabilities(ctx, mine), _in_image_order(ctx))
    if probs is None:
        return
    with ctx.writer.stage("baseline") as h5:
        write_array(h5, "images/predictions", probs.argmax(1).astype(np.int64))
        write_array(h5, "images/probs", probs)
    ctx.drop_shards("baseline")


@torch.no_grad()
def acts_shape(ctx, layer: str) -> tuple[int, int, int]:
    """[units, H, W] of a layer's output, from one image's forward pass."""
    images, _, _ = next(ctx.images.batches(1, ctx.device))
    return tuple(run_to(ctx.sequence, images, [ctx.step(layer)])[ctx.step(layer)].shape[1:])
