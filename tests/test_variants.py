"""Batch norm and dropout variants: architectures, the ablation under batch norm, training's command line, the
demo suite's plan, and the Variants page."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compute.errors import UserError
from compute.models import get_spec
from store import StoreReader
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["alexnet-places-bn", "alexnet-places-dropout", "alexnet-imagenet-bn",
                                  "alexnet-imagenet-dropout"])
def test_alexnet_variants_keep_units_consistent(name):
    from compute.lib.sequence import run_to

    spec = get_spec(name)
    model = spec.build().eval()
    features = list(model.features)
    kinds = [type(m).__name__ for m in features]
    bn = spec.extra["variant"]["batch_norm"]
    assert kinds.count("BatchNorm2d") == (5 if bn else 0)
    assert kinds.count("Dropout2d") == (0 if bn else 1)
    if not bn:  # channel dropout right after conv5's ReLU
        assert kinds[kinds.index("Dropout2d") - 1] == "ReLU" and kinds.index("Dropout2d") - 2 == 10
    modules = dict(model.named_modules())
    outputs = run_to(spec.to_sequence(model), torch.randn(1, 3, 224, 224), list(spec.layers.values()))
    for layer, step in spec.layers.items():
        conv = modules[spec.unit_weights[layer]]
        position = int(step.split("_")[1])
        assert isinstance(conv, nn.Conv2d) and isinstance(features[position], nn.ReLU)
        # the layer is the ReLU right after its conv (and batch norm): the conv's filters are its units
        assert position - int(spec.unit_weights[layer].split(".")[1]) == (2 if bn else 1)
        assert outputs[step].shape[1] == conv.out_channels and (outputs[step] >= 0).all()
    assert spec.num_classes == model.classifier[-1].out_features


def test_variant_weights_load_and_missing_weights_say_how_to_train(tmp_path):
    spec = get_spec("alexnet-places-dropout")
    with pytest.raises(UserError, match="torchrun --nproc-per-node N -m compute.train --model alexnet-places "
                                        "--variant dropout"):
        spec.load(None, tmp_path)
    model = spec.build()
    path = tmp_path / "weights" / "alexnet-places-dropout-seed0.pt"
    path.parent.mkdir()
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, path)  # a DDP-style checkpoint
    loaded, info = spec.load(None, tmp_path)
    assert torch.equal(loaded.features[10].weight, model.features[10].weight) and not loaded.training
    assert info["weights_path"] == str(path)


def test_batch_norm_makes_output_zeroing_the_ablation():
    """Zeroing a conv filter under batch norm leaves the ReLU output at relu(beta - gamma * mean / std), not zero;
    the tool's ablation (ReLU output set to zero) removes the unit."""
    spec = get_spec("demo-bn")
    model = spec.build().eval()
    torch.manual_seed(0)
    model.bn3.running_mean.uniform_(-1, 0)
    model.bn3.bias.data.uniform_(0.5, 1.0)
    unit = 4
    model.conv3.weight.data[unit] = 0
    model.conv3.bias.data[unit] = 0
    from compute.lib.sequence import run_to

    out = run_to(model, torch.randn(2, 3, 64, 64), ["relu3"])["relu3"][:, unit]
    bn = model.bn3
    constant = torch.relu(bn.bias[unit] - bn.weight[unit] * bn.running_mean[unit]
                          / torch.sqrt(bn.running_var[unit] + bn.eps))
    assert constant > 0.4 and torch.allclose(out, constant.expand_as(out), atol=1e-6)
    assert "set to zero" in spec.ablation_note and "batch norm" in spec.ablation_note


def test_model_names_and_command_line_errors(tmp_path):
    from compute.train import main, model_name

    assert model_name("demo", "bn") == "demo-bn"
    assert model_name("alexnet-imagenet", "dropout") == "alexnet-imagenet-dropout"
    assert model_name("alexnet-places", "baseline") == "alexnet-places"
    with pytest.raises(UserError, match="not resnet"):
        model_name("resnet18-places", "baseline")
    with pytest.raises(UserError, match="unknown model"):
        model_name("demo-bn", "bn")
    with pytest.raises(UserError, match="pass --data TRAIN_DIR"):
        main(["--model", "alexnet-places", "--variant", "bn", "--data-dir", str(tmp_path)])
    with pytest.raises(UserError, match="AlexNet training only"):
        main(["--model", "demo", "--lr", "0.1", "--data-dir", str(tmp_path)])


def test_imagefolder_must_have_one_folder_per_class(tmp_path):
    from PIL import Image

    from compute.train import imagefolder

    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "x.png")
    with pytest.raises(UserError, match="has 3 class folders but alexnet-places-bn predicts 365"):
        imagefolder(tmp_path, get_spec("alexnet-places-bn"), train=True)
    with pytest.raises(UserError, match="not found"):
        imagefolder(tmp_path / "nowhere", get_spec("alexnet-places-bn"), train=True)


