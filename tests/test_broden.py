"""Broden reader: decodes R + 256*G masks and image-level labels exactly, gives each label its primary category (by
coverage, then image count, then listed order), agrees with SynthScenes' statistics, and names missing or broken
files in one line."""

from __future__ import annotations

import csv
from collections import Counter

import cv2
import numpy as np
import pytest

from compute.data import synthscenes
from compute.data.broden import BrodenDataset, Concept, fingerprint, primary_category
from compute.errors import UserError
from tests.broden_fixture import write_mask

CATEGORY_CSV = """name,first,last,count,frequency
color,1,2,2,2
object,3,300,3,3
part,513,513,1,1
material,4,4,1,1
scene,600,600,1,1
texture,700,701,2,2
"""
LABEL_CSV = """number,name,category,frequency,coverage,syns
1,red-c,color(2),2,0.5,
2,blue-c,color(1),1,0.2,
3,sky,object(1),1,0.5,
4,fabric,material(1);object(1),2,0.3,cloth
300,car,object(1),1,0.1,
513,wheel,part(1),1,0.05,
600,street-s,scene(1),1,1.0,
700,striped,texture(1),1,1.0,
701,dotted,texture(1),1,1.0,
"""
INDEX_CSV = """image,split,ih,iw,sh,sw,color,object,material,part,scene,texture
a/one.jpg,train,8,6,4,3,a/one_color.png,a/one_object.png,,a/one_part_1.png;a/one_part_2.png,600,
b/two.png,val,8,6,4,3,b/two_color.png,,,,,700;701
"""
OBJECT = np.array([[3, 3, 3], [300, 300, 4], [300, 0, 4], [0, 0, 0]], np.int32)
PART_1 = np.array([[0, 0, 0], [513, 0, 0], [0, 0, 0], [0, 0, 0]], np.int32)
PART_2 = np.zeros((4, 3), np.int32)
COLOR_1 = np.full((4, 3), 1, np.int32)
COLOR_2 = np.array([[2, 2, 1], [1, 1, 1], [1, 2, 2], [2, 2, 2]], np.int32)


