"""The pipeline as a table: each stage, what it needs, the options that change its result, and where it runs.

A stage's key hashes what its result depends on: the model and weights, the validation images (and the concept images
for dissection), the layer, its own options, its version, and the keys of the stages it reads. A rerun keeps every
stage whose key is unchanged (from the parts folder or the finished store) and recomputes the rest, so a changed
setting costs only what it touches.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Callable

from compute.run.options import (DissectionOptions, FlipOptions, GreedyOptions, LiveOptions, RotationOptions,
                                 TopImageOptions, keyed)


@dataclass(frozen=True)
class Stage:
    section: str
    run: Callable               # run(ctx) once per run; run(ctx, layer) per layer; run(ctx, layers) when joint
    needs: tuple = ()           # sections whose results it reads: of the same layer, or run-wide ones
    options: tuple = ()         # option dataclasses whose keyed fields change its result
    inputs: tuple = ("model", "weights", "data")  # run inputs its result depends on
    sharded: bool = False       # its work is shared out between torchrun ranks (RunContext.run_sharded)
    per_layer: bool = True
    joint: bool = False         # its pending layers run in one call: one pass over the images serves them all
    where: Callable | None = None  # (options by type, chosen layers) -> the layers it runs on; default all
    version: int = 1            # raised when the stage's computation changes, so stores made before recompute it

    def layers(self, options: dict, layers: list[str]) -> list[str]:
        if not self.per_layer:
            return []
        return list(self.where(options, layers)) if self.where else list(layers)

    def name(self, layer: str | None = None) -> str:
        return f"{self.section}/{layer}" if layer else self.section


def _deepest_unless(field: str, options: type):
    """Runs on the layers an option names, by default the deepest chosen one (see the option's comment)."""
    def where(chosen: dict, layers: list[str]) -> list[str]:
        named = getattr(chosen[options], field)
        return layers[-1:] if named is None else [layer for layer in layers if layer in named]
    return where


def stages() -> list[Stage]:
    """Every stage in run order; a stage comes after the ones it needs."""
    from compute.stages import (ablation, activations, attributes, dissection, greedy, live, relations, rotation,
                                setup, topimages)

    return [
        Stage("setup", setup.run_stage, per_layer=False, inputs=("data",)),
        Stage("baseline", activations.run_baseline, per_layer=False, sharded=True),
        Stage("activations", activations.run_layers, sharded=True, joint=True),
        Stage("ablation", ablation.run_stage, options=(FlipOptions,), sharded=True, joint=True),
        Stage("attributes", attributes.run_stage, needs=("activations", "baseline")),
        Stage("dissection", dissection.run_stage, options=(DissectionOptions,),
              inputs=("model", "weights", "concepts"), sharded=True, joint=True),
        Stage("topimages", topimages.run_stage, needs=("activations", "dissection"),
              options=(TopImageOptions, DissectionOptions)),
        Stage("relations", relations.run_stage, needs=("ablation", "attributes", "dissection")),
        Stage("greedy", greedy.run_stage, options=(GreedyOptions, FlipOptions), sharded=True,
              where=_deepest_unless("greedy_layers", GreedyOptions)),
        Stage("rotation", rotation.run_stage, options=(RotationOptions,), sharded=True,
              where=_deepest_unless("rotation_layers", RotationOptions)),
        Stage("live", live.run_stage, options=(LiveOptions,), where=_deepest_unless("live_layers", LiveOptions)),
    ]


def option_types(table: list[Stage]) -> list[type]:
    seen: list[type] = []
    for stage in table:
        seen.extend(options for options in stage.options if options not in seen)
    return seen


@dataclass(frozen=True)
class Step:
    """One stage on one layer (or run-wide), with what its key is made of."""
    stage: Stage
    layer: str | None
    record: dict                # what the store keeps about it: key, options, inputs, needs (name -> key), version

    @property
    def name(self) -> str:
        return self.stage.name(self.layer)

    @property
    def key(self) -> str:
        return self.record["key"]


def digest(value) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def plan(table: list[Stage], layers: list[str], options: dict, inputs: dict) -> list[Step]:
    """The steps of a run in order, each keyed by what it depends on."""
    steps: dict[str, Step] = {}
    for stage in table:
        for layer in (stage.layers(options, layers) if stage.per_layer else [None]):
            needs = {}
            for section in stage.needs:
                needed = next((s for s in (f"{section}/{layer}", section) if s in steps), None)
                if needed is not None:
                    needs[needed] = steps[needed].key
            record = {"layer": layer, "version": stage.version,
                      "options": {name: value for kind in stage.options for name, value in keyed(options[kind]).items()},
                      "inputs": {name: inputs[name] for name in stage.inputs}, "needs": needs}
            record["key"] = digest({"section": stage.section, **record})
            steps[stage.name(layer)] = Step(stage, layer, record)
    return list(steps.values())


def why_recomputed(step: Step, previous: dict | None, recomputed: set[str]) -> str:
    """One line: what changed since the stage's result was made (``previous``: the store's record of it)."""
    if previous is None:
        return "not in the store yet"
    if "key" not in previous:
        return "the store was written before per-stage keys"
    for group, what in (("inputs", "input"), ("options", "option")):
        old, new = previous.get(group, {}), step.record[group]
        for name in sorted(set(old) | set(new)):
            if old.get(name) != new.get(name):
                flag = f"--{name.replace('_', '-')}" if group == "options" else name
                return f"{what} {flag} changed ({_short(old.get(name))} -> {_short(new.get(name))})"
    changed = [name for name in step.record["needs"] if name in recomputed]
    if changed:
        return f"it reads {changed[0]}, which is recomputed"
    if previous.get("version") != step.record["version"]:
        return f"its computation changed (version {previous.get('version')} -> {step.record['version']})"
    return "its inputs changed"


def _short(value) -> str:
    text = json.dumps(value, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 24 else text[:10] + "…" + text[-10:]
