"""The paper's models: torchvision AlexNet and ResNet18, trained on Places365 (CSAIL checkpoints) or ImageNet
(torchvision weights).

Weights are looked for, in order: ``--weights PATH``, ``<data dir>/weights/<file>``, the torch hub cache
(``torch.hub.get_dir()/checkpoints/<file>``), then downloaded into the hub cache when the machine is online. Every
file goes through ``torch.load(..., weights_only=True)``: a shared checkpoint must not run code.

What a unit is:

* AlexNet conv1..conv5: a channel of the ReLU after the conv. Setting it to zero equals zeroing the conv filter's
  weight and bias (ReLU(0) = 0), as in the paper.
* ResNet18 layer1..layer4: a channel of the stage's output, i.e. of its last BasicBlock's
  ``relu(bn2(conv2(x)) + identity)``. Ablation sets that channel to zero after the final ReLU. This is *not* the same
  as zeroing ``conv2``'s filter: batch norm would add its shift back and the skip connection would still carry the
  channel. ``unit_weights`` still names ``layerN.1.conv2``, the conv that writes the channel, for the L1 attribute.

Default layers: AlexNet conv3..conv5, the layers the paper plots (Fig. 3; conv5 alone for the greedy and rotation
experiments), conv1 and conv2 on request; ResNet18 all four stages, as the paper names none.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torchvision import models

from compute.errors import UserError
from compute.models.registry import ModelSpec, Preprocess, key_mismatch, read_state_dict, register, sha256_of

PLACES_URL = "http://places2.csail.mit.edu/models_places365/{}"

ALEXNET_LAYERS = {"conv1": "features_1", "conv2": "features_4", "conv3": "features_7", "conv4": "features_9",
                  "conv5": "features_11"}
ALEXNET_UNIT_WEIGHTS = {"conv1": "features.0", "conv2": "features.3", "conv3": "features.6", "conv4": "features.8",
                        "conv5": "features.10"}
RESNET_LAYERS = {f"layer{i}": f"layer{i}" for i in range(1, 5)}
RESNET_UNIT_WEIGHTS = {f"layer{i}": f"layer{i}.1.conv2" for i in range(1, 5)}

ALEXNET_NOTE = "unit = ReLU output channel of the conv layer, set to zero (equals zeroing the conv's weight and bias)"
RESNET_NOTE = ("unit = channel of the stage output relu(bn2(conv2(x)) + identity) of its last block, set to zero "
               "after that final ReLU; NOT the same as zeroing conv2's weights, since batch norm's shift and the "
               "skip connection would still pass the channel (unit_weights names conv2 only for the L1 attribute)")


def alexnet_sequence(model: nn.Module) -> nn.Sequential:
    """AlexNet as named steps sharing its modules; ``nn.Flatten`` stands in for the ``torch.flatten`` in forward."""
    steps = [(f"features_{i}", module) for i, module in enumerate(model.features)]
    steps += [("avgpool", model.avgpool), ("flatten", nn.Flatten())]
    steps += [(f"classifier_{i}", module) for i, module in enumerate(model.classifier)]
    return nn.Sequential(OrderedDict(steps))


def resnet_sequence(model: nn.Module) -> nn.Sequential:
    """ResNet as named steps: a stage (layer1..layer4) is one step, so its output is the ablatable layer."""
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4", "avgpool")
    steps = [(name, getattr(model, name)) for name in names]
    steps += [("flatten", nn.Flatten()), ("fc", model.fc)]
    return nn.Sequential(OrderedDict(steps))


@dataclass(frozen=True)
class Source:
    """Where a model's published weights come from: file name, URL, and the hash torch.hub checks on download."""

    file: str
    url: str
    hash_prefix: str | None = None  # torchvision file names carry the sha256 prefix that torch.hub checks


def _torchvision_source(weights) -> Source:
    file = weights.url.rsplit("/", 1)[-1]
    return Source(file, weights.url, torch.hub.HASH_REGEX.search(file).group(1))


ARCHS = {
    "alexnet": dict(build=models.alexnet, to_sequence=alexnet_sequence, layers=ALEXNET_LAYERS,
                    unit_weights=ALEXNET_UNIT_WEIGHTS, default_layers=("conv3", "conv4", "conv5"),
                    note=ALEXNET_NOTE, classifier_key="classifier.6.weight"),
    "resnet18": dict(build=models.resnet18, to_sequence=resnet_sequence, layers=RESNET_LAYERS,
                     unit_weights=RESNET_UNIT_WEIGHTS, default_layers=("layer1", "layer2", "layer3", "layer4"),
                     note=RESNET_NOTE, classifier_key="fc.weight"),
}

