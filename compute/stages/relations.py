"""The pipeline stage of compute.analysis.relations: read what earlier stages wrote, call it, write the section."""

from __future__ import annotations
from compute.analysis.relations import (BOOTSTRAP_SEED, CONFIDENCE, N_RESAMPLES, Reader, drop_targets, relation_table,
                                        scalar_attributes)
from store.schema import layer_path


def _part_reader(writer, layer: str) -> Reader:
    """read(section, name) over the parts earlier stages of this run wrote; None for a stage not done or a name
    that stage did not write."""
    def read(section: str, name: str):
        stage = f"{section}/{layer}"
        if not writer.done(stage):
            return None
        try:
            return writer.read_part(stage, layer_path(layer, section, name))
        except KeyError:
            return None
    return read


def run_stage(ctx, layer: str) -> None:
    from compute.errors import StageSkipped
    from store.writer import write_array

    read = _part_reader(ctx.writer, layer)
    attributes, targets = scalar_attributes(read), drop_targets(read)
    if not targets:
        raise StageSkipped(f"no ablation results for {layer}")
    if not attributes:
        raise StageSkipped(f"no unit attributes for {layer}")
    table = relation_table(attributes, targets)
    with ctx.writer.stage(f"relations/{layer}") as h5:
        group = layer_path(layer, "relations")
        for name, value in table.items():
            write_array(h5, f"{group}/{name}", value)
        h5[group].attrs.update({"n_resamples": N_RESAMPLES, "bootstrap_seed": BOOTSTRAP_SEED, "confidence": CONFIDENCE,
                                "ci_method": "BCa", "units": len(targets["overall drop"])})
