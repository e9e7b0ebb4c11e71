"""The images behind a drop (issue 20): the flip tables list every changed prediction of single-unit and greedy
ablation and nothing else, their lost/gained equal the stored counts, shares combine by unit, and the pages show the
lost and gained images with their captions.

The tiny run's network predicts one class for every image, so no ablation changes anything there. These tests run
the pipeline once more on the tiny data with that network's last layer centred (its bias set so that the logits'
mean over the validation images is zero): predictions then vary from image to image, 14% are right (chance: 4%), and
single units change tens of predictions each.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from compute import flips
from compute.models import get_spec
from store import StoreReader
from tests.views import open_through_main

ROOT = Path(__file__).resolve().parent.parent
LAYERS = ("conv3", "conv4", "conv5")


@pytest.fixture(scope="module")
def varied_run(tiny_run, tmp_path_factory) -> dict:
    """compute.all on the tiny data with the tiny network's last layer centred, keeping flip thumbnails."""
    from compute.all import main as compute_all
    from compute.data.validation import load_validation

    spec = get_spec("demo")
    model, _ = spec.load(None, tiny_run["data_dir"])
    val = load_validation("synthscenes", tiny_run["dataset"], spec.preprocess)
    images = torch.stack([val.dataset[i][0] for i in range(len(val.labels))])
    with torch.no_grad():
        features = model[:-1](images)
        model.fc8.bias.copy_(-(model.fc8.weight @ features.mean(0)))
    directory = tmp_path_factory.mktemp("varied")
    weights = directory / "centred.pt"
    torch.save(model.state_dict(), weights)
    store = directory / "stores" / "demo.h5"
    assert compute_all([*tiny_run["args"], "--weights", str(weights), "--store", str(store), "--rotations", "0",
                        "--top-k", "0", "--keep-flip-thumbs"]) == 0
    return {**tiny_run, "store": store, "weights": weights}


@pytest.fixture(scope="module")
def tiny_ctx(varied_run):
    """A RunContext on the varied run's model and decoded images (the inputs the run used), no writer."""
    from compute.run.context import RunContext
    from compute.data.validation import load_validation
    from compute.run.imagecache import ImageCache

    spec = get_spec("demo")
    model, _ = spec.load(varied_run["weights"], varied_run["data_dir"])
    val = load_validation("synthscenes", varied_run["dataset"], spec.preprocess)
    return RunContext(spec=spec, model=model, images=ImageCache(val.dataset, spec.preprocess),
                      class_names=list(val.class_names), layers=list(LAYERS), device=torch.device("cpu"),
                      writer=None, config={}, data_dir=varied_run["data_dir"], batch_size=72)


def unit_table(store: StoreReader, layer: str) -> dict:
    return {name: store.read(f"layers/{layer}/ablation/flips/{name}") for name in (*flips.UNIT_FIELDS, "start")}


def all_acts(ctx, layer: str):
    acts, labels = [], []
    for batch, batch_labels, _ in ctx.activations([layer]):
        acts.append(batch[layer])
        labels.append(batch_labels)
    return torch.cat(acts), torch.cat(labels)


# -- the single-unit table --------------------------------------------------------------------------------------
def test_table_layout(varied_run):
    store = StoreReader(varied_run["store"])
    for layer in LAYERS:
        table = unit_table(store, layer)
        units = store.layer(layer, "ablation", "overall_drop").shape[0]
        assert table["start"].dtype == np.int64 and table["start"].shape == (units + 1,)
        assert table["start"][0] == 0 and table["start"][-1] == len(table["unit"])
        for name in flips.UNIT_FIELDS:
            assert table[name].dtype == np.int32 and table[name].shape == table["unit"].shape
        key = table["unit"].astype(np.int64) * 10**6 + table["image"]
        assert np.all(np.diff(key) > 0)  # sorted by unit, then image, no repeats
        assert np.array_equal(np.repeat(np.arange(units), np.diff(table["start"])), table["unit"])
        assert np.all(table["before"] != table["after"])
        attrs = store.read_attrs(f"layers/{layer}/ablation/flips")
        assert "wrong -> other wrong" in attrs["rows"] and (attrs["resize"], attrs["crop"]) == (64, 64)


