"""AlexNet variants of the paper's Sec. 3.5, trained by ``compute.train`` on an ImageFolder training set.

* ``<alexnet>-bn``: ``BatchNorm2d`` after each of the five convs, before its ReLU.
* ``<alexnet>-dropout``: ``Dropout2d(0.5)`` (whole channels dropped while training) after conv5's ReLU.

for ``<alexnet>`` in alexnet-places (365 classes) and alexnet-imagenet (1000). The baseline is torchvision's AlexNet
itself: weights trained with ``--variant baseline`` load into ``alexnet-places`` / ``alexnet-imagenet`` with
``compute.all --weights FILE``.

Which ablation under batch norm: a unit is the channel of the ReLU output, and ablating it sets that output to zero,
as for every other model here. Zeroing the conv filter's weight and bias, the paper's operation for plain AlexNet, is
no ablation once batch norm follows: the normalised zero becomes (0 - mean) / std * gamma + beta, a constant that the
ReLU passes on wherever it is positive, so the "removed" unit would still feed the next layer a fixed signal. Setting
the ReLU output to zero removes exactly what the next layer receives from the unit, the quantity the paper's
question is about, and it equals the weight zeroing wherever that is an ablation (no batch norm). Dropout sits after
the ablated output and is the identity at evaluation, so it changes nothing there.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torchvision import models

from compute.errors import UserError
from compute.models.demo import weights_file
from compute.models.registry import ModelSpec, Preprocess, register, sha256_of
from compute.models.registry import read_state_dict
from compute.models.zoo import ARCHS, ZOO, alexnet_sequence

VARIANT_KINDS = {"bn": dict(batch_norm=True, channel_dropout=0.0),
                 "dropout": dict(batch_norm=False, channel_dropout=0.5)}
WHAT = {"bn": "batch norm after every conv", "dropout": "channel dropout (p=0.5) after conv5"}
BN_NOTE = ("unit = ReLU output channel of the conv layer (conv -> batch norm -> ReLU), set to zero; not the same as "
           "zeroing the conv's weight and bias, which batch norm would turn into a constant "
           "(beta - gamma * mean / std) passed on by the ReLU")
DROPOUT_NOTE = ("unit = ReLU output channel of the conv layer, set to zero (equals zeroing the conv's weight and "
                "bias); channel dropout after conv5 is the identity at evaluation")


def build_alexnet_variant(num_classes: int, batch_norm: bool = False, channel_dropout: float = 0.0) -> nn.Module:
    """torchvision's AlexNet with batch norm after every conv and/or channel dropout after conv5's ReLU."""
    model = models.alexnet(weights=None, num_classes=num_classes)
    steps: list[nn.Module] = []
    convs = 0
    for module in model.features:
        steps.append(module)
        if isinstance(module, nn.Conv2d):
            convs += 1
            if batch_norm:
                steps.append(nn.BatchNorm2d(module.out_channels))
        if isinstance(module, nn.ReLU) and convs == 5 and channel_dropout > 0:
            steps.append(nn.Dropout2d(channel_dropout))
    model.features = nn.Sequential(*steps)
    return model


def layer_steps(features: nn.Sequential) -> tuple[dict[str, str], dict[str, str]]:
    """(layers, unit_weights) for ``alexnet_sequence``: convN -> the step name of the ReLU after the N-th conv, and
    the module name of that conv."""
    layers, weights = {}, {}
    conv = None
    for index, module in enumerate(features):
        if isinstance(module, nn.Conv2d):
            conv = index
            name = f"conv{len(weights) + 1}"
            weights[name] = f"features.{index}"
        elif isinstance(module, nn.ReLU) and conv is not None:
            layers[name] = f"features_{index}"
            conv = None
    return layers, weights


def _make_loader(base: str, kind: str, classes: int):
    name, variant = f"{base}-{kind}", VARIANT_KINDS[kind]

    def load(weights: Path | None, data_dir: Path, seed: int = 0):
        """Weights trained by compute.train: ``--weights FILE`` or ``<data>/weights/<name>-seed<seed>.pt``. They are
        never trained on the fly (that takes GPU-days)."""
        path = Path(weights).expanduser() if weights else weights_file(name, seed, data_dir)
        if not path.is_file():
            raise UserError(f"no weights for {name} at {path}: train them with `torchrun --nproc-per-node N -m "
                            f"compute.train --model {base} --variant {kind} --data TRAIN_DIR --seed {seed}`, "
                            f"or pass --weights")
        model = build_alexnet_variant(classes, **variant)
        try:
            model.load_state_dict(read_state_dict(path))
        except RuntimeError as error:
            lines = str(error).strip().splitlines()
            detail = lines[1].strip() if len(lines) > 1 else lines[0]
            raise UserError(f"weights file {path} does not fit {name} ({detail}): pass weights trained for it") from None
        model.eval()
        return model, {"weights_path": str(path), "weights_sha256": sha256_of(path)}

    return load


def _register(base: str, kind: str) -> None:
    arch, dataset, classes, _ = ZOO[base]
    variant = VARIANT_KINDS[kind]
    with torch.device("meta"):  # the layout only: no memory, no initialisation (the registry loads at start-up)
        layers, unit_weights = layer_steps(build_alexnet_variant(classes, **variant).features)
    name = f"{base}-{kind}"
    register(ModelSpec(
        name=name,
        arch=arch,
        description=f"torchvision alexnet with {WHAT[kind]}, trained on {dataset} ({classes} classes) by compute.train",
        num_classes=classes,
        layers=layers,
        unit_weights=unit_weights,
        default_layers=ARCHS[arch]["default_layers"],
        preprocess=Preprocess(resize=256, crop=224),
        build=lambda num_classes=classes, _v=variant: build_alexnet_variant(num_classes, **_v),
        to_sequence=alexnet_sequence,
        load=_make_loader(base, kind, classes),
        dataset=dataset,
        ablation_note=BN_NOTE if variant["batch_norm"] else DROPOUT_NOTE,
        extra={"variant": dict(variant), "base": base},
    ))


for _base in ("alexnet-places", "alexnet-imagenet"):
    for _kind in VARIANT_KINDS:
        _register(_base, _kind)
