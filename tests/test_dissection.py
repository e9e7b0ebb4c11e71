"""Network Dissection: IoU equals hand counts (in memory and on a Broden-layout folder with a label in two
categories, under both union rules, never above 1) and a direct transcription of NetDissect-Lite's tally, a
hand-built red detector is found to detect red, thresholds equal numpy's quantile, and the tiny run's store holds
consistent results."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from compute.data.broden import BrodenDataset, ImageLabels
from compute.lib.dissection import (UNION_RULES, ConceptImages, ConceptSource, ConceptTable, IoUTally, best_concepts,
                                    dissect, encode_labels, merge_tallies, merge_thresholds, tally_iou,
                                    threshold_state)
from compute.models.registry import Preprocess
from compute.lib.quantiles import TopQuantile
from compute.lib.sequence import run_to
from store import StoreReader
from tests import broden_fixture
from tests.views import open_view

ROOT = Path(__file__).resolve().parent.parent
PLAIN = Preprocess(resize=64, crop=64, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def hand_table() -> ConceptTable:
    return ConceptTable(names=["red", "blue", "car", "street"], numbers=np.array([1, 2, 3, 4]),
                        categories=["color", "color", "object", "scene"], category_names=["color", "object", "scene"],
                        category_index=np.array([0, 0, 1, 2]))


@pytest.mark.parametrize("rule", UNION_RULES)
def test_iou_equals_hand_counts(rule):
    """Two 2x3 images; image B has no object or scene label, so its active pixels do not enter car's union. Here
    unit 0's active pixels touch a label of every category the image carries, so both rules agree."""
    table = hand_table()
    image_a = ImageLabels([np.array([[1, 1, 2], [2, 2, 0]]), np.array([[3, 0, 0], [3, 3, 0]])], [4], (2, 3))
    image_b = ImageLabels([np.array([[2, 2, 2], [1, 0, 0]])], [], (2, 3))
    # unit 0 active at A: (0,0) (0,2) (1,1); at B: (1,0) (1,1). Unit 1 never passes its threshold.
    acts = torch.tensor([[[[1.0, 0, 1], [0, 1, 0]], [[0.2, 0, 0], [0, 0, 0]]],
                         [[[0.0, 0, 0], [1, 1, 0]], [[0.0, 0, 0], [0, 0, 0.3]]]])
    tally = IoUTally(2, table, union_rule=rule)
    tally.update(acts, torch.tensor([0.5, 0.5]), [encode_labels(image_a, table), encode_labels(image_b, table)])
    iou = tally.iou()
    # red: inter 1 + 1, area 2 + 1, active on colour images 3 + 2 -> 2 / (5 + 3 - 2)
    # blue: inter 2 + 0, area 3 + 3 -> 2 / (5 + 6 - 2); car: inter 2, area 3, active on object images 3 -> 2 / 4
    # street (image-level, covers A's 6 pixels): inter 3, area 6, active 3 -> 3 / 6
    assert iou[0] == pytest.approx([2 / 6, 2 / 9, 2 / 4, 3 / 6])
    assert iou[1].tolist() == [0, 0, 0, 0]
    assert tally.label_area.tolist() == [3, 6, 3, 6]
    best = best_concepts(iou, table.category_index, 3)
    assert best["best_concept"][0] == 2 and best["best_iou"][0] == pytest.approx(0.5)
    assert best["best_by_category"][0].tolist() == [0, 2, 3]
    assert best["best_by_category_iou"][0] == pytest.approx([1 / 3, 0.5, 0.5])


@pytest.mark.parametrize("rule", UNION_RULES)
def test_a_batch_without_active_units_adds_only_label_area(rule):
    table = hand_table()
    image = ImageLabels([np.array([[2, 2, 2], [1, 0, 0]])], [4], (2, 3))
    tally = IoUTally(2, table, union_rule=rule)
    tally.update(torch.zeros(1, 2, 2, 3), torch.tensor([0.5, 0.5]), [encode_labels(image, table)])
    assert tally.label_area.tolist() == [1, 3, 0, 6] and tally.images == 1
    assert not tally.intersection.any() and not tally.active_area.any()


