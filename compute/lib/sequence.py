"""A model as a flat sequence of named steps: run its prefix to some layers, or its tail from one.

Every registry entry turns its architecture into an ``nn.Sequential`` whose named children are the steps. The output of
one step is an ablatable layer; running the steps up to it is the *prefix*, the steps after it the *tail*. This one
abstraction replaces forward hooks: ablation edits the tensor between prefix and tail, nothing is patched.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def step_names(sequence: nn.Sequential) -> list[str]:
    return [name for name, _ in sequence.named_children()]


def tail_of(sequence: nn.Sequential, step: str) -> nn.Sequential:
    """The steps after ``step`` (sharing parameters with the model)."""
    names = step_names(sequence)
    position = names.index(step)
    return nn.Sequential(OrderedDict(list(sequence.named_children())[position + 1:]))


@torch.no_grad()
def run_to(sequence: nn.Sequential, images: torch.Tensor, steps: list[str], run_all: bool = False) -> dict[str, torch.Tensor]:
    """Outputs of the named steps for a batch; stops after the last one asked for (or gives 'logits' if run_all)."""
    wanted = set(steps)
    last = max(step_names(sequence).index(s) for s in steps) if steps else -1
    outputs: dict[str, torch.Tensor] = {}
    x = images
    for position, (name, module) in enumerate(sequence.named_children()):
        if position > last and not run_all:
            break
        x = module(x)
        if name in wanted:
            outputs[name] = x
    if run_all:
        outputs["logits"] = x
    return outputs


def run_in_place(steps: nn.Sequential, rows: torch.Tensor) -> torch.Tensor:
    """``steps(rows)`` on a buffer of the engine's own (never a caller's tensor): ReLUs overwrite their input rather
    than fill a new tensor, which saves a write of every row's state (a replay's ReLUs took 1.2 s of 19 s)."""
    for step in steps.children():
        rows = rows.relu_() if isinstance(step, nn.ReLU) else step(rows)
    return rows
