"""The paper's models: checkpoints in each published format load exactly, the named sequence reproduces the
network, and every bad weights file is refused with a one-line error that says what to do."""

from __future__ import annotations

import urllib.error

import pytest
import torch
import torchvision

from compute.errors import UserError
from compute.models.registry import get_spec, model_names

ZOO_NAMES = ["alexnet-places", "resnet18-places", "alexnet-imagenet", "resnet18-imagenet"]


@pytest.fixture(scope="module")
def zoo():
    model_names()  # load the built-ins the way the app does, before touching the module itself
    from compute.models import zoo

    return zoo


@pytest.fixture(autouse=True)
def offline_hub(tmp_path, monkeypatch):
    """An empty hub cache per test, and no network: a download attempt fails as it does offline."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)


def random_state(arch: str, classes: int) -> dict[str, torch.Tensor]:
    """A randomly initialised network's state, batch-norm statistics included, so loading buffers is checked too."""
    torch.manual_seed(classes)
    model = getattr(torchvision.models, arch)(num_classes=classes)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 1.5)
    return {key: value.clone() for key, value in model.state_dict().items()}


def places_format(state: dict, arch: str) -> dict:
    """As CSAIL saved them in 2017: DataParallel prefixes (AlexNet wrapped only ``features``, so mid-key), and no
    batch-norm ``num_batches_tracked`` (older PyTorch)."""
    if arch == "alexnet":
        renamed = {key.replace("features.", "features.module.", 1): value for key, value in state.items()}
    else:
        renamed = {f"module.{key}": value for key, value in state.items() if "num_batches_tracked" not in key}
    return {"epoch": 90, "arch": arch, "state_dict": renamed, "best_prec1": 50.0}


def save(obj, path, legacy: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


@pytest.fixture(scope="module")
def resnet_places_file(tmp_path_factory):
    state = random_state("resnet18", 365)
    path = save(places_format(state, "resnet18"), tmp_path_factory.mktemp("ckpt") / "resnet18_places365.pth.tar",
                legacy=True)
    return path, state


def assert_same_parameters(model, state):
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


def assert_sequence_matches(spec, model, size: int):
    """The sequence gives the model's logits; each layer's step output has one channel per row of the unit_weights
    conv, is read after the ReLU, and the tail after it gives the logits again without writing into it (so an
    engine may cache the layer output and run the tail on it many times)."""
    sequence = spec.to_sequence(model)
    assert all(a is b for a, b in zip(sequence.parameters(), model.parameters()))
    image = torch.randn(1, 3, size, size)
    with torch.no_grad():
        expected = model(image)
        assert torch.allclose(sequence(image), expected, rtol=1e-5, atol=1e-5)
        x = image
        outputs = {}
        for name, step in sequence.named_children():
            x = step(x)
            outputs[name] = x.clone()
    assert expected.shape == (1, spec.num_classes)
    modules = dict(model.named_modules())
    steps = list(outputs)
    for layer, step in spec.layers.items():
        units = modules[spec.unit_weights[layer]].weight.shape[0]
        assert outputs[step].shape[1] == units, layer
        assert (outputs[step] >= 0).all(), f"{layer} is read after the ReLU"
        cached = outputs[step].clone()
        with torch.no_grad():
            logits = sequence[steps.index(step) + 1:](cached)
        assert torch.equal(cached, outputs[step]), f"the tail after {layer} writes into its input"
        assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-5), layer


def test_zoo_registers_alongside_demo():
    names = model_names()
    assert set(ZOO_NAMES) <= set(names) and "demo" in names
    for name in ZOO_NAMES:
        spec = get_spec(name)
        assert spec.preprocess.resize == 256 and spec.preprocess.crop == 224
        assert spec.dataset == name.split("-")[1].replace("places", "places365")
        assert set(spec.default_layers) <= set(spec.layers)
    assert "NOT the same" in get_spec("resnet18-places").ablation_note
    assert get_spec("alexnet-places").layers["conv5"] == "features_11"
    assert get_spec("resnet18-imagenet").unit_weights["layer4"] == "layer4.1.conv2"