def test_encoded_labels_count_every_map_and_skip_unknown_numbers():
    table = hand_table()
    labels = ImageLabels([np.array([[1, 99], [0, 3]]), np.array([[3, 3], [0, 0]])], [4, 77], (2, 2))
    encoded = encode_labels(labels, table)
    dense = {int(c): encoded.coverage[:, j].tolist() for j, c in enumerate(encoded.concepts)}
    assert dense == {0: [1, 0, 0, 0], 2: [1, 1, 0, 1], 3: [1, 1, 1, 1]}  # label 99 and image label 77 unknown
    assert encoded.present.tolist() == [True, True, True]  # street (label 4) is a scene label: scene is present


def test_encoded_labels_are_sets_and_presence_follows_the_labels():
    """A label repeated by two maps at a pixel counts once there; an image-level label that a map repeats is one
    whole-image column; a map that holds no known label makes its category present nowhere."""
    table = hand_table()
    labels = ImageLabels([np.array([[3, 3], [0, 0]]), np.array([[3, 0], [4, 0]]), np.array([[99, 0], [0, 0]])],
                         [4], (2, 2))
    encoded = encode_labels(labels, table)
    dense = {int(c): encoded.coverage[:, j].tolist() for j, c in enumerate(encoded.concepts)}
    assert dense == {2: [1, 1, 0, 0], 3: [1, 1, 1, 1]}
    assert encoded.present.tolist() == [False, True, True]


@pytest.mark.parametrize("rule", UNION_RULES)
def test_a_label_repeated_by_two_maps_keeps_iou_at_most_one(rule):
    """car in two object maps at the one active pixel: counted once per map (as NetDissect-Lite does) it would be
    an intersection of 2 over a union of 1 + 2 - 2."""
    table = hand_table()
    image = ImageLabels([np.array([[3, 0, 0], [0, 0, 0]]), np.array([[3, 0, 0], [0, 0, 0]])], [], (2, 3))
    tally = IoUTally(1, table, union_rule=rule)
    tally.update(torch.tensor([[[[1.0, 0, 0], [0, 0, 0]]]]), torch.tensor([0.5]), [encode_labels(image, table)])
    assert tally.iou()[0].tolist() == [0, 0, 1, 0]


@pytest.fixture
def two_category_broden(tmp_path) -> BrodenDataset:
    return BrodenDataset(broden_fixture.write_broden(tmp_path / "broden"), split="val")


def fixture_tally(broden: BrodenDataset, rule: str) -> IoUTally:
    source = ConceptSource(broden, broden_fixture.PREPROCESS, torch.device("cpu"), batch_size=2)
    table = ConceptTable.from_broden(broden)
    return tally_iou(broden_fixture.block_sequence(), "pool", source, table, broden_fixture.THRESHOLDS,
                     union_rule=rule)


