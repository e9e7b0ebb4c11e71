"""The pipeline stage of compute.lib.greedy: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
import torch
from compute import flips as flip_tables
from compute.errors import StageSkipped, UserError
from store.writer import write_array
from compute.lib.engine import correct_counts
from compute.lib.greedy import (SPLIT, TIE_BREAK, ablation_paths, class_accuracy_paths, greedy,
                                random_orders, resolve_classes)
from store.schema import layer_path


# -- the pipeline stage ------------------------------------------------------------------------------------------
def _gather(ctx, layer: str, indices: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's activations and labels of some images, in one tensor (a class's images fit in memory)."""
    acts, labels = [], []
    for batch, batch_labels, _ in ctx.activations([layer], indices=indices):
        acts.append(batch[layer])
        labels.append(batch_labels)
    return torch.cat(acts), torch.cat(labels)


def _settings(ctx, layer: str) -> tuple[int, int, np.ndarray]:
    from compute.run.options import GreedyOptions

    # Which layers greedy runs on is the stage table's choice (compute.run.pipeline, --greedy-layers).
    args = ctx.option(GreedyOptions)
    if args.greedy_steps <= 0:
        raise StageSkipped("--greedy-steps is 0")
    if args.random_orders < 0:
        raise UserError(f"--random-orders must be 0 or more, not {args.random_orders}")
    classes = resolve_classes(args.greedy_classes, ctx.class_names)
    counts = np.bincount(ctx.labels, minlength=ctx.num_classes)[classes]
    if counts.min() < 2:
        short = ctx.class_names[int(classes[np.argmin(counts)])]
        raise StageSkipped(f"class {short} has {counts.min()} validation images; greedy needs 2 (one per half)")
    return min(args.greedy_steps, ctx.units(layer)), args.random_orders, classes


def class_curves(engine, acts, labels, class_index: int, steps: int, seeds: int, num_classes: int) -> dict:
    """Everything the stage stores for one class, from that class's images alone."""
    in_sample = greedy(engine, acts, labels, [class_index], steps)
    select, held = slice(0, None, 2), slice(1, None, 2)
    split = greedy(engine, acts[select], labels[select], [class_index], steps)
    orders = random_orders(acts.shape[1], steps, seeds, class_index)
    random = class_accuracy_paths(engine, acts, labels, orders, class_index, num_classes)
    held_acc = class_accuracy_paths(engine, acts[held], labels[held], [split.chosen], class_index, num_classes)[0]
    return {
        "order": in_sample.chosen, "class_acc": in_sample.scores,
        "heldout_order": split.chosen, "heldout_select_acc": split.scores, "heldout_acc": held_acc,
        "random_class_acc": random,
    }


# The overall pass's batches of activations: an eighth of --max-memory (fewer engine calls), held beside the engine.
_LARGE_BATCH_SHARE = 8


def _large_batches(ctx, layer: str, desc: str):
    """The layer's activations of all images in batches of about ctx.max_memory / _LARGE_BATCH_SHARE bytes, with
    their labels and image indices."""
    acts, labels, indices, size = [], [], [], 0
    for batch, batch_labels, batch_indices in ctx.activations([layer], desc=desc):
        acts.append(batch[layer])
        labels.append(batch_labels)
        indices.append(torch.as_tensor(batch_indices))
        size += batch[layer].numel() * batch[layer].element_size()
        if size >= ctx.max_memory // _LARGE_BATCH_SHARE:
            yield torch.cat(acts), torch.cat(labels), torch.cat(indices)
            acts, labels, indices, size = [], [], [], 0
    if acts:
        yield torch.cat(acts), torch.cat(labels), torch.cat(indices)


def step_flips(paths: torch.Tensor, images) -> dict:
    """Rows of the greedy flip table from predictions [R, S+1, B] along R orders: (class_row r, step s in 1..S,
    image, before, after) wherever the prediction at step s differs from that at s - 1 (``images`` [B] names them)."""
    r, s, b = (paths[:, 1:] != paths[:, :-1]).nonzero(as_tuple=True)
    rows = {"class_row": r, "step": s + 1, "image": torch.as_tensor(images).to(b.device)[b], "before": paths[r, s, b],
            "after": paths[r, s + 1, b]}
    return {name: value.cpu().numpy().astype(np.int32) for name, value in rows.items()}


def overall_counts(ctx, layer: str, engine, orders: np.ndarray, flips: list | None = None) -> np.ndarray:
    """Correct counts per class along each class's greedy order, over all images: [K', S+1, K]. With a list
    ``flips``, each batch's rows of the step flip table (``step_flips``, rows local to ``orders``) are added to it."""
    counts = np.zeros((len(orders), orders.shape[1] + 1, ctx.num_classes))
    for acts, labels, indices in _large_batches(ctx, layer, f"greedy {layer}: overall accuracy"):
        paths = ablation_paths(engine, acts, labels, orders)
        counts += correct_counts(paths, labels, ctx.num_classes)
        if flips is not None:
            flips.append(step_flips(paths, indices))
    return counts


