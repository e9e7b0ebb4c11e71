"""Any CNN (compute.models.generic): torchvision architectures and a user's factory, split by torch.fx or run through
forward hooks, give the predictions of a naive forward-hook ablation of the whole model, image for image."""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from torch import nn

from compute.lib import ties
from compute.lib.engine import AblationEngine
from compute.errors import UserError
from compute.models import get_spec
from compute.lib.sequence import run_to, tail_of

SIZE = 64
CLASSES = 10
IMAGES = 12


# A user's model, as a lab's code base would define it: reached as python:tests/test_any_model.py:small_net.
class SmallNet(nn.Module):
    def __init__(self, num_classes: int = CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Conv2d(16, 24, 3, padding=1)
        self.act = nn.ReLU()
        self.fc = nn.Linear(24, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.block(x)  # a residual connection: `block` is refused, `stem` and `pool` are clean cuts
        x = self.act(self.head(self.pool(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def small_net(num_classes: int = CLASSES) -> nn.Module:
    return SmallNet(num_classes)


class Untraceable(SmallNet):
    def forward(self, x):
        x = self.stem(x)
        if float(x.mean()) > -1e9:  # data-dependent control flow: torch.fx cannot trace it
            x = x + self.block(x)
        x = self.act(self.head(self.pool(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def untraceable_net(num_classes: int = CLASSES) -> nn.Module:
    return Untraceable(num_classes)


HERE = os.path.relpath(__file__)
CASES = [
    ("torchvision:vgg11", ("features.13", "features")),
    ("torchvision:resnet50", ("layer3", "layer4.2.relu")),
    ("torchvision:densenet121", ("features.transition2", "features.denseblock4")),
    ("torchvision:mobilenet_v3_small", ("features.9", "features")),
    (f"python:{HERE}:small_net", ("stem", "pool")),
    (f"python:{HERE}:untraceable_net", ("stem.2", "act")),
]


def random_model(spec, images: torch.Tensor | None = None, seed: int = 0, classes: int = CLASSES) -> nn.Module:
    """Random weights, batch norm statistics moved off their (0, 1) start; with ``images``, the last layer's bias
    centres each class's logit over them, so that the predictions differ between images (a random network's
    biases otherwise give every image one class) and ablations flip some."""
    from compute.models.generic import last_layer

    torch.manual_seed(seed)
    model = spec.build(classes).eval()
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.uniform_(-0.2, 0.2)
            module.running_var.uniform_(0.5, 2.0)
    if images is not None:
        with torch.no_grad():
            head = last_layer(model)[1]
            head.bias -= model(images).mean(0)
            # Logits of about unit spread: a float32 near-tie (decided in float64 from the layer's float32 output by
            # the engine, from the images by a whole-model reference) stays a rare accident.
            scale = 1 / model(images).std().clamp_min(1e-12)
            head.weight *= scale
            head.bias *= scale
    return model


def make_images(count: int = IMAGES, size: int = SIZE) -> torch.Tensor:
    """Smooth random images with a colour cast each: more varied to a network than white noise."""
    generator = torch.Generator().manual_seed(1)
    smooth = nn.functional.interpolate(torch.randn(count, 3, 8, 8, generator=generator), size=size, mode="bilinear")
    return smooth * 2 + torch.randn(count, 3, 1, 1, generator=generator)


def last_call_zeroing(model: nn.Module, layer: str, unit: int, images: torch.Tensor):
    """A forward hook on ``layer`` that sets channel ``unit`` of its last call's output to zero (the naive way)."""
    module = model.get_submodule(layer)
    calls = []
    probe = module.register_forward_hook(lambda m, a, out: calls.append(1))
    with torch.no_grad():
        model(images[:1])
    probe.remove()
    seen = []

    def zero(m, a, out):
        seen.append(1)
        if len(seen) % len(calls) == 0:  # the last call of each forward
            out = out.clone()
            out[:, unit] = 0
            return out

    return module.register_forward_hook(zero)


def naive_predictions(model, layer, units, images) -> torch.Tensor:
    rows = []
    for unit in units:
        handle = last_call_zeroing(model, layer, unit, images)
        try:
            rows.append(ties.predict(model, images))
        finally:
            handle.remove()
    return torch.stack(rows)


def class_drops(base, pred, labels) -> np.ndarray:
    """(lost - gained) counts per ablation and class: the integers a store's class drops rest on."""
    onehot = torch.nn.functional.one_hot(labels, CLASSES).long()
    right, after = (base == labels).long(), (pred == labels[None]).long()
    return (((right[None] - after) * 1)[..., None] * onehot[None]).sum(1).numpy()


@pytest.mark.parametrize("name,layers", CASES, ids=[case[0].split(":")[-1] for case in CASES])
def test_pipeline_equals_naive_hook_ablation(name, layers):
    spec = get_spec(name, image_size=SIZE)
    assert spec.check_layers(layers) == sorted(layers, key=list(spec.layers).index)
    images = make_images()
    model = random_model(spec, images)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        base = ties.predict(model, images)
    labels = torch.where(torch.arange(IMAGES) % 2 == 0, base, torch.randint(0, CLASSES, (IMAGES,), generator=generator))
    sequence = spec.to_sequence(model).eval()
    steps = [spec.layers[layer] for layer in layers]
    outputs = run_to(sequence, images, steps)  # one prefix run for both layers
    flips = 0
    for layer, step in zip(layers, steps):
        acts = outputs[step]
        strongest = acts.abs().sum((0, 2, 3)).argsort(descending=True)[:3].tolist()  # the likeliest to flip some
        units = sorted({0, acts.shape[1] - 1, *strongest})
        engine = AblationEngine(tail_of(sequence, step))
        masks = torch.zeros(len(units), acts.shape[1], dtype=torch.bool)
        masks[torch.arange(len(units)), torch.tensor(units)] = True
        outcome = engine.evaluate_units(acts, labels, masks)
        assert torch.equal(engine.baseline(acts, labels).pred, base)
        expected = naive_predictions(model, layer, units, images)
        assert torch.equal(outcome.pred, expected), (layer, units)
        assert (class_drops(base, outcome.pred, labels) == class_drops(base, expected, labels)).all()
        flips += int((expected != base[None]).sum())
    assert flips > 0, "no ablation changed a prediction: the comparison would prove nothing"


def test_shortcuts_where_the_tail_allows():
    """resnet50 layer4 -> avgpool -> fc and vgg's conv -> ... -> classifier enter the engine's Linear shortcut."""
    for name, layer in (("torchvision:resnet50", "layer4"), ("torchvision:vgg11", "features.18")):
        spec = get_spec(name, image_size=SIZE)
        model = random_model(spec)
        engine = AblationEngine(tail_of(spec.to_sequence(model), spec.layers[layer]))
        assert engine.has_shortcut, name


def test_layers_are_checked_up_front_with_the_candidates():
    spec = get_spec("torchvision:resnet50", image_size=SIZE)
    with pytest.raises(UserError, match="layer4.1.conv1' cannot be ablated.*choose from conv1, bn1"):
        spec.check_layers(["layer4.1.conv1"])
    with pytest.raises(UserError, match="unknown layer 'layer9'.*layer4"):
        spec.check_layers(["layer9"])
    assert spec.default_layers == ("layer4",)
    assert spec.unit_weights["layer4"] == "layer4.2.conv3"
    assert get_spec("torchvision:vgg11", image_size=SIZE).default_layers == ("features",)
    assert "features.denseblock4" not in get_spec("torchvision:densenet121", image_size=SIZE).unit_weights
    with pytest.raises(UserError, match="not a torchvision classification model"):
        get_spec("torchvision:not_a_net")


def test_untraceable_model_is_said_and_noted(capsys):
    from compute.models import generic

    spec = generic.make_spec(f"python:{HERE}:untraceable_net", image_size=SIZE)
    assert "cannot trace" in capsys.readouterr().err
    assert "forward hook" in spec.ablation_note and not spec.extra["traced"]


def test_checkpoint_sets_the_class_count(tmp_path):
    """A DataParallel checkpoint wrapped as {'state_dict': ...} with 7 classes: the model and spec follow it."""
    spec = get_spec(f"python:{HERE}:small_net", image_size=SIZE)
    source = small_net(7)
    path = tmp_path / "net.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}, "epoch": 3}, path)
    model, provenance = spec.load(path, tmp_path)
    assert spec.num_classes == 7 and model.fc.out_features == 7
    assert torch.equal(model.fc.weight, source.fc.weight)
    assert len(provenance["weights_sha256"]) == 64


# -- end to end -------------------------------------------------------------------------------------------------------
E2E_SIZE = 48


@pytest.fixture(scope="module")
def resnet_store(tmp_path_factory):
    import compute.all
    from compute.data import synthscenes

    data_dir = tmp_path_factory.mktemp("any-model")
    root = synthscenes.generate(data_dir / "datasets" / "synthscenes-seed0", seed=0, train_per_class=1,
                                val_per_class=5, progress=False)
    torch.manual_seed(0)
    state = get_spec("torchvision:resnet50", image_size=SIZE).build(24).state_dict()
    checkpoint = data_dir / "resnet50-synth.pth"  # as a DataParallel training script saves it
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 1}, checkpoint)
    args = ["--model", "torchvision:resnet50", "--weights", str(checkpoint), "--data", str(root),
            "--per-class", "5", "--data-dir", str(data_dir), "--name", "resnet50-synth", "--layers", "layer4",
            "--greedy-steps", "2", "--greedy-classes", "0", "1", "--random-orders", "1", "--rotations", "1",
            "--top-k", "2", "--device", "cpu", "--image-size", str(E2E_SIZE)]
    assert compute.all.main(args) == 0
    return data_dir / "stores" / "resnet50-synth.h5"


def test_end_to_end_resnet50_store_and_pages(resnet_store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from compute.live_session import load_session
    from store import StoreReader
    from tests.views import ROOT

    store = StoreReader(resnet_store)
    assert store.attrs["model"] == "torchvision:resnet50"
    assert "torch.fx" in store.attrs["ablation_note"]
    assert list(store.layers) == ["layer4"]
    assert store.layer("layer4", "ablation", "class_drop").shape == (2048, 24)
    assert store.layer("layer4", "attributes", "l1").shape == (2048,)
    session = load_session(resnet_store, "layer4")  # the app's live work rebuilds the traced tail from the registry
    assert session.engine.has_shortcut
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(resnet_store.parent))
    monkeypatch.setenv("UNIT_ABLATION_DATA", str(resnet_store.parent.parent))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.run()
    assert not at.exception, at.exception
    for page in ("overview", "attributes", "dissection", "greedy", "rotation", "unit"):
        at.switch_page(f"views/{page}.py")
        at.run()
        assert not at.exception, (page, at.exception)