# Hand counts on tests/broden_fixture (val images a, b, c). Concepts in label order: car, fabric, wheel, wood, street.
# Label areas: car 4 + 8 = 12, fabric 3 (a's object mask), wheel 2, wood 4, street 16 (a, image-level).
# Intersections: unit 0: car 2 (c), fabric 2 (a), street 2 (a); unit 1: wood 1 (b), street 1 (a).
# Active pixels |M|: unit 0: a 2, b 0, c 2; unit 1: a 1, b 2, c 1.
# image rule: a carries object (car), material (fabric, its primary category) and scene; b material; c object, part.
#   unit 0: object a+c = 4, part c = 2, material a+b = 2, scene a = 2
#   unit 1: object a+c = 2, part c = 1, material a+b = 3, scene a = 1
# pixel rule: unit 0 touches on a fabric (material) and street (scene), not car; on c car (object), not the wheel.
#   unit 1 touches on a street only (scene), on b wood (material), on c nothing.
#   unit 0: object 2, part 0, material 2, scene 2; unit 1: object 0, part 0, material 2, scene 1
# Presence by index.csv column (the rule before the fix) left a's 2 active pixels out of fabric's union:
# unit 0's fabric IoU was 2 / (0 + 3 - 2) = 2.0.
HAND_ACTIVE = {"image": [[4, 2, 2, 2], [2, 1, 3, 1]], "pixel": [[2, 0, 2, 2], [0, 0, 2, 1]]}
HAND_IOU = {
    "image": [[2 / (4 + 12 - 2), 2 / (2 + 3 - 2), 0, 0, 2 / (2 + 16 - 2)],
              [0, 0, 0, 1 / (3 + 4 - 1), 1 / (1 + 16 - 1)]],
    "pixel": [[2 / (2 + 12 - 2), 2 / (2 + 3 - 2), 0, 0, 2 / (2 + 16 - 2)],
              [0, 0, 0, 1 / (2 + 4 - 1), 1 / (1 + 16 - 1)]],
}


def test_union_rule_option_reaches_the_store(tmp_path):
    """--union-rule from compute.all's options to the stage, recorded on the section and on its IoU array."""
    from types import SimpleNamespace

    import h5py

    from compute.all import check_options, parse_args
    from compute.run.context import RunContext
    from compute.stages.dissection import run_stage
    from store import StoreWriter

    root = broden_fixture.write_broden(tmp_path / "broden")
    spec = SimpleNamespace(to_sequence=lambda model: model, layers={"blocks": "pool"},
                           preprocess=broden_fixture.PREPROCESS)
    writer = StoreWriter(tmp_path / "run.h5", "key", {})
    options = check_options(parse_args(["--union-rule", "pixel", "--quantile", "0.1"]))  # 0.1: T_u = 0, every lit block is active
    ctx = RunContext(spec=spec, model=broden_fixture.block_sequence(), images=None, class_names=[], layers=["blocks"],
                     device=torch.device("cpu"), writer=writer, config={}, data_dir=tmp_path, batch_size=2,
                     options=options, concepts=root, sharded=frozenset({"dissection"}))
    run_stage(ctx, ["blocks"])
    with h5py.File(writer.commit(), "r") as h5:
        group = h5["layers/blocks/dissection"]
        assert group.attrs["union_rule"] == "pixel" and group["iou"].attrs["union_rule"] == "pixel"
        iou = group["iou"][()]
    # all four images: as the val hand counts, but fabric's area grows by train image d's 16 pixels
    expected = np.array(HAND_IOU["pixel"], np.float32)
    expected[0, 1] = 2 / (2 + 19 - 2)
    assert iou == pytest.approx(expected)
    with pytest.raises(SystemExit):
        parse_args(["--union-rule", "column"])


def test_fixture_labels_take_their_primary_category(two_category_broden):
    """fabric: listed material(1);object(1), more coverage in material; held in image a's object mask."""
    table = ConceptTable.from_broden(two_category_broden)
    assert table.names == ["car", "fabric", "wheel", "wood", "street-s"]
    assert table.categories == ["object", "material", "part", "material", "scene"]
    encoded = encode_labels(two_category_broden.labels(0), table)
    assert encoded.present.tolist() == [True, False, True, True]  # object, part, material, scene


@pytest.mark.parametrize("rule", UNION_RULES)
def test_fixture_iou_equals_hand_counts(two_category_broden, rule):
    tally = fixture_tally(two_category_broden, rule)
    assert tally.images == 3
    assert tally.label_area.tolist() == [12, 3, 2, 4, 16]
    assert tally.intersection.numpy().tolist() == [[2, 2, 0, 0, 2], [0, 0, 0, 1, 1]]
    assert tally.active_area.numpy().tolist() == HAND_ACTIVE[rule]
    iou = tally.iou()
    assert iou == pytest.approx(np.array(HAND_IOU[rule]), abs=1e-15)
    assert iou.max() <= 1
    expected = reference_iou(broden_fixture.block_sequence(), "pool", two_category_broden, tally.table,
                             broden_fixture.THRESHOLDS, rule, broden_fixture.PREPROCESS)
    assert np.abs(iou - expected).max() < 1e-12