def test_flips_equal_a_naive_rerun_with_zeroed_filters(varied_run):
    """For conv5 units with the most rows, one with the fewest: exactly the images whose prediction changes when the
    whole network runs with the unit's filter and bias zeroed, with the predictions before and after."""
    from compute.lib import ties
    from compute.data.validation import load_validation

    store = StoreReader(varied_run["store"])
    spec = get_spec("demo")
    model, _ = spec.load(varied_run["weights"], varied_run["data_dir"])
    val = load_validation("synthscenes", varied_run["dataset"], spec.preprocess)
    images = torch.stack([val.dataset[i][0] for i in range(len(val.labels))])
    base = ties.predict(model, images).numpy()
    table = unit_table(store, "conv5")
    rows = np.diff(table["start"])
    chosen = [*np.argsort(-rows, kind="stable")[:3].tolist(), int(np.argmin(rows))]
    assert rows[chosen[0]] > 0
    for unit in chosen:
        conv = model.conv5
        saved = conv.weight.data[unit].clone(), conv.bias.data[unit].clone()
        conv.weight.data[unit] = 0
        conv.bias.data[unit] = 0
        after = ties.predict(model, images).numpy()
        conv.weight.data[unit], conv.bias.data[unit] = saved
        expected = np.flatnonzero(after != base)
        part = slice(table["start"][unit], table["start"][unit + 1])
        assert table["image"][part].tolist() == expected.tolist()
        assert table["before"][part].tolist() == base[expected].tolist()
        assert table["after"][part].tolist() == after[expected].tolist()


def test_flips_equal_the_engine_for_every_unit_and_give_the_stored_counts(varied_run, tiny_ctx):
    store = StoreReader(varied_run["store"])
    labels = store.read("images/labels")
    k = len(store.classes)
    counted = 0
    for layer in LAYERS:
        table = unit_table(store, layer)
        acts, batch_labels = all_acts(tiny_ctx, layer)
        engine = tiny_ctx.engine(layer)
        base = engine.baseline(acts, batch_labels)
        outcome = engine.evaluate_units(acts, batch_labels, torch.eye(acts.shape[1], dtype=torch.bool), base)
        unit, image = (outcome.pred != base.pred[None]).nonzero(as_tuple=True)
        assert table["unit"].tolist() == unit.tolist() and table["image"].tolist() == image.tolist()
        assert table["before"].tolist() == base.pred[image].tolist()
        assert table["after"].tolist() == outcome.pred[unit, image].tolist()
        lost, gained = flips.lost_gained(table, table["start"], labels, k)
        assert np.array_equal(lost, store.layer(layer, "ablation", "lost"))
        assert np.array_equal(gained, store.layer(layer, "ablation", "gained"))
        moved = flips.kinds(table, labels)["moved"]
        counted += int(moved.sum())
        # wrong -> other wrong rows are listed but counted in neither
        assert int(lost.sum() + gained.sum()) + int(moved.sum()) == len(table["unit"])
    assert counted > 0  # the tiny network is near chance: such rows exist, and are not lost or gained


def test_shares_of_units_combine_by_unit(tiny_ctx):
    """Under torchrun each rank sweeps every world-th unit; the combined table is the one-process table."""
    from compute.stages.ablation import _combine, sweep

    units = tiny_ctx.units("conv5")
    whole = _combine([(np.arange(units), sweep(tiny_ctx, "conv5"))])["flips"]
    shares = [(np.arange(units)[rank::3], sweep(tiny_ctx, "conv5", np.arange(units)[rank::3])) for rank in range(3)]
    shares.append((np.zeros(0, np.int64), sweep(tiny_ctx, "conv5", np.zeros(0, np.int64))))  # a rank with no units
    combined = _combine(shares)
    assert combined["flips"].keys() == whole.keys()
    for name, value in whole.items():
        assert combined["flips"][name].dtype == value.dtype and np.array_equal(combined["flips"][name], value), name
    assert np.array_equal(combined["lost"], _combine([(np.arange(units), sweep(tiny_ctx, "conv5"))])["lost"])