def test_alexnet_places_checkpoint_from_data_dir(tmp_path, zoo):
    spec = get_spec("alexnet-places")
    state = random_state("alexnet", 365)
    path = save(places_format(state, "alexnet"), tmp_path / "data" / "weights" / "alexnet_places365.pth.tar",
                legacy=True)
    model, provenance = spec.load(None, tmp_path / "data")
    assert not model.training
    assert_same_parameters(model, state)
    assert provenance == {"weights_path": str(path), "weights_sha256": zoo.sha256_of(path)}
    assert_sequence_matches(spec, model, 224)


def test_resnet_places_checkpoint_without_batch_counters(resnet_places_file, tmp_path):
    path, state = resnet_places_file
    spec = get_spec("resnet18-places")
    model, provenance = spec.load(path, tmp_path)
    assert_same_parameters(model, {k: v for k, v in state.items() if "num_batches_tracked" not in k})
    assert provenance["weights_path"] == str(path)
    assert_sequence_matches(spec, model, 64)


def test_resnet_imagenet_from_hub_cache(tmp_path, zoo):
    spec = get_spec("resnet18-imagenet")
    state = random_state("resnet18", 1000)
    path = save(state, zoo.hub_checkpoint("resnet18-f37072fd.pth"))
    assert str(path).startswith(str(tmp_path / "torch-home"))
    model, provenance = spec.load(None, tmp_path / "empty-data")
    assert_same_parameters(model, state)
    assert provenance["weights_path"] == str(path)
    assert_sequence_matches(spec, model, 64)


def test_alexnet_imagenet_user_checkpoint_with_model_key_and_prefix(tmp_path):
    spec = get_spec("alexnet-imagenet")
    state = random_state("alexnet", 1000)
    path = save({"model": {f"module.{key}": value for key, value in state.items()}, "step": 7}, tmp_path / "mine.pt")
    model, provenance = spec.load(path, tmp_path)
    assert_same_parameters(model, state)
    assert provenance["weights_path"] == str(path)


def test_lookup_order(tmp_path, zoo):
    source = zoo.ZOO["resnet18-places"][3]
    data = tmp_path / "data"
    hub = save({}, zoo.hub_checkpoint(source.file))
    assert zoo.find_weights("resnet18-places", source, None, data) == hub
    local = save({}, data / "weights" / source.file)
    assert zoo.find_weights("resnet18-places", source, None, data) == local
    given = save({}, tmp_path / "given.pt")
    assert zoo.find_weights("resnet18-places", source, given, data) == given


def test_download_lands_in_hub_cache(tmp_path, zoo, monkeypatch, resnet_places_file):
    fetched = []

    def fake_download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, hash_prefix))
        with open(resnet_places_file[0], "rb") as source, open(dst, "wb") as target:
            target.write(source.read())

    monkeypatch.setattr(torch.hub, "download_url_to_file", fake_download)
    model, provenance = get_spec("resnet18-places").load(None, tmp_path / "data")
    assert fetched == [("http://places2.csail.mit.edu/models_places365/resnet18_places365.pth.tar", None)]
    assert provenance["weights_path"] == str(zoo.hub_checkpoint("resnet18_places365.pth.tar"))
    assert zoo.ZOO["alexnet-imagenet"][3].hash_prefix == "7be5be79"  # torch.hub checks it on download


