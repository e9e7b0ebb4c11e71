"""One interface for every model: name -> architecture, weights, preprocessing, class names, ablatable layers.

Every architecture is viewed as a flat ``nn.Sequential`` of named steps (``spec.to_sequence(model)``). A layer that
can be ablated is the output of one step; the *prefix* is the steps up to and including it, the *tail* the steps
after it. Ablating a unit means setting that channel of the step's output to zero (after the nonlinearity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from compute.errors import UserError

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

    def as_dict(self) -> dict:
        return {"resize": self.resize, "crop": self.crop, "mean": list(self.mean), "std": list(self.std)}


@dataclass(frozen=True)
class ModelSpec:
    """Everything the pipeline needs to know about one model name.

    build(num_classes) -> randomly initialised nn.Module of the architecture.
    to_sequence(model) -> nn.Sequential of named steps, sharing the model's parameters.
    layers: user-facing layer name -> name of the step whose output is that layer (after the nonlinearity).
    unit_weights: user-facing layer name -> name (in model.named_modules()) of the conv whose output channels are
        the layer's units; its weight rows give the L1 attribute.
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


def get_spec(name: str) -> ModelSpec:
    _load_builtin()
    if name not in _REGISTRY:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _load_builtin() -> None:
    # Imported lazily so that `compute.models.registry` stays importable without torchvision.
    global _BUILTIN_LOADED
    if _BUILTIN_LOADED:
        return
    _BUILTIN_LOADED = True
    from compute.models import demo, variants, zoo  # noqa: F401


def sha256_of(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