# -- greedy -------------------------------------------------------------------------------------------------------
def greedy_table(store: StoreReader, layer: str = "conv5") -> dict:
    return {name: store.read(f"layers/{layer}/greedy/flips/{name}") for name in (*flips.GREEDY_FIELDS, "start")}


def test_greedy_flips_equal_the_differences_of_ablation_paths(varied_run, tiny_ctx):
    from compute.lib.greedy import ablation_paths

    store = StoreReader(varied_run["store"])
    orders = store.layer("conv5", "greedy", "order")
    rows, steps = orders.shape
    acts, labels = all_acts(tiny_ctx, "conv5")
    paths = ablation_paths(tiny_ctx.engine("conv5"), acts, labels, orders).numpy()  # [rows, steps + 1, images]
    table = greedy_table(store)
    assert table["start"].dtype == np.int64 and table["start"].shape == (rows * steps + 1,)
    for name in flips.GREEDY_FIELDS:
        assert table[name].dtype == np.int32
    total = 0
    for row in range(rows):
        for step in range(1, steps + 1):
            part = flips.step_slice(table["start"], steps, row, step)
            expected = flips.changed(paths[row, step - 1], paths[row, step])
            assert (table["class_row"][part] == row).all() and (table["step"][part] == step).all()
            for name in ("image", "before", "after"):
                assert table[name][part].tolist() == expected[name].tolist(), (row, step, name)
            total += len(expected["image"])
    assert total == len(table["image"]) > 0
    # the stored class accuracy moves by exactly what the step's class images lost and gained
    all_class = store.layer("conv5", "greedy", "all_class_acc")
    truth = store.read("images/labels")
    per_class = np.bincount(truth, minlength=len(store.classes))
    for row in range(rows):
        for step in range(1, steps + 1):
            part = flips.step_slice(table["start"], steps, row, step)
            rows_ = {name: table[name][part] for name in ("image", "before", "after")}
            kinds = flips.kinds(rows_, truth)
            net = (np.bincount(truth[rows_["image"][kinds["gained"]]], minlength=len(per_class))
                   - np.bincount(truth[rows_["image"][kinds["lost"]]], minlength=len(per_class)))
            assert np.allclose(all_class[row, step] - all_class[row, step - 1], net / per_class, atol=1e-6)


def test_greedy_shares_combine_by_class_row(varied_run):
    store = StoreReader(varied_run["store"])
    table = greedy_table(store)
    rows, steps = store.layer("conv5", "greedy", "order").shape
    shares = []
    for rank in range(2):
        indices = np.arange(rows)[rank::2]
        keep = np.isin(table["class_row"], indices)
        local = {name: table[name][keep] for name in flips.GREEDY_FIELDS}
        local["class_row"] = np.searchsorted(indices, local["class_row"]).astype(np.int32)
        order = np.random.default_rng(rank).permutation(len(local["image"]))  # any row order within a share
        shares.append((indices, {name: value[order] for name, value in local.items()}))
    combined = flips.greedy_table(shares, rows, steps)
    for name, value in table.items():
        assert np.array_equal(combined[name], value), name


