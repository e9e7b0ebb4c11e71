"""compute.all end to end on the paper's four models, with checkpoints and validation sets in their published
formats, made by the test from randomly initialised networks (no weights can be downloaded here)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from compute.all import main as compute_all
from compute.errors import run_cli
from store import StoreReader, list_stores

FAST = ["--greedy-steps", "0", "--rotations", "0", "--top-k", "2", "--live-layers"]


def offline(url, dst, hash_prefix=None, progress=True):
    import urllib.error

    raise urllib.error.URLError("[Errno -2] Name or service not known")


def he_state(arch: str, classes: int) -> dict:
    """A random network whose activations keep their scale, so ablations change predictions."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=classes)
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return model.state_dict()


def write_jpegs(folder, names, seed):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / name, "JPEG")


PLACES_NAMES = [f"Places365_val_{i:08d}.jpg" for i in range(1, 7)]


@pytest.fixture(scope="module")
def places_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("places365")
    write_jpegs(root / "val_256", PLACES_NAMES, 0)
    write_places_list(root, [5, 17, 5, 300, 17, 300])
    (root / "categories_places365.txt").write_text("".join(f"/c/class_{i:03d} {i}\n" for i in range(365)))
    return root


def write_places_list(root, labels):
    (root / "places365_val.txt").write_text("".join(f"{n} {l}\n" for n, l in zip(PLACES_NAMES, labels)))


def label_with_predictions(root, model_name, weights):
    """Label each image with the network's own prediction, so removing units can cost accuracy."""
    from compute.data.validation import load_validation
    from compute.models import get_spec

    spec = get_spec(model_name)
    model, _ = spec.load(weights, root)
    val = load_validation("places365", root, spec.preprocess)
    with torch.no_grad():
        predicted = model(torch.stack([val.dataset[i][0] for i in range(len(val.labels))])).argmax(1)
    write_places_list(root, predicted.tolist())
    return predicted.tolist()


@pytest.fixture(scope="module")
def imagenet_val(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet") / "val"
    wnids = [f"n{i:08d}" for i in range(1000)]
    for c in (3, 999):
        write_jpegs(root / wnids[c], [f"ILSVRC2012_val_{c}_{i}.JPEG" for i in range(2)], c)
    index = {str(i): [w, f"name_{i}"] for i, w in enumerate(wnids)}
    (root.parent / "imagenet_class_index.json").write_text(json.dumps(index))
    return root


def places_checkpoint(path, arch):
    state = he_state(arch, 365)
    if arch == "alexnet":
        state = {k.replace("features.", "features.module.", 1): v for k, v in state.items()}
    else:
        state = {f"module.{k}": v for k, v in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": 90, "arch": arch, "state_dict": state}, path)


@pytest.mark.parametrize("model, arch, layer", [("alexnet-places", "alexnet", "conv5"),
                                                ("resnet18-places", "resnet18", "layer4")])
def test_places_models_end_to_end(tmp_path, places_val, model, arch, layer):
    checkpoint = tmp_path / "data" / "weights" / f"{arch}_places365.pth.tar"
    places_checkpoint(checkpoint, arch)
    labels = label_with_predictions(places_val, model, checkpoint)
    args = ["--model", model, "--data", str(places_val), "--data-dir", str(tmp_path / "data"), "--layers", layer, *FAST]
    assert compute_all(args) == 0
    store = StoreReader(tmp_path / "data" / "stores" / f"{model}.h5")
    assert store.classes[300] == "class_300" and len(store.classes) == 365
    assert store.read("images/labels").tolist() == labels
    assert store.read_attrs(f"layers/{layer}/ablation")["baseline_overall_acc"] == 1.0
    drop = store.layer(layer, "ablation", "class_drop")
    assert drop.shape == ({"conv5": 256, "layer4": 512}[layer], 365)
    assert drop.max() > 0  # some unit costs some class an image
    assert store.attrs["weights_sha256"] and store.attrs["model"] == model


@pytest.mark.parametrize("model, arch, layer", [("alexnet-imagenet", "alexnet", "conv5"),
                                                ("resnet18-imagenet", "resnet18", "layer4")])
def test_imagenet_models_end_to_end(tmp_path, imagenet_val, model, arch, layer):
    weights = tmp_path / "mine.pth"
    torch.save(he_state(arch, 1000), weights)
    args = ["--model", model, "--data", str(imagenet_val), "--weights", str(weights),
            "--data-dir", str(tmp_path / "data"), "--layers", layer, *FAST]
    assert compute_all(args) == 0
    store = StoreReader(tmp_path / "data" / "stores" / f"{model}.h5")
    assert store.classes[999] == "name_999"
    assert sorted(set(store.read("images/labels").tolist())) == [3, 999]


def test_bad_inputs_leave_nothing_written(tmp_path, places_val, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    data = tmp_path / "data"
    base = ["--model", "alexnet-places", "--data", str(places_val), "--data-dir", str(data), "--layers", "conv5", *FAST]
    assert run_cli(compute_all, base) == 2  # no weights anywhere (offline)
    assert "alexnet_places365.pth.tar" in capsys.readouterr().err
    bad = data / "weights" / "alexnet_places365.pth.tar"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x80\x02truncated")
    assert run_cli(compute_all, base) == 2
    assert "\n" not in capsys.readouterr().err.strip()
    torch.save({"state_dict": he_state("alexnet", 1000)}, bad)
    assert run_cli(compute_all, base) == 2
    assert "1000" in capsys.readouterr().err
    assert list_stores(data / "stores") == []
