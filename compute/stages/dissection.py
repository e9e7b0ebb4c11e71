"""The pipeline stage of compute.lib.dissection: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
from compute.data.broden import BrodenDataset, fingerprint
from compute.errors import StageSkipped, UserError
from store.writer import write_array
from compute.lib.dissection import (ConceptSource, ConceptTable, Dissection, PASSES, STAGE, UNION_RULES,
                                    best_concepts, merge_tallies, merge_thresholds, tally_ious, threshold_states)
from store.schema import layer_path


def write_concepts(h5, table: ConceptTable) -> None:
    """/concepts, identical from every layer's stage (the store merge keeps one copy)."""
    write_array(h5, "concepts/names", np.array(table.names, dtype=object))
    write_array(h5, "concepts/categories", np.array(table.categories, dtype=object))
    write_array(h5, "concepts/numbers", table.numbers)
    write_array(h5, "concepts/category_names", np.array(table.category_names, dtype=object))


def run_stage(ctx, layers: list[str]) -> None:
    """Dissect every due layer; both passes over the concept images serve all of them (the images are read and run
    through the network's prefix twice in all, not twice per layer). A part per layer."""
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
    # the decoded images kept between the passes count against --max-memory: a quarter of it at most
    source = ConceptSource(BrodenDataset(root), ctx.spec.preprocess, ctx.device, ctx.batch_size,
                           workers=default_workers() if ctx.device.type == "cuda" else 0,
                           cache_bytes=ctx.max_memory // 4)
    joint = f"{STAGE}/{'+'.join(layers)}"
    results = _sharded_dissect(ctx, layers, source, args.quantile, args.union_rule, joint)
    if results is None:
        return
    for layer, result in results.items():
        _write(ctx, layer, result, args, root)
    for name in PASSES:
        ctx.drop_shards(f"{joint}/{name}")


def _write(ctx, layer: str, result: Dissection, args, root) -> None:
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


def _sharded_dissect(ctx, layers: list[str], source: ConceptSource, quantile: float, union_rule: str,
                     stage: str) -> dict[str, Dissection] | None:
    """``dissect`` of each layer, with both passes' batches shared out between ranks; every rank needs the thresholds
    for its share of the tally, rank 0 alone gets the results (None elsewhere). Shard arrays are named
    ``<layer>/<name>`` (``RunContext.by_layer``)."""
    table = ConceptTable.from_broden(source.broden)
    steps = {ctx.step(layer): layer for layer in layers}
    first, second = (f"{stage}/{name}" for name in PASSES)

    def by_layer(states: dict) -> dict:
        return ctx.by_layer({steps[step]: state for step, state in states.items()})

    def of_layer(shares: list, layer: str) -> list[dict]:
        return [ctx.of_layer(arrays, layer) for _, arrays in shares]

    thresholds = ctx.run_sharded(
        first, source.batch_count,
        lambda batches: by_layer(threshold_states(ctx.sequence, list(steps), source, quantile, batches)),
        lambda shares: {step: merge_thresholds(of_layer(shares, layer), quantile) for step, layer in steps.items()},
        everywhere=True)
    tallies = ctx.run_sharded(  # shares of another rule are never reused: the run key holds --union-rule
        second, source.batch_count,
        lambda batches: by_layer({step: tally.state() for step, tally in
                                  tally_ious(ctx.sequence, thresholds, source, table, batches, union_rule).items()}),
        lambda shares: {step: merge_tallies(of_layer(shares, layer), table, union_rule) for step, layer in steps.items()})
    if tallies is None:
        return None
    return {steps[step]: Dissection(thresholds[step], tally.iou(), table, tally.images, union_rule)
            for step, tally in tallies.items()}