def test_live_session_gives_each_images_prediction_before_and_after(varied_run):
    from compute.live_session import load_session

    session = load_session(varied_run["store"], "conv5")
    store = StoreReader(varied_run["store"])
    order = store.layer("conv5", "greedy", "order")[3].tolist()
    paths = session.path_predictions(order)
    assert paths.shape == (len(order) + 1, len(store.read("images/labels")))
    assert np.array_equal(paths[0].numpy(), store.read("images/predictions"))
    before, after = session.predictions(order)
    assert torch.equal(before, paths[0]) and torch.equal(after, paths[-1])
    table = greedy_table(store)
    for step in range(1, len(order) + 1):  # the live paths are the stage's
        part = flips.step_slice(table["start"], len(order), 3, step)
        assert table["image"][part].tolist() == flips.changed(paths[step - 1], paths[step])["image"].tolist()
    # a single unit: the sweep's table
    unit = int(np.argmax(np.diff(unit_table(store, "conv5")["start"])))
    before, after = session.predictions([unit])
    rows = flips.unit_rows(unit_table(store, "conv5"), unit_table(store, "conv5")["start"], unit)
    assert flips.changed(before, after)["image"].tolist() == rows["image"].tolist()
    class_acc, overall = session.path_accuracy(order)
    assert np.allclose(overall, store.layer("conv5", "greedy", "overall_acc")[3], atol=1e-6)


def test_thumbnails_are_the_models_crop(tiny_ctx, tmp_path):
    from compute.lib.topimages import thumbnail

    with h5py.File(tmp_path / "t.h5", "w") as h5:
        flips.write_thumbs(h5, "flips", tiny_ctx.images.images, np.array([5, 2, 5, 40]))
        assert h5["flips/thumb_images"][()].tolist() == [2, 5, 40]
        thumbs = h5["flips/thumbs"][()]
    assert thumbs.shape == (3, 64, 64, 3) and thumbs.dtype == np.uint8
    assert np.array_equal(thumbs[1], thumbnail(tiny_ctx.images.images[5], 64))


# -- the Unit page section ----------------------------------------------------------------------------------------
PAGE = '''
import sys
sys.path.insert(0, {root!r})
from pathlib import Path

import streamlit as st

from app import loaders
from app.flip_sections import flips_section

store = loaders.reader(Path(st.session_state["store_path"]))
flips_section(store, st.session_state.get("layer", "conv5"), st.session_state["unit"], st.session_state.get("focus"),
              0.05)
'''


@pytest.fixture()
def drop_store(varied_run, tmp_path):
    """A copy of the varied store, and its conv5 (unit, class) with the most images lost."""
    path = tmp_path / "stores" / "demo.h5"
    path.parent.mkdir()
    shutil.copy(varied_run["store"], path)
    store = StoreReader(path)
    lost = store.layer("conv5", "ablation", "lost")
    unit, target = (int(i) for i in np.unravel_index(np.argmax(lost), lost.shape))
    table = unit_table(store, "conv5")
    rows = flips.unit_rows(table, table["start"], unit)
    labels = store.read("images/labels")
    mine = labels[rows["image"]] == target
    kinds = flips.kinds(rows, labels)
    return {"path": path, "unit": unit, "target": target, "classes": store.classes, "lost": lost[unit, target],
            "gained": store.layer("conv5", "ablation", "gained")[unit, target],
            "q": store.layer("conv5", "ablation", "q_value")[unit, target],
            "lost_rows": {name: value[mine & kinds["lost"]] for name, value in rows.items()},
            "gained_rows": {name: value[mine & kinds["gained"]] for name, value in rows.items()}}


def section(tmp_path, store_path, **state):
    from streamlit.testing.v1 import AppTest

    script = tmp_path / "flips_page.py"
    script.write_text(PAGE.format(root=str(ROOT)))
    at = AppTest.from_file(str(script), default_timeout=120)
    at.session_state["store_path"] = str(store_path)
    for key, value in state.items():
        at.session_state[key] = value
    at.run()
    assert not at.exception, at.exception
    return at


def image_captions(at) -> list[str]:
    return [caption for element in at.get("image") for caption in element.captions]


def texts(at) -> str:
    return " ".join([c.value for c in at.caption] + [m.value for m in at.markdown])


