"""The pipeline stage of compute.lib.dissection: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
from compute.data.broden import BrodenDataset, fingerprint
from compute.errors import StageSkipped, UserError
from store.writer import write_array
from compute.lib.dissection import (ConceptSource, ConceptTable, Dissection, PASSES, STAGE, UNION_RULES,
                                    best_concepts, merge_tallies, merge_thresholds, tally_iou, threshold_state)
from store.schema import layer_path


def write_concepts(h5, table: ConceptTable) -> None:
    """/concepts, identical from every layer's stage (the store merge keeps one copy)."""
    write_array(h5, "concepts/names", np.array(table.names, dtype=object))
    write_array(h5, "concepts/categories", np.array(table.categories, dtype=object))
    write_array(h5, "concepts/numbers", table.numbers)
    write_array(h5, "concepts/category_names", np.array(table.category_names, dtype=object))


def run_stage(ctx, layer: str) -> None:
    from compute.run.imagecache import default_workers

    from compute.run.options import DissectionOptions

    root = ctx.concepts
    if root is None:
        raise StageSkipped("no concept data set: pass --concepts PATH (an unzipped broden1_224)")
    args = ctx.option(DissectionOptions)
    if not 0.0 < args.quantile < 1.0:
        raise UserError(f"--quantile {args.quantile} is not a fraction: use e.g. 0.005 (the top 0.5%)")
    if args.union_rule not in UNION_RULES:
        raise UserError(f"--union-rule {args.union_rule} is not one of {', '.join(UNION_RULES)}")
    source = ConceptSource(BrodenDataset(root), ctx.spec.preprocess, ctx.device, ctx.batch_size,
                           workers=default_workers() if ctx.device.type == "cuda" else 0)
    result = _sharded_dissect(ctx, ctx.step(layer), source, args.quantile, args.union_rule, f"{STAGE}/{layer}")
    if result is None:
        return
    best = best_concepts(result.iou, result.table.category_index, len(result.table.category_names))
    with ctx.writer.stage(f"{STAGE}/{layer}") as h5:
        write_concepts(h5, result.table)
        group = layer_path(layer, STAGE)
        write_array(h5, f"{group}/iou", result.iou.astype(np.float32), description="[units, concepts]",
                    union_rule=result.union_rule)  # on the numbers themselves, and with the other settings below
        write_array(h5, f"{group}/thresholds", result.thresholds.astype(np.float32),
                    description=f"top {args.quantile} quantile of each unit over the concept images")
        for name, value in best.items():
            write_array(h5, f"{group}/{name}", value)
        h5[group].attrs.update({"iou_threshold": float(args.iou_threshold), "quantile": float(args.quantile),
                                "union_rule": result.union_rule,
                                "concept_images": result.images, "concepts_path": str(root),
                                "concepts_fingerprint": fingerprint(root)})
    for name in PASSES:
        ctx.drop_shards(f"{STAGE}/{layer}/{name}")


def _sharded_dissect(ctx, step: str, source: ConceptSource, quantile: float, union_rule: str,
                     stage: str) -> Dissection | None:
    """``dissect`` with both passes' batches shared out between ranks; every rank needs the thresholds for its
    share of the tally, rank 0 alone gets the result (None elsewhere)."""
    table = ConceptTable.from_broden(source.broden)
    first, second = (f"{stage}/{name}" for name in PASSES)
    thresholds = ctx.run_sharded(
        first, source.batch_count,
        lambda batches: threshold_state(ctx.sequence, step, source, quantile, batches),
        lambda shares: merge_thresholds([state for _, state in shares], quantile), everywhere=True)
    tally = ctx.run_sharded(  # shares of another rule are never reused: the run key holds --union-rule
        second, source.batch_count,
        lambda batches: tally_iou(ctx.sequence, step, source, table, thresholds, batches, union_rule).state(),
        lambda shares: merge_tallies([state for _, state in shares], table, union_rule))
    return None if tally is None else Dissection(thresholds, tally.iou(), table, tally.images, union_rule)
