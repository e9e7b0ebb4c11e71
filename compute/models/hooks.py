"""The fallback for models torch.fx cannot trace: forward hooks, at the speed of running the whole model.

The pipeline still sees a flat sequence of steps, one per layer and a last one giving the logits. Each step runs the
whole model on the batch's *images* with a forward hook that replaces the previous layer's output by the step's
input (the activations, edited or not) and records the outputs of the layers after it. The images travel with the
activations as a ``Carried`` tensor: a tensor subclass that keeps the input image of every row through the
engine's indexing, masking, concatenation and dtype changes. One model run serves every step of a prefix: a step
whose input comes unchanged from the step before it takes its output from that run's record.

Only modules called exactly once per forward are layers here (a hook cannot tell which of several calls is meant).
Ablating a unit still means zeroing that channel of the module's output, as for a traced model.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

LOGITS = "logits"


class Carried(torch.Tensor):
    """Activations [B, ...] that know the input image [3, H, W] of each row (``images``), the layer they are the
    output of (``layer``) and, while untouched since the run that made them, that run's other outputs."""

    @staticmethod
    def wrap(values: torch.Tensor, images: torch.Tensor, layer: str, record: dict | None = None) -> "Carried":
        out = values.as_subclass(Carried)
        out.images, out.layer, out.record, out.made_at = images, layer, record, out._version
        return out

    def fresh_record(self) -> dict | None:
        """The outputs recorded by the run that made this tensor, if it has not been edited in place since."""
        record = self.__dict__.get("record")
        return record if record is not None and self._version == self.made_at else None

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **kwargs)
        carrier = next((arg for arg in _arguments(args) if isinstance(arg, Carried)), None)
        if carrier is None or not isinstance(out, torch.Tensor) or out.dim() == 0:
            return _plain(out)
        images = _images_after(func, args, kwargs, carrier, out)
        if images is None:
            return _plain(out)
        return Carried.wrap(out.as_subclass(torch.Tensor), images, carrier.layer)


def _arguments(args):
    for arg in args:
        if isinstance(arg, (list, tuple)):
            yield from arg
        else:
            yield arg


def _plain(value):
    if isinstance(value, Carried):
        return value.as_subclass(torch.Tensor)
    if isinstance(value, (list, tuple)) and any(isinstance(v, Carried) for v in value):
        return type(value)(_plain(v) for v in value)
    return value


def _images_after(func, args, kwargs, carrier: Carried, out: torch.Tensor):
    """The images of ``out``'s rows: indexing and concatenation along the batch move them; any other operation
    that keeps the batch length keeps them; anything else drops them (its result is no layer's activations)."""
    images = carrier.images
    if func is torch.Tensor.__getitem__:
        index = args[1]
        first = index[0] if isinstance(index, tuple) else index
        if first is Ellipsis or first is None or isinstance(first, int):
            return None
        return images[first.to(images.device) if isinstance(first, torch.Tensor) else first]
    if func is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        parts = args[0]
        if dim == 0 and all(isinstance(part, Carried) for part in parts):
            return torch.cat([part.images for part in parts])
    if func in (torch.Tensor.index_select, torch.index_select):
        dim, index = (args[1], args[2])
        if dim == 0:
            return images.index_select(0, index.to(images.device))
    if func in (torch.Tensor.narrow, torch.narrow) and args[1] == 0:
        return images.narrow(0, args[2], args[3])
    if out.shape[0] == carrier.shape[0] and carrier.dim() > 0:
        return images
    return None


def call_counts(model: nn.Module, example: torch.Tensor) -> tuple[dict[str, int], dict[str, tuple], list[str]]:
    """Per module: calls in one forward, the shape of its (last) output, and the order in which modules finished."""
    counts, shapes, order = {}, {}, []
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def note(_module, _args, output, name=name):
            counts[name] = counts.get(name, 0) + 1
            shapes[name] = tuple(output.shape) if isinstance(output, torch.Tensor) else None
            if name in order:
                order.remove(name)
            order.append(name)

        handles.append(module.register_forward_hook(note))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    return counts, shapes, order


class HookStep(nn.Module):
    """One step of the fallback sequence: gives the output of module ``target`` (or the logits when ``target`` is
    None) for the images carried by its input, with the input's layer replaced by the input itself."""

    def __init__(self, model: nn.Module, target: str | None, later: list[str]):
        super().__init__()
        self.model = model
        self.target = target
        self.later = later  # this and the following layers: what one run records for the steps after it

    def forward(self, x):
        key = self.target or LOGITS
        if isinstance(x, Carried):
            record = x.fresh_record()
            if record is not None and key in record:
                return self._output(record[key], x.images, record)
            images, replace = x.images, (x.layer, x.as_subclass(torch.Tensor))
        else:
            images, replace = x, None
        record = self._run(images, replace)
        return self._output(record[key], images, record)

    def _output(self, value, images, record):
        return value if self.target is None else Carried.wrap(value, images, self.target, record)

    def _run(self, images: torch.Tensor, replace) -> dict:
        """Run the model once: ``replace`` = (layer, tensor) substitutes that layer's output; the outputs of the
        layers in ``later`` and the logits are recorded."""
        modules = dict(self.model.named_modules())
        record, handles = {}, []
        dtype = next((p.dtype for p in self.model.parameters()), images.dtype)
        if replace is not None:
            layer, value = replace
            handles.append(modules[layer].register_forward_hook(lambda m, a, out: value.to(out.dtype)))
        for name in self.later:
            handles.append(modules[name].register_forward_hook(
                lambda m, a, out, name=name: record.__setitem__(name, out)))
        try:
            record[LOGITS] = self.model(images.to(dtype))
        finally:
            for handle in handles:
                handle.remove()
        return record


def step_name(layer: str) -> str:
    return layer.replace(".", "_") or "model"


def to_sequence(model: nn.Module, layers: list[str]) -> nn.Sequential:
    """The fallback sequence over ``layers`` (in the order the model finishes them), then the logits."""
    steps = [(step_name(layer), HookStep(model, layer, layers[i:])) for i, layer in enumerate(layers)]
    steps.append((LOGITS, HookStep(model, None, [])))
    return nn.Sequential(OrderedDict(steps))
