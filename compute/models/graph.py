"""Any traceable nn.Module as the flat sequence of named steps the pipeline works on (``compute.lib.sequence``).

``torch.fx`` traces the model into one graph of operations. A *clean cut* is a point of that graph where exactly one
value is passed on: the output of the node just before it (no skip connection or dense concatenation reaches across).
The graph is cut at every clean cut; the pieces between cuts are the steps, in order, so that

* a layer -- a module whose (last) call's output is a clean cut -- is the output of one step, and the steps before it
  are its prefix, the steps after it its tail, exactly as for the hand-written sequences of ``compute.models.zoo``;
* several layers share one prefix run (``run_to`` stops once, at the deepest);
* a piece that is a single module call (pooling, Flatten, Linear, Conv2d...) is that very module, so the engine
  recognises its shortcuts (pool -> flatten -> Linear, a Conv2d entry) exactly where a tail starts with them; other
  pieces are ``GraphModule``s running the traced code. Every piece shares its parameters with the model.

A module called several times in one forward (ResNet's ``relu`` inside a block) is the layer of its *last* call: for
a torchvision block that is the block's output. Layers whose output is not a clean cut (a conv inside a residual
block, a layer inside a dense block) are not offered: their tail would need the other values crossing the cut.
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn


class Untraceable(Exception):
    """torch.fx could not trace the model (data-dependent control flow, unsupported Python)."""


class _Recorder(fx.Tracer):
    """A tracer that notes the output node of every module call, leaf or not (``layer3`` as well as ``layer3.5``)."""

    def __init__(self):
        super().__init__()
        self.outputs: dict[str, list[fx.Node]] = {}

    def call_module(self, m, forward, args, kwargs):
        out = super().call_module(m, forward, args, kwargs)
        if isinstance(out, fx.Proxy):
            self.outputs.setdefault(self.path_of_module(m), []).append(out.node)
        return out


@dataclass
class Traced:
    """A traced model: its graph, the output node of each module's last call, and the clean cuts in graph order."""

    graph: fx.Graph
    outputs: dict[str, fx.Node]
    cuts: list[fx.Node] = field(default_factory=list)


def trace(model: nn.Module) -> Traced:
    recorder = _Recorder()
    try:
        graph = recorder.trace(model)
    except Exception as error:  # fx raises TraceError, TypeError, NotImplementedError... for untraceable code
        raise Untraceable(f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}") from None
    outputs = {name: nodes[-1] for name, nodes in recorder.outputs.items() if name}
    return Traced(graph, outputs, clean_cuts(graph))


