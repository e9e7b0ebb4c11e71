"""One interface for every model: name -> architecture, weights, preprocessing, class names, ablatable layers.

Every architecture is viewed as a flat ``nn.Sequential`` of named steps (``spec.to_sequence(model)``). A layer that
can be ablated is the output of one step; the *prefix* is the steps up to and including it, the *tail* the steps
after it. Ablating a unit means setting that channel of the step's output to zero (after the nonlinearity).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from compute.errors import UserError

if TYPE_CHECKING:
    import torch

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side, centre-crop, normalise: the published evaluation transform."""

    resize: int
    crop: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def transform(self):
        from torchvision import transforms

        return transforms.Compose([
            transforms.Resize(self.resize),
            transforms.CenterCrop(self.crop),
            transforms.ToTensor(),
            transforms.Normalize(self.mean, self.std),
        ])

    def normalise(self, images_u8: torch.Tensor, device=None) -> torch.Tensor:
        """uint8 [B, 3, S, S] (already resized and cropped) -> the model's float input: the one transform validation,
        concept and training images all go through."""
        import torch

        device = images_u8.device if device is None else device
        mean = torch.tensor(self.mean, device=device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=device).view(1, 3, 1, 1)
        return (images_u8.to(device, non_blocking=True).float() / 255.0 - mean) / std

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about one model name.

    build(num_classes) -> randomly initialised nn.Module of the architecture.
    to_sequence(model) -> nn.Sequential of named steps, sharing the model's parameters.
    layers: user-facing layer name -> name of the step whose output is that layer (after the nonlinearity).
    unit_weights: user-facing layer name -> name (in model.named_modules()) of the conv whose output channels are
        the layer's units; its weight rows give the L1 attribute (folded with the batch norm that follows the conv,
        where one does: see ``batch_norm_after``).
    load(weights_path or None, data_dir) -> (model in eval mode, provenance dict with 'weights_path', 'weights_sha256').
    dataset: the default validation data kind ('synthscenes', 'places365', 'imagenet').
    """

    name: str
    arch: str
    description: str
    num_classes: int
    layers: dict[str, str]
    unit_weights: dict[str, str]
    default_layers: tuple[str, ...]
    preprocess: Preprocess
    build: Callable
    to_sequence: Callable
    load: Callable
    dataset: str
    ablation_note: str = "unit output channel set to zero after the ReLU (equals zeroing its conv weight and bias)"
    extra: dict = field(default_factory=dict)

    def check_layers(self, layers) -> list[str]:
        chosen = list(layers) if layers else list(self.default_layers)
        for layer in chosen:
            if layer not in self.layers:
                raise UserError(
                    f"unknown layer '{layer}' for model '{self.name}': choose from {', '.join(self.layers)}")
        # Keep the network's order so stores and pages list layers bottom to top.
        return sorted(set(chosen), key=list(self.layers).index)


_REGISTRY: dict[str, ModelSpec] = {}
_BUILTIN_LOADED = False


def register(spec: ModelSpec) -> ModelSpec:
    _REGISTRY[spec.name] = spec
    return spec


def model_names() -> list[str]:
    _load_builtin()
    return list(_REGISTRY)


def get_spec(name: str, image_size: int | None = None, mean=None, std=None, weights=None) -> ModelSpec:
    """The spec of a registered model, or of any CNN named ``torchvision:NAME`` or ``python:file.py:factory``
    (``compute.models.generic``), whose preprocessing ``image_size`` (the crop), ``mean`` and ``std`` set (ImageNet's
    by default) and whose class count is that of the checkpoint ``weights`` (--weights) where given. The registered
    models fix their own preprocessing and class count (``weights`` is their loader's business)."""
    _load_builtin()
    options = {"image_size": image_size, "mean": _listed(mean), "std": _listed(std)}
    if name in _REGISTRY:
        given = [f"--{key.replace('_', '-')}" for key, value in options.items() if value is not None]
        if given:
            raise UserError(f"{', '.join(given)} apply to torchvision: and python: models; {name} fixes its own "
                            f"preprocessing ({_REGISTRY[name].preprocess.as_dict()})")
        return _REGISTRY[name]
    from compute.models import generic

    if not generic.is_generic(name):
        raise UserError(f"unknown model '{name}': choose one of {', '.join(_REGISTRY)}, torchvision:NAME (any "
                        f"torchvision classification model) or python:path/to/file.py:factory")
    key = (name, *(tuple(value) if isinstance(value, list) else value for value in options.values()))
    if key not in _GENERIC:  # tracing a model takes a second: once per name and options
        _GENERIC[key] = generic.make_spec(name, **options)
    if weights is None:
        return _GENERIC[key]
    return generic.with_checkpoint_classes(_GENERIC[key], Path(weights).expanduser())


_GENERIC: dict[tuple, ModelSpec] = {}


def _listed(values):
    return None if values is None else [float(v) for v in values]


def _load_builtin() -> None:
    # Imported lazily so that `compute.models.registry` stays importable without torchvision.
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from compute.models import demo, variants, zoo  # noqa: F401


def batch_norm_after(model, conv: str) -> str | None:
    """Name (in ``model.named_modules()``) of the batch norm that normalises the output of module ``conv``, or None.

    Read from the model's graph (torch.fx): the conv's output must feed that batch norm and nothing else, e.g.
    ``conv3`` -> ``bn3`` in demo-bn, ``features.0`` -> ``features.1`` in the AlexNet ``-bn`` variants and
    ``layerN.1.conv2`` -> ``layerN.1.bn2`` in ResNet18 (the block's ``relu(bn2(conv2(x)) + identity)``). A model
    that cannot be traced falls back to its layout: the module right after the conv in the same ``nn.Sequential``.
    """
    from torch import fx, nn

    modules = dict(model.named_modules())
    is_bn = lambda name: isinstance(modules.get(name), nn.modules.batchnorm._BatchNorm)  # noqa: E731
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow and other untraceable code: judge by the layout instead
        parent, _, child = conv.rpartition(".")
        container = modules.get(parent)  # "" is the model itself
        if isinstance(container, nn.Sequential):
            names = [name for name, _ in container.named_children()]
            if child in names and names.index(child) + 1 < len(names):
                following = ".".join(filter(None, (parent, names[names.index(child) + 1])))
                return following if is_bn(following) else None
        return None
    found = set()
    for node in graph.nodes:
        if node.op == "call_module" and node.target == conv:
            users = list(node.users)
            if len(users) != 1 or users[0].op != "call_module" or not is_bn(users[0].target):
                return None  # the conv's output also goes elsewhere, or into no batch norm: nothing to fold
            found.add(users[0].target)
    return found.pop() if len(found) == 1 else None


# Where training scripts keep the state dict inside a larger checkpoint ({'state_dict': ..., 'epoch': ...}).
STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")


def state_dict_in(checkpoint, path: Path) -> dict:
    """The state dict (parameter name -> tensor) a loaded checkpoint holds, itself or under one of
    ``STATE_DICT_KEYS``; a UserError naming the file and what it holds instead for anything else (a lone tensor, a
    list, a dict of other things), which ``load_state_dict`` would otherwise meet with a TypeError."""
    import torch

    state = checkpoint
    if isinstance(state, dict):
        state = next((state[key] for key in STATE_DICT_KEYS if isinstance(state.get(key), dict)), state)
    if (isinstance(state, dict) and state
            and all(isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state.items())):
        return state
    raise UserError(f"weights file {path} holds no state dict but {_described(checkpoint)}: expected a mapping of "
                    f"parameter names to tensors, optionally wrapped as {{'state_dict': ...}}; save one with "
                    f"torch.save(model.state_dict(), FILE)")


def _described(value) -> str:
    """A few words on what a checkpoint holds, for the message that refuses it."""
    import torch

    if isinstance(value, torch.Tensor):
        return f"a single tensor of shape {tuple(value.shape)}"
    if isinstance(value, dict):
        if not value:
            return "an empty dict"
        wrapped = next((key for key in STATE_DICT_KEYS if key in value), None)
        if wrapped is not None:
            return f"a dict whose '{wrapped}' holds {_described(value[wrapped])}"
        keys = ", ".join(repr(key) for key in list(value)[:3])
        return f"a dict with keys {keys}{', ...' if len(value) > 3 else ''}"
    if isinstance(value, (list, tuple)):
        return f"a {type(value).__name__} of {len(value)} item{'' if len(value) == 1 else 's'}"
    return f"a {type(value).__name__}"


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, whatever wrapper it came in: a plain state dict, or a dict holding one under
    ``state_dict``/``model_state_dict``/``model``; ``module.`` (DataParallel) removed wherever it sits in a key. The
    one reader of every checkpoint file (weights_only: a shared checkpoint must not run code)."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises several types for truncated or foreign files
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
        if unsafe:
            raise UserError(f"weights file {path} holds a pickled {unsafe.group(1)}, which a safe load refuses (it "
                            f"could run code): re-save it as model.state_dict()") from None
        raise UserError(f"cannot read weights file {path} ({type(error).__name__}): the file is truncated or not a "
                        f"PyTorch checkpoint; fetch or save it again") from None
    state = state_dict_in(state, path)
    return {".".join(part for part in key.split(".") if part != "module"): value for key, value in state.items()}


def key_mismatch(model, state: dict) -> str:
    """How a state dict's keys differ from a model's ("" when they fit): the missing and unexpected keys, a few named.
    Checkpoints saved before PyTorch 0.4 (the CSAIL ResNet) lack batch norm's counters, which it fills in itself."""
    expected = set(model.state_dict())
    missing = {key for key in expected - set(state) if not key.endswith("num_batches_tracked")}
    unexpected = set(state) - expected
    return "; ".join(_few(label, keys) for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys)


def _few(label: str, keys: set[str]) -> str:
    shown = sorted(keys)[:3]
    return f"{len(keys)} {label} keys ({', '.join(shown)}{', ...' if len(keys) > 3 else ''})"
