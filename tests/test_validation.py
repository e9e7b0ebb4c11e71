"""Validation sets in each published layout: labels and class names line up, --per-class keeps the first images of
each class, and every missing or broken piece is named in a one-line error."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from compute.data.validation import class_names, default_workers, load_validation, make_loader
from compute.errors import UserError
from compute.models.registry import Preprocess

SMALL = Preprocess(resize=20, crop=16)
PLACES_CATEGORIES = ["/a/airfield 0", "/b/bedroom 1", "/k/kitchen 2"]
PLACES_LABELS = [2, 0, 1, 0, 2, 1, 0]  # interleaved, as in places365_val.txt


def write_jpeg(path, shade: int):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (24, 30), (shade, 255 - shade, 40)).save(path, "JPEG")


def write_file_list_set(root, image_dir: str, list_file: str, categories: str):
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for number, label in enumerate(PLACES_LABELS, start=1):
        name = f"Places365_val_{number:08d}.jpg"
        write_jpeg(root / image_dir / name, 30 * number)
        lines.append(f"{name} {label}")
    (root / list_file).write_text("\n".join(lines) + "\n")
    (root / categories).write_text("\n".join(PLACES_CATEGORIES) + "\n")
    return root


@pytest.fixture
def places(tmp_path):
    return write_file_list_set(tmp_path / "places365", "val_256", "places365_val.txt", "categories_places365.txt")


WNIDS = ["n01440764", "n01443537", "n01484850"]


@pytest.fixture
def folder(tmp_path):
    """ImageFolder layout: two images in each of three wnid folders."""
    root = tmp_path / "imagenet" / "val"
    for c, wnid in enumerate(WNIDS):
        for i in range(2):
            write_jpeg(root / wnid / f"ILSVRC2012_val_{c}{i}.JPEG", 40 * c + i)
    return root


def test_places_labels_names_and_items(places):
    val = load_validation("places365", places, SMALL, num_classes=3)
    assert val.class_names == ["airfield", "bedroom", "kitchen"]
    assert val.root == places / "val_256"
    assert val.files[0] == "Places365_val_00000001.jpg" and len(val.files) == 7
    assert val.labels.dtype == np.int64 and val.labels.tolist() == PLACES_LABELS
    image, label, index = val.dataset[4]
    assert image.shape == (3, 16, 16) and label == 2 and index == 4
    assert len(val.fingerprint) == 64
    assert load_validation("places365", places, SMALL).fingerprint == val.fingerprint


def test_places_images_beside_the_lists(places):
    for image in (places / "val_256").iterdir():
        image.rename(places / image.name)
    (places / "val_256").rmdir()
    val = load_validation("places365", places, SMALL)
    assert val.root == places and val.dataset[0][0].shape == (3, 16, 16)


def test_per_class_keeps_first_images_of_each_class(places):
    full = load_validation("places365", places, SMALL)
    val = load_validation("places365", places, SMALL, per_class=1)
    assert val.files == ["Places365_val_00000001.jpg", "Places365_val_00000002.jpg", "Places365_val_00000003.jpg"]
    assert val.labels.tolist() == [2, 0, 1]
    assert [val.dataset[i][2] for i in range(3)] == [0, 1, 2]
    assert val.fingerprint != full.fingerprint


@pytest.mark.parametrize("piece, expected", [
    ("places365_val.txt", r"places365_val.txt not found in .*filelist_places365-standard.tar"),
    ("categories_places365.txt", r"categories_places365.txt not found in .*filelist_places365-standard.tar"),
    ("val_256/Places365_val_00000003.jpg",
     r"1 of 7 listed images are missing .*Places365_val_00000003.jpg.*val_256.tar"),
])
def test_places_missing_pieces(places, piece, expected):
    (places / piece).unlink()
    with pytest.raises(UserError, match=expected):
        load_validation("places365", places, SMALL)


def test_places_class_count_and_label_range(places):
    with pytest.raises(UserError, match="has 3 classes but the model predicts 365"):
        load_validation("places365", places, SMALL, num_classes=365)
    (places / "places365_val.txt").write_text("Places365_val_00000001.jpg 3\n")
    with pytest.raises(UserError, match="label 3 of Places365_val_00000001.jpg is outside the 3 classes"):
        load_validation("places365", places, SMALL)


def test_missing_folder_and_unknown_kind(tmp_path, places):
    with pytest.raises(UserError, match="validation folder .*nowhere not found"):
        load_validation("places365", tmp_path / "nowhere", SMALL)
    with pytest.raises(UserError, match="unknown validation data kind 'coco'"):
        load_validation("coco", places, SMALL)


def test_synthscenes_layout(tmp_path):
    root = write_file_list_set(tmp_path / "synth", "images", "val.txt", "categories.txt")
    val = load_validation("synthscenes", root, SMALL, per_class=2)
    assert val.root == root / "images" and val.class_names == ["airfield", "bedroom", "kitchen"]
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    (root / "val.txt").unlink()
    with pytest.raises(UserError, match="val.txt not found .*compute.data.synthscenes"):
        load_validation("synthscenes", root, SMALL)


def test_undecodable_image_is_named(places):
    (places / "val_256" / "Places365_val_00000002.jpg").write_bytes(b"not a jpeg at all")
    val = load_validation("places365", places, SMALL)
    with pytest.raises(UserError, match="Places365_val_00000002.jpg cannot be decoded"):
        val.dataset[1]
    for workers in (0, 1):
        with pytest.raises(UserError) as error:
            list(make_loader(val, batch_size=2, device="cpu", num_workers=workers))
        message = str(error.value)
        assert message.startswith("image ") and "Places365_val_00000002.jpg cannot be decoded" in message
        assert "Traceback" not in message


def test_loader_keeps_file_order(places):
    val = load_validation("places365", places, SMALL)
    batches = list(make_loader(val, batch_size=3, device="cpu"))
    assert torch.cat([b[2] for b in batches]).tolist() == list(range(7))
    assert torch.cat([b[1] for b in batches]).tolist() == PLACES_LABELS
    assert batches[0][0].shape == (3, 3, 16, 16)
    assert 1 <= default_workers("cuda") <= 4 and 0 <= default_workers("cpu") <= 2


def test_imagefolder_sorted_classes(folder):
    val = load_validation("imagefolder", folder, SMALL, num_classes=3)
    assert val.class_names == WNIDS and val.root == folder
    assert val.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert val.files[2] == "n01443537/ILSVRC2012_val_10.JPEG"
    assert load_validation("imagefolder", folder, SMALL, per_class=1).files == [
        f"{wnid}/ILSVRC2012_val_{c}0.JPEG" for c, wnid in enumerate(WNIDS)]
    with pytest.raises(UserError, match="has 3 classes but the model predicts 365"):
        load_validation("imagefolder", folder, SMALL, num_classes=365)


def test_imagenet_labels_follow_the_class_index(folder):
    # The index's order rules, even where it is not the folders' sorted order.
    index = {"0": [WNIDS[2], "goldfinch"], "1": [WNIDS[0], "tench"], "2": [WNIDS[1], "goldfish"]}
    (folder.parent / "imagenet_class_index.json").write_text(json.dumps(index))
    val = load_validation("imagenet", folder, SMALL, num_classes=3)
    assert val.class_names == ["goldfinch", "tench", "goldfish"]
    assert dict(zip(val.files, val.labels.tolist()))["n01484850/ILSVRC2012_val_20.JPEG"] == 0
    assert val.labels.tolist() == [1, 1, 2, 2, 0, 0]
    (folder / "n99999999").mkdir()
    write_jpeg(folder / "n99999999" / "x.JPEG", 3)
    with pytest.raises(UserError, match="n99999999 is not an ImageNet class"):
        load_validation("imagenet", folder, SMALL, num_classes=4)


def test_imagenet_without_index_uses_torchvision_names(folder):
    names = class_names("imagenet")
    assert len(names) == 1000 and names[0] == "tench"
    with pytest.raises(UserError, match="has 3 classes but the model predicts 1000"):
        load_validation("imagenet", folder, SMALL)


def test_imagefolder_errors(tmp_path, folder):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no class folders in .*empty.*ImageFolder layout"):
        load_validation("imagefolder", tmp_path / "empty", SMALL)
    (folder / "n09999999").mkdir()
    with pytest.raises(UserError, match="n09999999"):
        load_validation("imagefolder", folder, SMALL)
    (folder / "n09999999").rmdir()
    (folder / WNIDS[0] / "ILSVRC2012_val_01.JPEG").write_bytes(b"\x00" * 10)
    val = load_validation("imagefolder", folder, SMALL)
    with pytest.raises(UserError, match="ILSVRC2012_val_01.JPEG cannot be decoded"):
        val.dataset[1]