def test_missing_offline_names_file_source_and_places(tmp_path, zoo):
    with pytest.raises(UserError) as error:
        get_spec("alexnet-places").load(None, tmp_path / "data")
    message = str(error.value)
    assert "alexnet_places365.pth.tar" in message
    assert "http://places2.csail.mit.edu/models_places365/alexnet_places365.pth.tar" in message
    assert str(tmp_path / "data" / "weights") in message and str(zoo.hub_checkpoint("x").parent) in message
    assert "--weights" in message and "\n" not in message
    with pytest.raises(UserError, match="resnet18-f37072fd.pth.*download.pytorch.org"):
        get_spec("resnet18-imagenet").load(None, tmp_path / "data")


def test_missing_weights_argument(tmp_path):
    with pytest.raises(UserError, match=r"weights file .*nope.pt not found: check the --weights path"):
        get_spec("resnet18-places").load(tmp_path / "nope.pt", tmp_path)


@pytest.mark.parametrize("content", ["truncated", "truncated-zip", "text", "jpeg", "empty"])
def test_unreadable_files(tmp_path, resnet_places_file, content):
    data = resnet_places_file[0].read_bytes()
    if content == "truncated-zip":
        save(torch.load(resnet_places_file[0], weights_only=True), tmp_path / "zip.pt")
        data = (tmp_path / "zip.pt").read_bytes()
    payload = {"truncated": data[: len(data) // 2], "truncated-zip": data[: len(data) // 2],
               "text": b"not a checkpoint\n", "jpeg": b"\xff\xd8\xff\xe0" + bytes(200), "empty": b""}[content]
    path = tmp_path / "bad.pth.tar"
    path.write_bytes(payload)
    with pytest.raises(UserError, match=r"cannot read weights file .*bad.pth.tar .*truncated or not a PyTorch"):
        get_spec("resnet18-places").load(path, tmp_path)


def test_pickled_module_is_refused(tmp_path):
    path = save({"model": torch.nn.Linear(2, 2)}, tmp_path / "whole-model.pt")
    with pytest.raises(UserError, match="holds a pickled torch.nn.modules.linear.Linear.*state_dict"):
        get_spec("resnet18-places").load(path, tmp_path)


def test_not_a_state_dict(tmp_path):
    path = save({"epoch": 3, "arch": "resnet18"}, tmp_path / "meta.pt")
    with pytest.raises(UserError, match="holds no state dict"):
        get_spec("resnet18-places").load(path, tmp_path)


def test_wrong_class_count_names_the_right_model(tmp_path):
    path = save(random_state("resnet18", 1000), tmp_path / "imagenet.pt")
    with pytest.raises(UserError) as error:
        get_spec("resnet18-places").load(path, tmp_path)
    assert "has 1000 classes but resnet18-places needs 365: use --model resnet18-imagenet" in str(error.value)
    path = save(random_state("resnet18", 10), tmp_path / "ten.pt")
    with pytest.raises(UserError, match="has 10 classes but resnet18-imagenet needs 1000: pass weights trained on"):
        get_spec("resnet18-imagenet").load(path, tmp_path)


def test_other_architecture(resnet_places_file, tmp_path):
    with pytest.raises(UserError, match="is a resnet18 checkpoint but alexnet-places is alexnet: use --model "
                                        "resnet18-places, or the right file"):
        get_spec("alexnet-places").load(resnet_places_file[0], tmp_path)


@pytest.mark.parametrize("change, expected", [
    ("extra", r"1 unexpected keys \(fc2.weight\)"),
    ("missing", r"1 missing keys \(layer4.1.conv2.weight\)"),
    ("shape", r"size mismatch for layer1.0.conv1.weight"),
])
def test_keys_and_shapes_that_do_not_fit(tmp_path, change, expected):
    state = random_state("resnet18", 365)
    if change == "extra":
        state["fc2.weight"] = torch.zeros(2, 2)
    elif change == "missing":
        del state["layer4.1.conv2.weight"]
    else:
        state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    path = save({"state_dict": state}, tmp_path / "odd.pt")
    with pytest.raises(UserError, match=expected) as error:
        get_spec("resnet18-places").load(path, tmp_path)
    assert "\n" not in str(error.value)
