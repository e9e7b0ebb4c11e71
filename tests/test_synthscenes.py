"""SynthScenes: deterministic by seed, balanced, readable by the file-list and Broden readers, and never left half
written."""

from __future__ import annotations

import csv
import json
from collections import Counter

import cv2
import numpy as np
import pytest

from compute.data import synthscenes
from compute.data.filelist import read_categories, read_file_list
from compute.errors import UserError

SMALL = dict(train_per_class=2, val_per_class=3, progress=False)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    return synthscenes.generate(tmp_path_factory.mktemp("synth") / "seed7", seed=7, **SMALL)


def pixels(root) -> list[np.ndarray]:
    files, _ = read_file_list(root / "train.txt")
    return [cv2.imread(str(root / "images" / f), cv2.IMREAD_UNCHANGED) for f in files]


def test_same_seed_same_bytes_other_seed_other_pixels(generated, tmp_path):
    again = synthscenes.generate(tmp_path / "again", seed=7, **SMALL)
    for name in ("index.csv", "label.csv", "category.csv", "c_object.csv", "train.txt", "val.txt", "settings.json"):
        assert (again / name).read_bytes() == (generated / name).read_bytes(), name
    assert all(np.array_equal(a, b) for a, b in zip(pixels(generated), pixels(again)))
    other = synthscenes.generate(tmp_path / "other", seed=8, **SMALL)
    assert (other / "label.csv").read_bytes() != (generated / "label.csv").read_bytes()
    assert not any(np.array_equal(a, b) for a, b in zip(pixels(generated), pixels(other)))


def test_class_files_parse_and_validation_is_balanced(generated):
    assert read_categories(generated / "categories.txt") == list(synthscenes.CLASSES)
    assert len(synthscenes.CLASSES) == 24
    assert (generated / "categories.txt").read_text().splitlines()[0] == "/b/bedroom 0"
    for split, per_class in (("train", 2), ("val", 3)):
        files, labels = read_file_list(generated / f"{split}.txt")
        assert Counter(labels.tolist()) == {c: per_class for c in range(24)}
        for name, label in zip(files, labels):
            assert name.split("/")[:2] == [split, synthscenes.CLASSES[label]]
            image = cv2.imread(str(generated / "images" / name))
            assert image.shape == (64, 64, 3)
    settings = json.loads((generated / "settings.json").read_text())
    assert settings["seed"] == 7 and settings["images"] == {"train": 48, "val": 72}


def test_broden_tables_are_consistent(generated):
    with open(generated / "index.csv", newline="") as f:
        index = list(csv.DictReader(f))
    assert list(index[0]) == ["image", "split", "ih", "iw", "sh", "sw", *synthscenes.CATEGORIES]
    assert Counter(r["split"] for r in index) == {"train": 48, "val": 72}
    assert all(r["object"].endswith("_object.png") and r["scene"].isdigit() for r in index)
    with open(generated / "label.csv", newline="") as f:
        labels = list(csv.DictReader(f))
    assert [int(r["number"]) for r in labels] == list(range(1, len(synthscenes.CONCEPTS) + 1))
    assert len({r["name"] for r in labels}) == len(labels)
    with open(generated / "category.csv", newline="") as f:
        categories = {r["name"]: r for r in csv.DictReader(f)}
    assert list(categories) == list(synthscenes.CATEGORIES)
    for name, row in categories.items():
        with open(generated / f"c_{name}.csv", newline="") as f:
            codes = list(csv.DictReader(f))
        numbers = [int(r["number"]) for r in codes]
        assert numbers == list(range(int(row["first"]), int(row["last"]) + 1))
        assert [int(r["code"]) for r in codes] == list(range(1, int(row["count"]) + 1))
        assert all(labels[n - 1]["category"].startswith(f"{name}(") for n in numbers)
    # Every image shows its class as scene label and exactly one texture.
    scene_numbers = {int(r["number"]): r["name"] for r in labels if r["category"].startswith("scene(")}
    for r in index:
        assert scene_numbers[int(r["scene"])] == r["image"].split("/")[1] + "-s"
        assert len(r["texture"].split(";")) == 1


def test_concept_counts():
    counts = Counter(category for _, category in synthscenes.CONCEPTS)
    assert counts["object"] >= 20 and counts["scene"] == 24 and counts["color"] == 11
    assert counts["part"] >= 5 and counts["texture"] >= 6 and counts["material"] >= 5
    # The paper's phenomenon needs objects characteristic of several classes.
    owners = Counter(item.name for scene in synthscenes.SCENES for item in {i.name: i for i in scene.items}.values())
    shared = [name for name, n in owners.items() if n >= 2]
    assert {"bed", "car", "boat", "tree", "person"} <= set(shared) and len(shared) >= 10


def test_topmost_shape_owns_every_map():
    canvas = synthscenes.Canvas(16)
    canvas.begin("car", "metal")
    canvas.rect(0, 0, 10, 10, (200, 0, 0), part="wheel")
    canvas.begin("person", "fabric")
    canvas.rect(5, 5, 15, 15, (0, 0, 200))
    number = synthscenes.LABEL_NUMBER
    assert canvas.maps["object"][2, 2] == number["object", "car"]
    assert canvas.maps["part"][2, 2] == number["part", "wheel"]
    assert canvas.maps["material"][2, 2] == number["material", "metal"]
    assert canvas.maps["object"][7, 7] == number["object", "person"]
    assert canvas.maps["part"][7, 7] == 0 and canvas.maps["material"][7, 7] == number["material", "fabric"]
    assert canvas.rgb[7, 7].tolist() == [0, 0, 200]


def test_second_call_returns_without_rewriting(generated, monkeypatch):
    before = {p: p.stat().st_mtime_ns for p in generated.rglob("*.csv")}
    monkeypatch.setattr(synthscenes, "_build", lambda *a, **k: pytest.fail("regenerated a complete data set"))
    assert synthscenes.generate(generated, seed=7, **SMALL) == generated
    assert {p: p.stat().st_mtime_ns for p in generated.rglob("*.csv")} == before


def test_failure_leaves_no_partial_directory(tmp_path, monkeypatch):
    calls = []
    real = synthscenes.render

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) > 5:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(synthscenes, "render", failing)
    with pytest.raises(RuntimeError, match="simulated"):
        synthscenes.generate(tmp_path / "ds", seed=1, train_per_class=1, val_per_class=1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_other_settings_replace_and_foreign_folders_are_refused(tmp_path):
    root = synthscenes.ensure(tmp_path, seed=2, train_per_class=1, val_per_class=1, progress=False)
    assert root == (tmp_path / "datasets" / "synthscenes-seed2").resolve()
    synthscenes.ensure(tmp_path, seed=2, train_per_class=2, val_per_class=1, progress=False)
    assert json.loads((root / "settings.json").read_text())["train_per_class"] == 2
    assert [p.name for p in root.parent.iterdir()] == [root.name]  # no temporary or old copies left
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a SynthScenes data set"):
        synthscenes.generate(foreign, train_per_class=1, val_per_class=1, progress=False)


def test_mask_encoding_round_trips_large_labels():
    labels = np.array([[0, 1, 255], [256, 300, 70000 % 65536]], np.int32)
    bgr = synthscenes.encode_labels(labels)
    assert np.array_equal(bgr[:, :, 2].astype(np.int32) + 256 * bgr[:, :, 1].astype(np.int32), labels)
    assert not bgr[:, :, 0].any()