def test_suite_plans_variants_then_instances():
    from compute.suite import main, runs

    assert runs(1) == [("demo", 0), ("demo-bn", 0), ("demo-dropout", 0)]
    assert runs(5)[3:] == [("demo", 1), ("demo", 2), ("demo", 3), ("demo", 4)]
    with pytest.raises(UserError):
        runs(0)
    with pytest.raises(UserError, match="picks --model"):
        main(["--name", "x"])


def test_suite_trains_what_is_missing_and_computes_every_store(tiny_run, tmp_path, monkeypatch, capsys):
    """The suite's plan end to end, with training and compute.all recorded (both are tested on their own): only
    missing weights are trained, every store gets its model, seed and the passed-through options."""
    import compute.all
    import compute.train
    from compute import suite

    data_dir = tmp_path / "data"
    (data_dir / "weights").mkdir(parents=True)
    (data_dir / "weights" / "demo-seed0.pt").touch()
    trained, computed = [], []

    def fake_train(model, seed=0, data_dir=None, epochs=None):
        trained.append((model, seed, epochs))

    def fake_all(argv):
        args = compute.all.parse_args(argv)
        computed.append((args.model, args.seed, args.rotations, args.data))
        name = args.model if args.seed == 0 else f"{args.model}-seed{args.seed}"
        (data_dir / "stores").mkdir(exist_ok=True)
        shutil.copy(tiny_run["store"], data_dir / "stores" / f"{name}.h5")
        return 0

    monkeypatch.setattr(compute.train, "train_demo", fake_train)
    monkeypatch.setattr(compute.all, "main", fake_all)
    assert suite.main(["--data-dir", str(data_dir), "--instances", "2", "--epochs", "3", "--rotations", "4",
                       "--data", "SCENES"]) == 0
    assert trained == [("demo-bn", 0, 3), ("demo-dropout", 0, 3), ("demo", 1, 3)]
    assert computed == [("demo", 0, 4, "SCENES"), ("demo-bn", 0, 4, "SCENES"), ("demo-dropout", 0, 4, "SCENES"),
                        ("demo", 1, 4, "SCENES")]
    out = capsys.readouterr().out
    accuracy = StoreReader(tiny_run["store"]).read_attrs("layers/conv3/ablation")["baseline_overall_acc"]
    assert f"demo seed 1: {data_dir / 'stores' / 'demo-seed1.h5'} (validation accuracy {accuracy:.3f}" in out


@pytest.fixture()
def variant_stores(tiny_run, tmp_path, monkeypatch):
    """Two stores to compare: the tiny run as 'demo' with known best IoUs and as 'demo-dropout' without dissection."""
    import h5py

    from store.writer import amend, write_array

    directory = tmp_path / "stores"
    directory.mkdir()
    for name in ("demo", "demo-dropout"):
        shutil.copy(tiny_run["store"], directory / f"{name}.h5")
    with amend(directory / "demo.h5") as h5:
        for layer, units in (("conv3", 96), ("conv4", 96), ("conv5", 128)):
            write_array(h5, f"layers/{layer}/dissection/best_iou", np.linspace(0, 0.1, units, dtype=np.float32))
    with amend(directory / "demo-dropout.h5") as h5:
        for layer in ("conv3", "conv4", "conv5"):
            if f"layers/{layer}/dissection" in h5:
                del h5[f"layers/{layer}/dissection"]
    with h5py.File(directory / "demo.h5", "r") as h5:
        assert "layers/conv5/dissection/best_iou" in h5
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    return directory


def test_variants_page_compares_stores(variant_stores):
    at = open_view("variants", variant_stores / "demo.h5")
    assert at.multiselect[0].value == ["demo", "demo-dropout"]
    assert len(at.get("vega_lite_chart")) == 6  # Fig. 8 curves and Fig. 9 counts, a chart per layer (conv3..conv5)
    table = at.dataframe[0].value
    assert sorted(set(table["store"])) == ["demo", "demo-dropout"] and len(table) == 6
    max_drop = StoreReader(variant_stores / "demo.h5").layer("conv5", "ablation", "class_drop").max(1)
    row = table[(table["store"] == "demo") & (table["layer"] == "conv5")].iloc[0]
    assert row["median max class drop"] == pytest.approx(100 * np.median(max_drop))
    # Fig. 9 counts: units with best IoU above the default threshold 0.04 (linspace 0..0.1 written above)
    counts = at.dataframe[1].value
    assert list(counts.index) == ["demo"] and list(counts.columns) == ["conv3", "conv4", "conv5"]
    assert counts.loc["demo", "conv5"] == int((np.linspace(0, 0.1, 128) > 0.04).sum())
    warnings = [w.value for w in at.warning]
    assert len(warnings) == 3 and all("demo-dropout.h5 has no dissection results" in w for w in warnings)
    at.number_input[0].set_value(0.09).run()
    assert at.dataframe[1].value.loc["demo", "conv3"] == int((np.linspace(0, 0.1, 96) > 0.09).sum())