@pytest.fixture
def tiny(tmp_path):
    (tmp_path / "category.csv").write_text(CATEGORY_CSV)
    (tmp_path / "label.csv").write_text(LABEL_CSV)
    (tmp_path / "index.csv").write_text(INDEX_CSV)
    images = tmp_path / "images"
    write_mask(images / "a/one_object.png", OBJECT)
    write_mask(images / "a/one_part_1.png", PART_1)
    write_mask(images / "a/one_part_2.png", PART_2)
    write_mask(images / "a/one_color.png", COLOR_1)
    write_mask(images / "b/two_color.png", COLOR_2)
    rgb = np.zeros((8, 6, 3), np.uint8)
    rgb[0, 0] = (255, 0, 0)  # red, stored by cv2 as BGR
    assert cv2.imwrite(str(images / "a/one.jpg"), rgb[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert cv2.imwrite(str(images / "b/two.png"), rgb[:, :, ::-1])
    return tmp_path


def test_tiny_broden_decodes_exactly(tiny):
    ds = BrodenDataset(tiny)
    assert len(ds) == 2
    assert ds.categories == ["color", "object", "part", "material", "scene", "texture"]
    assert ds.pixel_categories == ["color", "object", "part"]  # material has no mask in this tiny set
    assert ds.image_categories == ["material", "scene", "texture"]
    assert [c.number for c in ds.concepts] == [1, 2, 3, 4, 300, 513, 600, 700, 701]
    assert ds.concept(4) == Concept(4, "fabric", "material")  # no c_<category>.csv, equal counts: listed first
    assert ds.concept(300) == Concept(300, "car", "object")

    first = ds.labels(0)
    assert [m.dtype for m in first.pixel] == [np.int32] * 4
    assert [m.tolist() for m in first.pixel] == [COLOR_1.tolist(), OBJECT.tolist(), PART_1.tolist(),
                                                 PART_2.tolist()]
    assert first.image_level == [600]
    # fabric (4) sits in the object mask of an image without a material column; its category is material
    assert categories_carried(ds, first) == {"color", "object", "part", "material", "scene"}
    assert first.shape == (4, 3)

    second = ds.labels(1)
    assert [m.tolist() for m in second.pixel] == [COLOR_2.tolist()]
    assert second.image_level == [700, 701]
    assert categories_carried(ds, second) == {"color", "texture"}

    image = ds.image(1)
    assert image.shape == (8, 6, 3) and image.dtype == np.uint8
    assert image[0, 0].tolist() == [255, 0, 0] and image[1, 1].tolist() == [0, 0, 0]


def categories_carried(ds: BrodenDataset, labels) -> set[str]:
    """The primary categories of the labels an image carries, in any column (what dissection calls present)."""
    numbers = set(labels.image_level)
    for m in labels.pixel:
        numbers |= set(np.unique(m[m > 0]).tolist())
    return {ds.concept(n).category for n in numbers}


def test_primary_category_by_coverage_then_images_then_order():
    entries = [("material", 36), ("object", 3)]
    assert primary_category(entries, {}) == "material"  # no coverage: most images
    assert primary_category(entries, {"material": 0.5, "object": 2.0}) == "object"  # coverage first
    assert primary_category(entries, {"material": 1.0, "object": 1.0}) == "material"  # tie: most images
    assert primary_category([("object", 3), ("part", 3)], {}) == "object"  # tie: listed first


def test_coverage_files_decide_the_primary_category(tiny):
    """With a c_<category>.csv for every category, fabric's larger coverage in object makes it an object label."""
    for name in ("color", "object", "part", "material", "scene", "texture"):
        rows = {"object": "1,3,sky,1,0.5\n2,4,fabric,1,0.5\n3,300,car,1,0.1\n", "material": "1,4,fabric,1,0.25\n"}
        (tiny / f"c_{name}.csv").write_text("code,number,name,frequency,coverage\n" + rows.get(name, ""))
    ds = BrodenDataset(tiny)
    assert ds.concept(4) == Concept(4, "fabric", "object")
    assert ds.concept(300) == Concept(300, "car", "object")
    (tiny / "c_texture.csv").unlink()  # coverage from only some categories is not used
    assert BrodenDataset(tiny).concept(4) == Concept(4, "fabric", "material")


def test_split_filter(tiny):
    val = BrodenDataset(tiny, split="val")
    assert len(val) == 1 and val.image_path(0).name == "two.png"
    with pytest.raises(UserError, match="no images of split 'test'.*train, val"):
        BrodenDataset(tiny, split="test")


def test_missing_or_broken_files_are_one_line_errors(tiny, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(UserError, match="Broden index not found at .*index.csv: download broden1_224"):
        BrodenDataset(empty)
    (tiny / "label.csv").write_text(LABEL_CSV.replace("sky,object(1)", "sky,object"))
    with pytest.raises(UserError, match=r"label.csv:4: malformed category cell 'object'"):
        BrodenDataset(tiny)
    (tiny / "label.csv").write_text(LABEL_CSV)
    (tiny / "images/a/one_object.png").unlink()
    ds = BrodenDataset(tiny)
    with pytest.raises(UserError, match="mask .*one_object.png is missing"):
        ds.labels(0)
    (tiny / "index.csv").write_text(INDEX_CSV.replace("split,", "part_of,"))
    with pytest.raises(UserError, match="lacks the column") as caught:
        BrodenDataset(tiny)
    assert "\n" not in str(caught.value)


def test_fingerprint_tracks_the_tables(tiny):
    first = fingerprint(tiny)
    assert fingerprint(tiny) == first and len(first) == 64
    (tiny / "images/b/two.png").unlink()  # images do not enter the fingerprint
    assert fingerprint(tiny) == first
    (tiny / "label.csv").write_text(LABEL_CSV.replace("car", "truck"))
    second = fingerprint(tiny)
    assert second != first
    (tiny / "c_object.csv").write_text("code,number,name,frequency,coverage\n1,4,fabric,1,0.5\n")
    assert fingerprint(tiny) != second  # the c_ files decide primary categories


def test_synthscenes_statistics_match_its_masks(tmp_path):
    root = synthscenes.generate(tmp_path / "synth", seed=3, train_per_class=1, val_per_class=1, progress=False)
    ds = BrodenDataset(root)
    assert ds.categories == list(synthscenes.CATEGORIES)
    assert ds.pixel_categories == ["color", "object", "material", "part"]
    assert ds.image_categories == ["scene", "texture"]
    assert [(c.name, c.category) for c in ds.concepts] == list(synthscenes.CONCEPTS)
    frequency = Counter()
    for i in range(len(ds)):
        labels = ds.labels(i)
        assert {"color", "object", "scene", "texture"} <= categories_carried(ds, labels)
        assert all(m.shape == labels.shape == (64, 64) for m in labels.pixel)
        assert labels.pixel[1].min() > 0  # every pixel belongs to some object or background
        present = set(labels.image_level)
        for m in labels.pixel:
            present |= set(np.unique(m[m > 0]).tolist())
        frequency.update(present)
        scene = ds.concept(labels.image_level[0])
        assert scene.category == "scene" and scene.name == ds.image_path(i).parent.name + "-s"
    with open(root / "label.csv", newline="") as f:
        written = {int(r["number"]): int(r["frequency"]) for r in csv.DictReader(f)}
    assert written == {c.number: frequency[c.number] for c in ds.concepts}
    assert ds.image(0).shape == (64, 64, 3)
    assert len(BrodenDataset(root, split="val")) == 24
