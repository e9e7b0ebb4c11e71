"""The embedded demo: a small AlexNet-shaped CNN trained on SynthScenes by ``compute.train``.

Five conv layers (conv1..conv5, ReLU after each, max-pooling after conv1, conv2 and conv5) and three fully connected
layers, like AlexNet at a twelfth of the width, for 64x64 images. Variants as in the paper's Sec. 3.5: ``demo-bn``
(batch norm after every conv) and ``demo-dropout`` (channel dropout p=0.5 on conv5).
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

from torch import nn

from compute.errors import MissingWeights, UserError
from compute.models.registry import ModelSpec, Preprocess, read_state_dict, register, sha256_of

IMAGE_SIZE = 64
NUM_CLASSES = 24  # SynthScenes' scene classes (compute.data.synthscenes.CLASSES)
WIDTHS = (32, 64, 96, 96, 128)
FC_WIDTH = 256
SYNTH_MEAN = (0.5, 0.5, 0.5)
SYNTH_STD = (0.25, 0.25, 0.25)
LAYERS = {f"conv{i}": f"relu{i}" for i in range(1, 6)}
UNIT_WEIGHTS = {f"conv{i}": f"conv{i}" for i in range(1, 6)}


def build_demo(num_classes: int = NUM_CLASSES, batch_norm: bool = False, channel_dropout: float = 0.0) -> nn.Sequential:
    steps: list[tuple[str, nn.Module]] = []
    kernel = {1: (5, 2, 2), 2: (3, 1, 1), 3: (3, 1, 1), 4: (3, 1, 1), 5: (3, 1, 1)}
    in_ch = 3
    for i, out_ch in enumerate(WIDTHS, start=1):
        k, stride, pad = kernel[i]
        steps.append((f"conv{i}", nn.Conv2d(in_ch, out_ch, k, stride, pad)))
        if batch_norm:
            steps.append((f"bn{i}", nn.BatchNorm2d(out_ch)))
        steps.append((f"relu{i}", nn.ReLU(inplace=False)))
        if i == 5 and channel_dropout > 0:
            steps.append(("drop5", nn.Dropout2d(channel_dropout)))
        if i in (1, 2, 5):
            steps.append((f"pool{i}", nn.MaxPool2d(2)))
        in_ch = out_ch
    steps += [
        ("flatten", nn.Flatten()),
        ("drop6", nn.Dropout(0.5)),
        ("fc6", nn.Linear(WIDTHS[-1] * 4 * 4, FC_WIDTH)),
        ("relu6", nn.ReLU()),
        ("drop7", nn.Dropout(0.5)),
        ("fc7", nn.Linear(FC_WIDTH, FC_WIDTH)),
        ("relu7", nn.ReLU()),
        ("fc8", nn.Linear(FC_WIDTH, num_classes)),
    ]
    return nn.Sequential(OrderedDict(steps))


VARIANTS = {
    "demo": dict(batch_norm=False, channel_dropout=0.0),
    "demo-bn": dict(batch_norm=True, channel_dropout=0.0),
    "demo-dropout": dict(batch_norm=False, channel_dropout=0.5),
}


def weights_file(model_name: str, seed: int, data_dir: Path) -> Path:
    return Path(data_dir) / "weights" / f"{model_name}-seed{seed}.pt"


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state dict saved by compute.train (through the one checkpoint reader, registry.read_state_dict)."""
    state = read_state_dict(path)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise UserError(f"weights file {path} does not fit the architecture ({first[1].strip() if len(first) > 1 else first[0]}): "
                        f"pass weights trained for this model") from None


def _make_loader(model_name: str):
    def load(weights: Path | None, data_dir: Path, seed: int = 0):
        model = build_demo(**VARIANTS[model_name])
        path = Path(weights) if weights else weights_file(model_name, seed, data_dir)
        if not path.exists():
            if weights:
                raise UserError(f"weights file {path} not found: check the --weights path")
            raise MissingWeights(f"no trained {model_name} (seed {seed}) in {path.parent}: run `python -m "
                                 f"compute.train --model {model_name} --seed {seed}`", model_name, seed)
        load_checkpoint(model, path)
        model.eval()
        return model, {"weights_path": str(path), "weights_sha256": sha256_of(path)}

    return load


for _name, _kwargs in VARIANTS.items():
    register(ModelSpec(
        name=_name,
        arch="demo",
        description={
            "demo": "small AlexNet-shaped CNN trained on SynthScenes (the embedded default)",
            "demo-bn": "the demo CNN with batch norm after every conv layer",
            "demo-dropout": "the demo CNN with channel dropout (p=0.5) on conv5",
        }[_name],
        num_classes=NUM_CLASSES,
        layers=dict(LAYERS),
        unit_weights=dict(UNIT_WEIGHTS),
        default_layers=("conv3", "conv4", "conv5"),
        preprocess=Preprocess(resize=IMAGE_SIZE, crop=IMAGE_SIZE, mean=SYNTH_MEAN, std=SYNTH_STD),
        build=lambda num_classes=NUM_CLASSES, _k=_kwargs: build_demo(num_classes, **_k),
        to_sequence=lambda model: model,
        load=_make_loader(_name),
        dataset="synthscenes",
        ablation_note=("unit output set to zero after the ReLU; with batch norm this is not the same as zeroing "
                       "the conv weight and bias (BN would add its shift back)") if _kwargs["batch_norm"]
        else "unit output set to zero after the ReLU (equals zeroing its conv weight and bias)",
        extra={"variant": _kwargs},
    ))