def test_unit_section_shows_the_lost_images_with_captions(drop_store, tmp_path):
    classes, unit, target = drop_store["classes"], drop_store["unit"], drop_store["target"]
    assert drop_store["lost"] >= 2
    at = section(tmp_path, drop_store["path"], unit=unit, focus=classes[target])
    metrics = {m.label: m.value for m in at.metric}
    assert metrics[f"{classes[target]} images lost"] == str(drop_store["lost"])
    assert metrics[f"{classes[target]} images gained"] == str(drop_store["gained"])
    assert metrics["McNemar q-value"] == f"{drop_store['q']:.3g}"
    lost, gained = drop_store["lost_rows"], drop_store["gained_rows"]
    expected = [f"#{i} {classes[target]} → {classes[a]}" for i, a in zip(lost["image"], lost["after"])]
    expected += [f"#{i} {classes[target]} (was {classes[b]})" for i, b in zip(gained["image"], gained["before"])]
    assert image_captions(at) == expected
    assert "Where the lost images go" in texts(at)
    assert f"activation map of unit {unit}" in texts(at)  # conv5 keeps its live activations: maps blended in
    chart = (at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart"))[0]
    assert chart is not None
    # no class picked: the class hurt most
    drops = StoreReader(drop_store["path"]).layer("conv5", "ablation", "class_drop")[unit]
    at = section(tmp_path, drop_store["path"], unit=unit)
    assert f"showing {classes[int(np.argmax(drops))]}, the class this unit's removal hurts most" in texts(at)


@pytest.mark.skipif("flips_section" not in (ROOT / "app" / "views" / "unit.py").read_text(),
                    reason="the Unit page does not call app.flip_sections.flips_section yet")
def test_unit_page_shows_the_section(drop_store, monkeypatch):
    from tests.views import open_view

    classes, unit, target = drop_store["classes"], drop_store["unit"], drop_store["target"]
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(drop_store["path"].parent))
    at = open_view("unit", drop_store["path"], layer="conv5", unit=str(unit), **{"class": classes[target]})
    assert "Images behind the drop" in [h.value for h in at.subheader]
    assert {m.label: m.value for m in at.metric}[f"{classes[target]} images lost"] == str(drop_store["lost"])
    lost = drop_store["lost_rows"]
    assert [c for c in image_captions(at) if "→" in c] == [
        f"#{i} {classes[target]} → {classes[a]}" for i, a in zip(lost["image"], lost["after"])]


def test_unit_section_caps_the_images_shown(drop_store, tmp_path, monkeypatch):
    from app import flip_sections

    classes, unit, target, count = drop_store["classes"], drop_store["unit"], drop_store["target"], drop_store["lost"]
    monkeypatch.setattr(flip_sections, "MAX_SHOWN", 1)
    at = section(tmp_path, drop_store["path"], unit=unit, focus=classes[target])
    assert len([c for c in image_captions(at) if "→" in c]) == 1
    assert f"and {count - 1} more" in texts(at)


def test_moved_store_uses_kept_thumbnails_or_lists_the_images(drop_store, tmp_path):
    classes, unit, target = drop_store["classes"], drop_store["unit"], drop_store["target"]
    shown = len(drop_store["lost_rows"]["image"]) + len(drop_store["gained_rows"]["image"])
    with h5py.File(drop_store["path"], "r+") as f:
        f.attrs["data_path"] = str(tmp_path / "elsewhere")  # the images are not where the store says
        kept = f["layers/conv5/ablation/flips/thumb_images"][()]
        assert np.array_equal(kept, np.unique(f["layers/conv5/ablation/flips/image"][()]))
    at = section(tmp_path, drop_store["path"], unit=unit, focus=classes[target])
    assert len(image_captions(at)) == shown and "are not in" not in texts(at)  # the store's own thumbnails
    with h5py.File(drop_store["path"], "r+") as f:
        for layer in LAYERS:
            for name in ("thumbs", "thumb_images"):
                del f[f"layers/{layer}/ablation/flips/{name}"]
        for name in ("thumbs", "thumb_images"):
            del f[f"layers/conv5/greedy/flips/{name}"]
    at = section(tmp_path, drop_store["path"], unit=unit, focus=classes[target])
    assert not image_captions(at)
    assert "are not in" in texts(at) and "--keep-flip-thumbs" in texts(at)
    listed = at.dataframe[0].value
    assert listed["image"].tolist() == drop_store["lost_rows"]["image"].tolist()