def reference_iou(sequence, step, broden: BrodenDataset, table: ConceptTable, thresholds, rule: str = "image",
                  preprocess: Preprocess = PLAIN) -> np.ndarray:
    """The definition written out image by image, unit by unit, concept by concept (cv2's bilinear resize); under
    the "pixel" rule it is NetDissect-Lite's tally_job (a category's union takes the whole active area when an
    active pixel carries one of its labels or the image has an image-level label of it), with each concept's
    pixels counted once however many maps carry them."""
    units = len(thresholds)
    inter = np.zeros((units, len(table)))
    area = np.zeros(len(table))
    active_in = np.zeros((units, len(table.category_names)))
    for i in range(len(broden)):
        image = torch.from_numpy(broden.image(i).transpose(2, 0, 1).copy())[None]
        maps = run_to(sequence, preprocess.normalise(image, "cpu"), [step])[step][0].numpy()
        labels = broden.labels(i)
        sh, sw = labels.shape
        concept_masks = np.zeros((len(table), sh, sw), bool)
        for label_map in labels.pixel:
            for c, number in enumerate(table.numbers):
                concept_masks[c] |= label_map == number
        for number in labels.image_level:
            concept_masks[list(table.numbers).index(number)] = True
        area += concept_masks.sum((1, 2))
        for u in range(units):
            active = cv2.resize(maps[u], (sw, sh), interpolation=cv2.INTER_LINEAR) > thresholds[u]
            inter[u] += (concept_masks & active).sum((1, 2))
            for k in range(len(table.category_names)):
                masks = concept_masks[table.category_index == k]
                counted = masks.any() if rule == "image" else (masks & active).any()
                active_in[u, k] += active.sum() * counted
    union = active_in[:, table.category_index] + area - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def colour_sequence() -> nn.Sequential:
    """Unit 0 = ReLU(R - G - B), unit 1 = ReLU(G - R - B) on [0, 1] pixels: a red and a green detector."""
    conv = nn.Conv2d(3, 2, 1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -1, -1], [-1, 1, -1]])[:, :, None, None])
        conv.bias.zero_()
    return nn.Sequential(OrderedDict(conv=conv, relu=nn.ReLU(), pool=nn.MaxPool2d(4))).eval()


@pytest.fixture(scope="module")
def val_concepts(tiny_run) -> BrodenDataset:
    return BrodenDataset(tiny_run["dataset"], split="val")


@pytest.mark.parametrize("rule", UNION_RULES)
def test_hand_built_colour_units_detect_their_colours(val_concepts, rule):
    """Pooled to 16x16 so the upsampling matters; the tally agrees with the written-out definition."""
    sequence = colour_sequence()
    source = ConceptSource(val_concepts, PLAIN, torch.device("cpu"), batch_size=32)
    result = dissect(sequence, "pool", source, quantile=0.005, union_rule=rule)
    names = result.table.names
    best = best_concepts(result.iou, result.table.category_index, len(result.table.category_names))
    assert names[best["best_concept"][0]] == "red-c" and best["best_iou"][0] > 0.1
    # the most saturated greens are paintings' paper, so green-c is only unit 1's best colour
    colour = result.table.category_names.index("color")
    assert names[best["best_by_category"][1, colour]] == "green-c"
    expected = reference_iou(sequence, "pool", val_concepts, result.table, result.thresholds, rule)
    assert np.abs(result.iou - expected).max() < 1e-6  # equal here; a tolerance for bilinear rounding at T_u
    assert result.iou.max() <= 1


