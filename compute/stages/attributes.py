"""The pipeline stage of compute.lib.attributes: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
import numpy as np
from compute.lib.attributes import class_correlation, class_selectivity, unit_l1
from store.schema import layer_path


def run_stage(ctx, layer: str) -> None:
    """Per-unit attributes of one layer from the activation pass and the model's weights."""
    from store.writer import write_array

    group = layer_path(layer, "activations")
    mean_act = ctx.writer.read_part(f"activations/{layer}", f"{group}/mean")
    probs = ctx.writer.read_part("baseline", "images/probs")
    labels = ctx.labels
    selectivity = class_selectivity(mean_act, labels, ctx.num_classes)
    correlation = class_correlation(mean_act, probs)
    with ctx.writer.stage(f"attributes/{layer}") as h5:
        out = layer_path(layer, "attributes")
        l1, l1_attrs = unit_l1(ctx.model, ctx.spec, layer)
        if l1 is None:  # the store's contract keeps the array: NaN for every unit, the attrs say why
            l1 = np.full(mean_act.shape[1], np.nan)
        write_array(h5, f"{out}/l1", l1.astype(np.float32), **l1_attrs)
        write_array(h5, f"{out}/selectivity", selectivity.astype(np.float32))
        write_array(h5, f"{out}/correlation", correlation.astype(np.float32))
        for name in ("sparsity", "moment_mean", "moment_std"):
            write_array(h5, f"{out}/{name.replace('moment_', 'act_')}", ctx.writer.read_part(f"activations/{layer}", f"{group}/{name}"))