def clean_cuts(graph: fx.Graph) -> list[fx.Node]:
    """Nodes after which their own output is the only value still needed (parameters read by get_attr excepted:
    they are the same for every image and are copied into each piece that reads them)."""
    nodes = list(graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    live = [0] * (len(nodes) + 1)  # live[i]: values defined at or before i and used after i
    last_use = {}
    for node in nodes:
        if node.op in ("get_attr", "output") or not node.users:
            continue
        last_use[node] = max(position[user] for user in node.users)
        live[position[node]] += 1
        live[last_use[node]] -= 1
    cuts, running = [], 0
    for i, node in enumerate(nodes):
        running += live[i]
        if node in last_use and node.op != "placeholder" and running == 1:
            cuts.append(node)
    return cuts


# Functions that are one channel-wise module: kept as that module so the engine sees its shortcut pattern.
def _as_module(node: fx.Node, source: fx.Node) -> nn.Module | None:
    """The plain module equal to a single call_function/call_method node on ``source``, or None."""
    args, kwargs = node.args, node.kwargs
    if not args or args[0] is not source:
        return None
    target = node.target
    if target in (torch.flatten, "flatten"):
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0 if target is torch.flatten else 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        return nn.Flatten(1, -1) if (start, end) == (1, -1) else None
    if target in (F.relu, torch.relu, "relu") and len(args) == 1:
        return nn.ReLU()
    if target is F.adaptive_avg_pool2d and len(args) == 2 and not kwargs:
        return nn.AdaptiveAvgPool2d(args[1])
    return None


# In-place operations would overwrite a layer's stored output when the next step runs (run_to keeps references).
_OUT_OF_PLACE = {operator.iadd: operator.add, operator.imul: operator.mul, operator.isub: operator.sub,
                 torch.relu_: torch.relu, F.relu_: F.relu}


def _out_of_place(node: fx.Node) -> None:
    if "inplace" in node.kwargs:
        node.kwargs = {**node.kwargs, "inplace": False}
    if node.op == "call_function" and node.target in _OUT_OF_PLACE:
        node.target = _OUT_OF_PLACE[node.target]
    if node.op == "call_method" and node.target.endswith("_") and hasattr(torch.Tensor, node.target[:-1]):
        node.target = node.target[:-1]


def no_inplace_modules(model: nn.Module) -> None:
    """Switch off ``inplace`` in the model's modules (ReLU(inplace=True) after a layer would overwrite the layer's
    stored output in place); it changes memory use only, never a result."""
    for module in model.modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False


def _piece(model: nn.Module, segment: list[fx.Node], source: fx.Node | None, result: fx.Node) -> nn.Module:
    """The step computing ``result`` from ``source`` (None: from the model's input) through ``segment``."""
    work = [node for node in segment if node.op != "get_attr"]
    if source is not None and len(work) == 1:
        node = work[0]
        if node.op == "call_module" and node.args == (source,) and not node.kwargs:
            return model.get_submodule(node.target)
        simple = _as_module(node, source) if node.op in ("call_function", "call_method") else None
        if simple is not None and all(arg is source or not isinstance(arg, fx.Node) for arg in node.args):
            return simple
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    if source is not None:
        env[source] = graph.placeholder("x")

    def mapped(node):
        if node not in env:  # a parameter or buffer read directly (get_attr), copied where used
            env[node] = graph.node_copy(node, mapped)
        return env[node]

    for node in work:
        env[node] = graph.node_copy(node, mapped)
        _out_of_place(env[node])
    graph.output(env[result])
    return fx.GraphModule(model, graph)


def split(model: nn.Module, traced: Traced) -> nn.Sequential:
    """The model as steps cut at every clean cut, named after the node each step ends at."""
    nodes = list(traced.graph.nodes)
    position = {node: i for i, node in enumerate(nodes)}
    steps, start, source = [], 0, None
    for cut in traced.cuts:
        end = position[cut] + 1
        steps.append((cut.name, _piece(model, nodes[start:end], source, cut)))
        start, source = end, cut
    result = next(node for node in nodes if node.op == "output").args[0]
    if result is not source:  # the model returns something computed after its last clean cut
        steps.append(("output", _piece(model, nodes[start:-1], source, result)))
    return nn.Sequential(OrderedDict(steps))


def to_sequence(model: nn.Module) -> nn.Sequential:
    """``model`` as a flat sequence of steps sharing its parameters (``Untraceable`` if fx cannot trace it)."""
    no_inplace_modules(model)
    return split(model, trace(model))


@torch.no_grad()
def output_shapes(model: nn.Module, traced: Traced, example: torch.Tensor) -> dict[fx.Node, tuple]:
    """Shape of every tensor node's output for one example input (an interpreter run of the traced graph)."""
    shapes: dict[fx.Node, tuple] = {}

    class Recording(fx.Interpreter):
        def run_node(self, node):
            value = super().run_node(node)
            if isinstance(value, torch.Tensor):
                shapes[node] = tuple(value.shape)
            return value

    Recording(fx.GraphModule(model, traced.graph)).run(example)
    return shapes


# Steps a channel passes through unchanged in identity (per-channel maps, pooling); addition keeps the main branch.
_CHANNEL_MODULES = (nn.modules.batchnorm._BatchNorm, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU,
                    nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout, nn.Dropout2d,
                    nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)
_CHANNEL_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardswish, F.silu, F.gelu, operator.add, torch.add,
                      F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, "relu", "add"}


def feeding_conv(model: nn.Module, node: fx.Node, channels: int) -> str | None:
    """The conv whose output channels become the channels of ``node``'s output, walking back through per-channel
    steps (batch norm, activations, pooling) and, at an addition, its first operand (torchvision's residual blocks
    write ``out += identity``); None where another operation (a concatenation, a product...) comes first."""
    modules = dict(model.named_modules())
    for _ in range(64):
        if node.op == "call_module":
            module = modules[node.target]
            if isinstance(module, nn.Conv2d):
                return node.target if module.out_channels == channels else None
            if not isinstance(module, _CHANNEL_MODULES):
                return None
        elif not (node.op in ("call_function", "call_method") and node.target in _CHANNEL_FUNCTIONS):
            return None
        inputs = [arg for arg in node.args if isinstance(arg, fx.Node)]
        if not inputs:
            return None
        node = inputs[0]
    return None


@dataclass
class LayerTable:
    """What a traced model offers: layer -> step, layer -> conv for L1, layers refused with the reason, and each
    offered layer's output shape [C, H, W]."""

    layers: dict[str, str]
    unit_weights: dict[str, str]
    refused: dict[str, str]
    shapes: dict[str, tuple]


def layer_table(model: nn.Module, example: torch.Tensor) -> LayerTable:
    """Every module of ``model`` (in ``named_modules`` order, by network position) as a layer or refused with why."""
    traced = trace(model)
    shapes = output_shapes(model, traced, example)
    position = {node: i for i, node in enumerate(traced.graph.nodes)}
    cuts = set(traced.cuts)
    offered, unit_weights, refused, layer_shapes = [], {}, {}, {}
    for name, _ in model.named_modules():
        node = traced.outputs.get(name)
        if node is None:
            continue  # never called in forward, or the model itself
        shape = shapes.get(node)
        if shape is None or len(shape) != 4:
            refused[name] = f"its output is not a [batch, channels, height, width] map (shape {shape})"
        elif node not in cuts:
            refused[name] = ("its output is not the only value passed on to the rest of the network (a skip "
                             "connection, concatenation or other branch crosses it, as inside a residual block)")
        else:
            offered.append((position[node], name, node))
            layer_shapes[name] = shape[1:]
            conv = feeding_conv(model, node, shape[1])
            if conv is not None:
                unit_weights[name] = conv
    offered.sort(key=lambda item: item[0])  # stable: a parent module before its last child at the same node
    return LayerTable({name: node.name for _, name, node in offered}, unit_weights, refused, layer_shapes)