@pytest.mark.parametrize("total, batch", [(1, 1), (37, 5), (5000, 333)])
@pytest.mark.parametrize("quantile", [0.005, 0.2])
def test_top_quantile_equals_numpy(total, batch, quantile):
    rng = np.random.default_rng(total)
    values = np.maximum(rng.normal(size=(4, total)), 0).astype(np.float32)  # ReLU-like: many ties at zero
    values[3] = 1.0  # a constant unit
    sketch = TopQuantile(4, total, quantile)
    for start in range(0, total, batch):
        sketch.update(torch.from_numpy(values[:, start:start + batch]))
    expected = np.quantile(values.astype(np.float64), 1 - quantile, axis=1)
    assert sketch.result() == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert sketch.keep <= quantile * total + 2


@pytest.mark.parametrize("cuts", [(0, 1000, 1000), (0, 3, 999, 1000), (0, 0, 500, 1000)])
def test_merged_parts_give_the_one_stream_quantile_exactly(cuts):
    """Parts of a stream (torchrun ranks' images, one part possibly empty) merge to the one-stream answer, bit for bit."""
    rng = np.random.default_rng(7)
    values = torch.from_numpy(np.maximum(rng.normal(size=(3, 1000)), 0).astype(np.float32))
    whole = TopQuantile(3, 1000, 0.01)
    whole.update(values)
    merged = TopQuantile(3, 1000, 0.01)
    for start, stop in reversed(list(zip(cuts, cuts[1:]))):
        part = TopQuantile(3, 1000, 0.01)
        part.update(values[:, start:stop])
        state = part.state()
        merged.merge(state["top"], state["seen"])
    assert np.array_equal(merged.result(), whole.result())


@pytest.mark.parametrize("rule", UNION_RULES)
def test_tallies_of_parts_add_up_to_the_whole(val_concepts, rule):
    """Both dissection passes over whole batches shared out as between ranks (one share empty): the same numbers."""
    sequence = colour_sequence()
    source = ConceptSource(val_concepts, PLAIN, torch.device("cpu"), batch_size=32)
    whole = dissect(sequence, "pool", source, quantile=0.005, union_rule=rule)
    shares = [np.arange(source.batch_count)[rank::2] for rank in range(2)] + [np.zeros(0, np.int64)]
    thresholds = merge_thresholds([threshold_state(sequence, "pool", source, 0.005, b) for b in shares], 0.005)
    assert np.array_equal(thresholds, whole.thresholds)
    states = [tally_iou(sequence, "pool", source, whole.table, thresholds, b, rule).state() for b in shares]
    tally = merge_tallies(states[::-1], whole.table, rule)
    assert np.array_equal(tally.iou(), whole.iou) and tally.images == whole.images == len(val_concepts)


def test_top_quantile_refuses_a_short_stream():
    sketch = TopQuantile(2, 10, 0.1)
    sketch.update(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="expected 10"):
        sketch.result()


def test_store_thresholds_equal_numpy_quantile(tiny_run):
    """The tiny run's conv5 thresholds against numpy.quantile over every position of every concept image."""
    from compute.models import get_spec

    store = StoreReader(tiny_run["store"])
    spec = get_spec("demo")
    model, _ = spec.load(None, tiny_run["data_dir"])
    broden = BrodenDataset(tiny_run["dataset"])
    images = torch.stack([torch.from_numpy(broden.image(i).transpose(2, 0, 1).copy()) for i in range(len(broden))])
    maps = run_to(spec.to_sequence(model), spec.preprocess.normalise(images, "cpu"), ["relu5"])["relu5"]
    everything = maps.transpose(0, 1).reshape(maps.shape[1], -1).double().numpy()
    expected = np.quantile(everything, 1 - store.read_attrs("layers/conv5/dissection")["quantile"], axis=1)
    assert store.layer("conv5", "dissection", "thresholds") == pytest.approx(expected, rel=1e-5)