def test_layer_without_live_data_shows_plain_images_and_says_why(varied_run, tmp_path):
    store = StoreReader(varied_run["store"])
    lost = store.layer("conv3", "ablation", "lost")
    unit, target = (int(i) for i in np.unravel_index(np.argmax(lost), lost.shape))
    at = section(tmp_path, varied_run["store"], layer="conv3", unit=unit, focus=store.classes[target])
    assert "the activation maps need the layer's live data (`layers/conv3/live/acts`)" in texts(at)
    assert len([c for c in image_captions(at) if "→" in c]) == min(int(lost[unit, target]), 20) > 0


def test_old_store_says_which_command_adds_the_flips(varied_run, tmp_path):
    path = tmp_path / "old.h5"
    shutil.copy(varied_run["store"], path)
    with h5py.File(path, "r+") as f:
        for layer in LAYERS:
            del f[f"layers/{layer}/ablation/flips"]
        del f["layers/conv5/greedy/flips"]
    at = section(tmp_path, path, unit=0)
    assert "recompute it with `python -m compute.all --model demo --force`" in texts(at)


# -- the greedy page -----------------------------------------------------------------------------------------------
def greedy_page(store_dir: Path, monkeypatch):
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(store_dir))
    return open_through_main("greedy")


def test_greedy_replay_shows_the_images_a_step_changes(varied_run, monkeypatch):
    store = StoreReader(varied_run["store"])
    table = greedy_table(store)
    order = store.layer("conv5", "greedy", "order")
    steps = order.shape[1]
    at = greedy_page(Path(varied_run["store"]).parent, monkeypatch)
    assert "Step 0 is the unablated network" in texts(at)
    at.slider(key="greedy_step").set_value(1).run()
    assert not at.exception, at.exception
    assert any(h.value == f"Images step 1 changes (ablating unit {order[0, 0]})" for h in at.subheader)
    part = flips.step_slice(table["start"], steps, 0, 1)
    rows = {name: table[name][part] for name in ("image", "before", "after")}
    kinds = flips.kinds(rows, store.read("images/labels"))
    shown = image_captions(at)
    assert len(shown) == min(int(kinds["lost"].sum()), 20) + min(int(kinds["gained"].sum()), 20)
    assert f"**Lost** ({int(kinds['lost'].sum())}:" in texts(at)


def test_live_set_shows_the_images_it_changes(varied_run, tmp_path, monkeypatch):
    (tmp_path / "stores").mkdir()
    shutil.copy(varied_run["store"], tmp_path / "stores" / "demo.h5")
    store = StoreReader(varied_run["store"])
    table = unit_table(store, "conv5")
    unit = int(np.argmax(np.diff(table["start"])))
    at = greedy_page(tmp_path / "stores", monkeypatch)
    at.toggle(key="live_on").set_value(True).run()
    at.radio(key="live_mode").set_value("Units picked by hand").run()
    at.multiselect(key="live_units").set_value([unit]).run()
    at.button(key="live_run").click().run()
    assert not at.exception, at.exception
    assert "Images the ablated units change" in [h.value for h in at.subheader]
    rows = flips.unit_rows(table, table["start"], unit)
    kinds = flips.kinds(rows, store.read("images/labels"))
    assert f"**Lost** ({int(kinds['lost'].sum())}:" in texts(at)
    assert f"**Gained** ({int(kinds['gained'].sum())}:" in texts(at)