# name -> (arch, dataset, classes, weights source)
ZOO = {
    "alexnet-places": ("alexnet", "places365", 365,
                       Source("alexnet_places365.pth.tar", PLACES_URL.format("alexnet_places365.pth.tar"))),
    "resnet18-places": ("resnet18", "places365", 365,
                        Source("resnet18_places365.pth.tar", PLACES_URL.format("resnet18_places365.pth.tar"))),
    "alexnet-imagenet": ("alexnet", "imagenet", 1000,
                         _torchvision_source(models.AlexNet_Weights.IMAGENET1K_V1)),
    "resnet18-imagenet": ("resnet18", "imagenet", 1000,
                          _torchvision_source(models.ResNet18_Weights.IMAGENET1K_V1)),
}


def hub_checkpoint(file: str) -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / file


def download(source: Source, dest: Path) -> None:
    """Fetch into the hub cache; torch writes a temporary file and renames it, so a failed fetch leaves nothing."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    torch.hub.download_url_to_file(source.url, str(dest), hash_prefix=source.hash_prefix, progress=True)


def find_weights(name: str, source: Source, weights: Path | None, data_dir: Path) -> Path:
    """The first weights file that exists, in the documented order; download as the last resort."""
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"weights file {path} not found: check the --weights path")
        return path
    local = Path(data_dir) / "weights" / source.file
    cached = hub_checkpoint(source.file)
    for path in (local, cached):
        if path.is_file():
            return path
    try:
        download(source, cached)
    except Exception as error:  # urllib, socket and hash errors: all mean "not fetched"
        raise UserError(f"weights file {source.file} for {name} not found and could not be downloaded "
                        f"({type(error).__name__}: {error}): download it from {source.url} and put it in "
                        f"{local.parent}/ or {cached.parent}/, or pass --weights PATH") from None
    return cached


def _guess_arch(state: dict) -> str | None:
    for arch, marker in (("alexnet", "features.0.weight"), ("resnet18", "layer1.0.conv1.weight")):
        if marker in state:
            return arch
    return None


def _class_count(arch: str, state: dict) -> int | None:
    """Rows of the last layer's weight: the number of classes the checkpoint was trained on."""
    weight = state.get(ARCHS[arch]["classifier_key"])
    return None if weight is None else weight.shape[0]


def check_fits(name: str, model: nn.Module, state: dict, path: Path) -> None:
    """Refuse a checkpoint of another architecture or class count with a message that says what to use."""
    arch, _, classes, _ = ZOO[name]
    found = _guess_arch(state) or arch
    have = _class_count(found, state)
    fitting = [other for other, entry in ZOO.items() if entry[0] == found and entry[2] == have]
    if found != arch:
        others = fitting or [other for other, entry in ZOO.items() if entry[0] == found]
        raise UserError(f"weights file {path} is a {found} checkpoint but {name} is {arch}: "
                        f"use --model {' or --model '.join(others)}, or the right file")
    if have is not None and have != classes:
        advice = (f"use --model {fitting[0]} or the right file" if fitting
                  else f"pass weights trained on {classes} classes")
        raise UserError(f"checkpoint {path} has {have} classes but {name} needs {classes}: {advice}")
    mismatch = key_mismatch(model, state)
    if mismatch:
        raise UserError(f"weights file {path} does not fit {name} ({arch}): {mismatch}: "
                        f"pass a checkpoint of torchvision's {arch} with {classes} classes")


def _make_loader(name: str):
    arch, _, classes, source = ZOO[name]

    def load(weights: Path | None, data_dir: Path, seed: int = 0):
        """``seed`` belongs to the loaders' common interface: published weights have one."""
        path = find_weights(name, source, weights, data_dir)
        state = read_state_dict(path)
        model = ARCHS[arch]["build"](weights=None, num_classes=classes)
        check_fits(name, model, state, path)
        try:
            model.load_state_dict(state)
        except RuntimeError as error:  # shape mismatches inside the network
            detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line),
                          str(error).splitlines()[0])
            raise UserError(f"weights file {path} does not fit {name}: {detail}") from None
        model.eval()
        return model, {"weights_path": str(path), "weights_sha256": sha256_of(path)}

    return load


def _register(name: str) -> None:
    arch, dataset, classes, source = ZOO[name]
    info = ARCHS[arch]
    register(ModelSpec(
        name=name,
        arch=arch,
        description=f"torchvision {arch} trained on {dataset} ({classes} classes), weights {source.file}",
        num_classes=classes,
        layers=dict(info["layers"]),
        unit_weights=dict(info["unit_weights"]),
        default_layers=info["default_layers"],
        preprocess=Preprocess(resize=256, crop=224),
        build=lambda num_classes=classes, _build=info["build"]: _build(weights=None, num_classes=num_classes),
        to_sequence=info["to_sequence"],
        load=_make_loader(name),
        dataset=dataset,
        ablation_note=info["note"],
        extra={"weights_file": source.file, "weights_url": source.url},
    ))


for _name in ZOO:
    _register(_name)