def test_store_holds_consistent_dissection(tiny_run):
    store = StoreReader(tiny_run["store"])
    names = store.read("concepts/names")
    categories = store.read("concepts/categories")
    category_names = list(store.read("concepts/category_names"))
    assert len(names) == len(categories) == len(store.read("concepts/numbers")) == 105
    assert "red-c" in names and set(categories) <= set(category_names)
    for layer in ("conv3", "conv4", "conv5"):
        units = store.layer(layer, "attributes", "l1").shape[0]
        iou = store.layer(layer, "dissection", "iou")
        assert iou.shape == (units, len(names)) and iou.dtype == np.float32
        assert 0 <= iou.min() and iou.max() <= 1
        best = store.layer(layer, "dissection", "best_concept")
        assert np.array_equal(store.layer(layer, "dissection", "best_iou"), iou.max(1))
        assert np.array_equal(iou[np.arange(units), best], iou.max(1))
        by_category = store.layer(layer, "dissection", "best_by_category")
        assert by_category.shape == (units, len(category_names))
        assert all(categories[c] == category_names[k] for c, k in zip(by_category[0], range(len(category_names))))
        assert store.layer(layer, "dissection", "thresholds").shape == (units,)
        attrs = store.read_attrs(f"layers/{layer}/dissection")
        assert attrs["iou_threshold"] == pytest.approx(0.04) and attrs["union_rule"] == "image"


def test_missing_concepts_skip_the_stage_naming_the_option():
    from types import SimpleNamespace

    from compute.stages.dissection import run_stage
    from compute.errors import StageSkipped

    with pytest.raises(StageSkipped, match="--concepts PATH"):
        run_stage(SimpleNamespace(concepts=None), "conv5")


def test_dissection_page_counts_detectors(store_env):
    at = open_view("dissection", store_env["store"])
    best_iou = StoreReader(store_env["store"]).layer("conv5", "dissection", "best_iou")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Units"] == "128" and metrics["Detectors"] == str(int((best_iou > 0.04).sum()))
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    at.slider(key="dissection_threshold").set_value(0.0).run()  # every unit with any overlap is a detector
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert table["units"].sum() == int((best_iou > 0).sum())
    assert {"concept", "category", "units", "unit list"} <= set(table.columns)
    assert at.selectbox(key=f"dissection_unit-{Path(store_env['store']).stem}").options  # keyed per store
    assert any("IoU union rule: image presence" in caption.value for caption in at.caption)


def test_union_rule_sentence_names_old_stores():
    from figures.dissection import union_rule_sentence

    assert "NetDissect-Lite" in union_rule_sentence("pixel") and "image presence" in union_rule_sentence(b"image")
    assert "by index.csv column (before the fix)" in union_rule_sentence(None)


def test_second_pass_reads_the_first_pass_images(val_concepts, monkeypatch):
    """Decoded concept images are kept from the thresholds pass for the IoU pass where the set fits: the second pass
    decodes nothing, and the numbers are those of decoding every image twice."""
    sequence = colour_sequence()
    source = ConceptSource(val_concepts, PLAIN, torch.device("cpu"), batch_size=32)
    whole = dissect(sequence, "pool", source, quantile=0.005)
    assert len(source._cache) == len(val_concepts)
    decoded = []
    monkeypatch.setattr(ConceptImages, "_decoded", lambda self, i: decoded.append(i))
    again = tally_iou(sequence, "pool", source, whole.table, whole.thresholds)
    assert decoded == [] and np.array_equal(again.iou(), whole.iou)
    monkeypatch.undo()
    uncached = ConceptSource(val_concepts, PLAIN, torch.device("cpu"), batch_size=32, cache_bytes=0)
    assert np.array_equal(dissect(sequence, "pool", uncached, quantile=0.005).iou, whole.iou) and not uncached._cache
