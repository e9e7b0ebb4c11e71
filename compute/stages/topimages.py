"""The pipeline stage of compute.lib.topimages: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
import torch
import torch.nn.functional as F
from compute.errors import StageSkipped
from compute.lib.quantiles import TopQuantile
from store.writer import write_array
from compute.lib.topimages import MAX_THUMB, STAGE, thumbnail, top_indices
from store.schema import layer_path


def validation_thresholds(ctx, layer: str, quantile: float) -> np.ndarray:
    """The top ``quantile`` of each unit over all positions of the validation maps (when no dissection ran)."""
    sketch = None
    for acts, _, _ in ctx.activations([layer], desc=f"thresholds {layer}"):
        a = acts[layer].float()
        if sketch is None:
            sketch = TopQuantile(a.shape[1], len(ctx.images) * a.shape[2] * a.shape[3], quantile, a.device)
        sketch.update(a.transpose(0, 1).reshape(a.shape[1], -1))
    return sketch.result()


@torch.no_grad()
def unit_masks(ctx, layer: str, order: np.ndarray, thresholds: np.ndarray, size: int) -> np.ndarray:
    """bool [units, k, size, size]: each top image's map of its unit, upsampled and binarised at T_u.

    Images run once each, however many units rank them; only the (image, unit) maps that are kept get upsampled.
    """
    units, k = order.shape
    masks = np.zeros((units, k, size, size), bool)
    chosen = np.unique(order)
    limits = torch.as_tensor(thresholds, dtype=torch.float32, device=ctx.device)
    for acts, _, idx in ctx.activations([layer], indices=chosen, desc=f"top images {layer}"):
        maps = acts[layer].float()
        position = {int(image): row for row, image in enumerate(idx.tolist())}
        unit, rank = np.nonzero(np.isin(order, idx.numpy()))
        rows = torch.as_tensor([position[int(i)] for i in order[unit, rank]], device=maps.device, dtype=torch.long)
        unit_t = torch.as_tensor(unit, device=maps.device, dtype=torch.long)
        upsampled = F.interpolate(maps[rows, unit_t][:, None], size=(size, size), mode="bilinear",
                                  align_corners=False)[:, 0]
        masks[unit, rank] = (upsampled > limits[unit_t][:, None, None]).cpu().numpy()
    return masks


def run_stage(ctx, layer: str) -> None:
    from compute.run.options import DissectionOptions, TopImageOptions

    top_k, quantile = ctx.option(TopImageOptions).top_k, ctx.option(DissectionOptions).quantile
    if top_k <= 0:
        raise StageSkipped(f"--top-k {top_k}: no top images kept")
    maxes = ctx.writer.read_part(f"activations/{layer}", layer_path(layer, "activations", "max"))
    order, scores = top_indices(maxes, min(top_k, maxes.shape[0]))
    dissected = f"dissection/{layer}"
    if ctx.writer.done(dissected) and not ctx.writer.skipped(dissected):
        thresholds = ctx.writer.read_part(f"dissection/{layer}", layer_path(layer, "dissection", "thresholds"))
        source = "dissection (concept images)"
    else:
        thresholds = validation_thresholds(ctx, layer, quantile)
        source = "validation images"
    size = min(ctx.spec.preprocess.crop, MAX_THUMB)
    masks = unit_masks(ctx, layer, order, thresholds, size)
    thumbs = {int(i): thumbnail(ctx.images.images[int(i)], size) for i in np.unique(order)}
    with ctx.writer.stage(f"{STAGE}/{layer}") as h5:
        group = layer_path(layer, STAGE)
        write_array(h5, f"{group}/indices", order.astype(np.int64), description="validation image index [units, k]")
        write_array(h5, f"{group}/scores", scores.astype(np.float32), description="max of the activation map")
        write_array(h5, f"{group}/thumbs", np.array([[thumbs[int(i)] for i in row] for row in order], np.uint8),
                    description="[units, k, h, w, 3] RGB thumbnails of the model's centre crop")
        write_array(h5, f"{group}/masks", masks, description="upsampled activation map > threshold")
        write_array(h5, f"{group}/thresholds", np.asarray(thresholds, np.float32))
        h5[group].attrs.update({"threshold_source": source, "quantile": float(quantile), "k": order.shape[1]})