def _shapes(steps: int, seeds: int) -> dict:
    """Each class's arrays in the stage: (shape, dtype) per name, so that a share of no classes stacks too."""
    curve = ((steps + 1,), np.float64)
    return {"order": ((steps,), np.int64), "class_acc": curve, "heldout_order": ((steps,), np.int64),
            "heldout_select_acc": curve, "heldout_acc": curve, "random_class_acc": ((seeds, steps + 1), np.float64)}


def class_share(ctx, layer: str, classes: np.ndarray, steps: int, seeds: int, flips: bool = False) -> dict:
    """Curves of some classes, and their greedy orders' correct counts over all images (one rank's share); with
    ``flips``, also the step flip table of these classes (``flip_<field>``, class rows local to ``classes``)."""
    from tqdm import tqdm

    engine = ctx.engine(layer, holding=ctx.max_memory // _LARGE_BATCH_SHARE)
    per_class = []
    for class_index in tqdm(classes, desc=f"greedy {layer}", unit="class", leave=False):
        acts, labels = _gather(ctx, layer, np.flatnonzero(ctx.labels == class_index))
        per_class.append(class_curves(engine, acts, labels, int(class_index), steps, seeds, ctx.num_classes))
    share = {name: np.array([c[name] for c in per_class], dtype).reshape(len(per_class), *shape)
             for name, (shape, dtype) in _shapes(steps, seeds).items()}
    rows = []
    share["counts"] = (overall_counts(ctx, layer, engine, share["order"], rows) if len(per_class)
                       else np.zeros((0, steps + 1, ctx.num_classes)))
    if flips:
        table = flip_tables.concatenate(rows, flip_tables.GREEDY_FIELDS)
        share.update({f"flip_{name}": table[name] for name in flip_tables.GREEDY_FIELDS})
    return share


def _combine(ctx, shares: list, steps: int, seeds: int, classes: int) -> dict:
    """The class shares in class order; the flip tables (ragged) merged by their class rows."""
    stacked = ctx.in_item_order(shares, [*_shapes(steps, seeds), "counts"])
    stacked["flips"] = flip_tables.greedy_table(
        [(indices, {name: arrays[f"flip_{name}"] for name in flip_tables.GREEDY_FIELDS}) for indices, arrays in shares],
        classes, steps)
    return stacked


def run_stage(ctx, layer: str) -> None:
    """Greedy curves of every chosen class (classes sharded over ranks under torchrun); rank 0 writes."""
    steps, seeds, classes = _settings(ctx, layer)
    stage = f"greedy/{layer}"
    stacked = ctx.run_sharded(stage, len(classes),
                              lambda rows: class_share(ctx, layer, classes[rows], steps, seeds, flips=True),
                              lambda shares: _combine(ctx, shares, steps, seeds, len(classes)))
    if stacked is None:
        return
    counts = stacked["counts"]
    images_per_class = np.maximum(np.bincount(ctx.labels, minlength=ctx.num_classes), 1)
    with ctx.writer.stage(stage) as h5:
        group = layer_path(layer, "greedy")
        write_array(h5, f"{group}/classes", classes)
        for name in ("order", "heldout_order"):
            write_array(h5, f"{group}/{name}", stacked[name].astype(np.int64))
        for name in ("class_acc", "heldout_acc", "heldout_select_acc"):
            write_array(h5, f"{group}/{name}", stacked[name].astype(np.float32))
        write_array(h5, f"{group}/random_class_acc", stacked["random_class_acc"].transpose(1, 0, 2).astype(np.float32))
        write_array(h5, f"{group}/overall_acc", (counts.sum(-1) / len(ctx.labels)).astype(np.float32))
        write_array(h5, f"{group}/all_class_acc", (counts / images_per_class).astype(np.float32),
                    axes="greedy class row, step, class")
        attrs = h5[group].attrs
        attrs["steps"] = steps
        attrs["random_orders"] = seeds
        attrs["random_seeding"] = "numpy default_rng((seed r, class index)), first S units of a permutation"
        attrs["tie_break"] = TIE_BREAK
        attrs["split"] = SPLIT
        attrs["rows"] = "rows follow 'classes'; step 0 is the unablated baseline"
        flip_tables.write_table(h5, f"{group}/flips", stacked["flips"], flip_tables.GREEDY_FIELDS,
                                flip_tables.GREEDY_NOTE)
        if flip_tables.keep_thumbs(ctx):
            flip_tables.write_thumbs(h5, f"{group}/flips", ctx.images.images, stacked["flips"]["image"])
    ctx.drop_shards(stage)
