"""Specs for any CNN: ``torchvision:NAME`` and ``python:path/to/file.py:factory`` (or ``python:package.module:factory``).

A layer is a module path of ``model.named_modules()`` (``features.28``, ``layer4.1.relu``, ``layer3``); a unit is a
channel of that module's output (of its last call, for a module called several times), ablated by setting it to
zero. Traceable models (``torch.fx``) are cut into steps at their clean cuts (``compute.models.graph``), so the engine
runs only the tail after a layer and uses its shortcuts where the tail starts with pooling and a Linear or a conv;
models fx cannot trace run through forward hooks (``compute.models.hooks``), the whole model per ablation.

Weights: ``--weights FILE`` (a state dict, or one under ``state_dict``, with any ``module.`` prefixes), loaded with
``weights_only``; the class count is the row count of the checkpoint's last layer. Without ``--weights`` a torchvision
model takes its default torchvision weights from ``<data dir>/weights/`` or the torch hub cache (downloaded when the
machine is online); a factory's model is used as the factory returns it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path

import torch
from torch import nn

from compute.errors import UserError
from compute.models import graph, hooks
from compute.models.registry import IMAGENET_MEAN, IMAGENET_STD, ModelSpec, Preprocess, sha256_of

PREFIXES = ("torchvision:", "python:")
DEFAULT_SIZE = 224
TRACED_NOTE = ("unit = channel of the module's output (its last call's), set to zero; the network after the module "
               "is run exactly from the edited output (torch.fx split)")
HOOK_NOTE = ("unit = channel of the module's output, set to zero by a forward hook and the whole model rerun "
             "(torch.fx could not trace this model: naive speed)")


@dataclasses.dataclass(frozen=True)
class GenericSpec(ModelSpec):
    """A spec made from an architecture at run time; ``refused`` says why the other modules are not layers."""

    refused: dict = dataclasses.field(default_factory=dict)

    def check_layers(self, layers) -> list[str]:
        chosen = list(layers) if layers else list(self.default_layers)
        for layer in chosen:
            if layer not in self.layers:
                why = (f"'{layer}' cannot be ablated: {self.refused[layer]}" if layer in self.refused
                       else f"unknown layer '{layer}'")
                raise UserError(f"{why} (model '{self.name}'): choose from {', '.join(self.layers)}")
        steps = {}
        for layer in chosen:
            other = steps.setdefault(self.layers[layer], layer)
            if other != layer:
                raise UserError(f"layers '{other}' and '{layer}' of '{self.name}' are the same output: keep one")
        return sorted(set(chosen), key=list(self.layers).index)


def is_generic(name: str) -> bool:
    """``torchvision:NAME``, ``python:REF:factory`` or a bare ``package.module:factory``."""
    return name.startswith(PREFIXES) or ":" in name


def make_spec(name: str, image_size: int | None = None, mean=None, std=None) -> GenericSpec:
    """The spec of ``torchvision:NAME`` or ``[python:]module_or_file:factory`` with the given preprocessing."""
    if name.startswith("torchvision:"):
        arch = name.split(":", 1)[1]
        factory = _torchvision_builder(arch)
        size, resize = _torchvision_sizes(arch, image_size)
        description = f"torchvision {arch}"
    else:
        factory = _user_factory(name.split(":", 1)[1] if name.startswith("python:") else name)
        arch = getattr(factory, "__name__", "factory")
        size = image_size or DEFAULT_SIZE
        resize = round(size * 256 / 224)
        description = f"model from {name.split(':', 1)[-1]}"
    preprocess = Preprocess(resize=resize, crop=size, mean=_triple(mean, IMAGENET_MEAN, "--mean"),
                            std=_triple(std, IMAGENET_STD, "--std"))
    build = _builder(factory)
    model = build(None).eval()
    layers, unit_weights, refused, shapes, traced = _layers(model, size)
    if not layers:
        raise UserError(f"model '{name}' has no module with a [batch, channels, height, width] output to ablate")
    spec = GenericSpec(
        name=name, arch=arch, description=description, num_classes=classes_of(model),
        layers=layers, unit_weights=unit_weights, default_layers=(_default_layer(layers, shapes, model),),
        preprocess=preprocess, build=build,
        to_sequence=graph.to_sequence if traced else (lambda m, _l=list(layers): hooks.to_sequence(m, _l)),
        load=None, dataset="auto", ablation_note=TRACED_NOTE if traced else HOOK_NOTE,
        extra={"traced": traced, "run_name": run_name(name)}, refused=refused)
    # The class count is the loaded checkpoint's: the loader updates the spec it belongs to.
    object.__setattr__(spec, "load", _loader(spec, build))
    return spec


def with_checkpoint_classes(spec: GenericSpec, path: Path) -> GenericSpec:
    """A copy of ``spec`` predicting the class count of the checkpoint at ``path`` (known before the data set is
    read, so a data set of another class count is refused before any model is built)."""
    from compute.models.registry import read_state_dict

    if not path.is_file():
        raise UserError(f"weights file {path} not found: check the --weights path")
    probe = spec.build(None)
    last = last_layer(probe)
    state = read_state_dict(path)
    key = f"{last[0]}.weight" if last else None
    if key not in state:
        return spec
    copy = dataclasses.replace(spec, num_classes=int(state[key].shape[0]))
    object.__setattr__(copy, "load", _loader(copy, copy.build))
    return copy


def run_name(name: str) -> str:
    """A file-name-safe default run name: ``torchvision-resnet50``, ``python-mynet-build``."""
    tail = name.split(":")
    parts = [Path(part).stem if part.endswith(".py") else part for part in tail]
    return "-".join(part.replace("/", "-").replace(".", "-") for part in parts if part)


def _triple(values, default, option: str) -> tuple[float, float, float]:
    if values is None:
        return tuple(default)
    values = tuple(float(v) for v in values)
    if len(values) != 3:
        raise UserError(f"{option} takes 3 numbers (one per RGB channel), not {len(values)}")
    return values


def _torchvision_builder(arch: str):
    from torchvision import models

    available = models.list_models(module=models)  # image classification architectures only
    if arch not in available:
        raise UserError(f"'{arch}' is not a torchvision classification model: choose one of {', '.join(available)}")
    return lambda **kwargs: models.get_model(arch, weights=None, **kwargs)


def _torchvision_sizes(arch: str, image_size: int | None) -> tuple[int, int]:
    """(crop, resize): the given size (resize in torchvision's 256/224 ratio), else the default weights' transform."""
    if image_size:
        return image_size, round(image_size * 256 / 224)
    try:
        from torchvision import models

        keywords = models.get_model_weights(arch).DEFAULT.transforms.keywords
        crop, resize = keywords.get("crop_size", DEFAULT_SIZE), keywords.get("resize_size", 256)
        return int(crop[0] if isinstance(crop, (list, tuple)) else crop), \
            int(resize[0] if isinstance(resize, (list, tuple)) else resize)
    except Exception:  # an architecture without published weights: the ImageNet default
        return DEFAULT_SIZE, 256


def _user_factory(reference: str):
    """The function ``factory`` of ``path/to/file.py:factory`` or ``package.module:factory``."""
    module_ref, _, function = reference.rpartition(":")
    if not module_ref or not function:
        raise UserError(f"model '{reference}': write python:path/to/file.py:factory or python:package.module:factory")
    if module_ref.endswith(".py"):
        path = Path(module_ref).expanduser().resolve()
        if not path.is_file():
            raise UserError(f"model file {path} not found: check the path in --model python:{reference}")
        module_name = "unit_ablation_user_" + hashlib.sha1(str(path).encode()).hexdigest()[:12]
        module = sys.modules.get(module_name)
        if module is None:
            loader_spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[module_name] = module  # dataclasses and pickling look modules up there
            loader_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_ref)
        except ImportError as error:
            raise UserError(f"cannot import {module_ref} for --model {reference} ({error}): put its package on "
                            f"PYTHONPATH") from None
    factory = getattr(module, function, None)
    if not callable(factory):
        raise UserError(f"{module_ref} has no function '{function}': name the function that returns the nn.Module")
    return factory


def _builder(factory):
    """build(num_classes or None) -> the model; the class count is passed only to a factory that takes it."""
    takes_classes = "num_classes" in inspect.signature(factory).parameters or any(
        p.kind is p.VAR_KEYWORD for p in inspect.signature(factory).parameters.values())

    def build(num_classes=None):
        model = factory(num_classes=num_classes) if takes_classes and num_classes else factory()
        if not isinstance(model, nn.Module):
            raise UserError(f"the model factory returned a {type(model).__name__}, not an nn.Module")
        if num_classes and classes_of(model) not in (None, num_classes):
            raise UserError(f"the factory's model has {classes_of(model)} classes, not {num_classes}, and the factory "
                            f"takes no num_classes argument: add one, or pass weights with {classes_of(model)} classes")
        return model

    return build


def _layers(model: nn.Module, size: int):
    """(layers, unit_weights, refused, traced) from the fx graph, or from forward hooks where fx cannot trace."""
    example = torch.zeros(1, 3, size, size)
    try:
        table = graph.layer_table(model, example)
        return table.layers, table.unit_weights, table.refused, table.shapes, True
    except graph.Untraceable as error:
        print(f"torch.fx cannot trace this model ({error}): ablation runs the whole model through forward hooks "
              f"(naive speed)", file=sys.stderr)
    counts, shapes, order = hooks.call_counts(model, example)
    layers, unit_weights, refused = {}, {}, {}
    modules = dict(model.named_modules())
    for name in order:
        shape = shapes.get(name)
        if counts[name] != 1:
            refused[name] = f"it is called {counts[name]} times in one forward (a hook cannot tell the calls apart)"
        elif shape is None or len(shape) != 4:
            refused[name] = f"its output is not a [batch, channels, height, width] map (shape {shape})"
        else:
            layers[name] = hooks.step_name(name)
            if isinstance(modules[name], nn.Conv2d):
                unit_weights[name] = name
    return layers, unit_weights, refused, {name: shapes[name][1:] for name in layers}, False


_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)


def _default_layer(layers: dict, shapes: dict, model: nn.Module) -> str:
    """The deepest layer, not a pooling module, whose output still has a spatial map (the paper analyses the last
    conv layer: ``layer4`` of a ResNet, ``features`` of a VGG); of several names for one output, the outermost."""
    modules = dict(model.named_modules())
    names = list(layers)
    spatial = [name for name in names if shapes[name][1] * shapes[name][2] > 1
               and not isinstance(modules[name], _POOLS)] or names
    return next(name for name in names if layers[name] == layers[spatial[-1]])


def classes_of(model: nn.Module) -> int | None:
    """Output count of the model's last Linear (or last conv, for a fully convolutional classifier)."""
    last = last_layer(model)
    return None if last is None else int(last[1].weight.shape[0])


def last_layer(model: nn.Module):
    """(name, module) of the last Linear in ``named_modules`` order, else of the last Conv2d; None for neither."""
    for kind in (nn.Linear, nn.Conv2d):
        found = [(name, module) for name, module in model.named_modules() if isinstance(module, kind)]
        if found:
            return found[-1]
    return None


def _loader(spec: GenericSpec, build):
    name = spec.name

    def load(weights: Path | None, data_dir: Path, seed: int = 0):
        """``seed`` belongs to the loaders' common interface; these weights have none."""
        path = Path(weights).expanduser() if weights else None
        if path is None and name.startswith("torchvision:"):
            path = _torchvision_weights(name, spec.arch, data_dir)
        if path is None:  # a factory's model as it comes, fingerprinted by its parameters
            model = build(None).eval()
            provenance = {"weights_path": f"(as returned by {name.split(':', 1)[-1]})",
                          "weights_sha256": state_sha256(model)}
        elif not path.is_file():
            raise UserError(f"weights file {path} not found: check the --weights path")
        else:
            model = load_checkpoint(build, path, name)
            provenance = {"weights_path": str(path), "weights_sha256": sha256_of(path)}
        object.__setattr__(spec, "num_classes", classes_of(model))
        return model, provenance

    return load


def _torchvision_weights(name: str, arch: str, data_dir: Path) -> Path:
    """torchvision's default weights file for ``arch``, from the data dir or the hub cache (or downloaded)."""
    from torchvision import models

    from compute.models.zoo import _torchvision_source, find_weights

    try:
        enum = models.get_model_weights(arch).DEFAULT
    except Exception:
        raise UserError(f"torchvision publishes no weights for {arch}: pass --weights CHECKPOINT") from None
    return find_weights(name, _torchvision_source(enum), None, data_dir)


def load_checkpoint(build, path: Path, name: str) -> nn.Module:
    """The model built for the checkpoint's class count with the checkpoint's weights, in eval mode."""
    from compute.models.registry import key_mismatch, read_state_dict

    state = read_state_dict(path)
    probe = build(None)
    last = last_layer(probe)
    key = f"{last[0]}.weight" if last else None
    classes = int(state[key].shape[0]) if key in state else None
    model = build(classes) if classes and classes != classes_of(probe) else probe
    mismatch = key_mismatch(model, state)
    if mismatch:
        raise UserError(f"weights file {path} does not fit {name}: {mismatch}: pass a state dict of this architecture")
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches inside the network
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line),
                      str(error).splitlines()[0])
        raise UserError(f"weights file {path} does not fit {name}: {detail}") from None
    return model.eval()


def state_sha256(model: nn.Module) -> str:
    """sha256 over the model's parameter names and bytes: the weights' fingerprint when no file holds them."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
