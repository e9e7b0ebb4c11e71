"""Table 1 on synthetic instances: the split is by instance, numbers are reproducible by seed, and the stored table
reads back (a table stored before the strict score too); strict and lenient scores on a hand-made case with ties and
units that hurt no class; the two-level bootstrap; mismatched stores are refused; the Predicting classes page shows
and computes tables."""

from pathlib import Path

import h5py
import numpy as np
import pytest

from compute.analysis import prediction as predict
from compute.errors import UserError
from store import StoreReader, StoreWriter
from store.writer import write_array
from tests.views import open_view

ROOT = Path(__file__).resolve().parents[1]
K, UNITS, LAYER = 4, 40, "conv5"
CLASSES = [f"class{k}" for k in range(K)]


def fake_instance(directory: Path, name: str, seed: int, model: str = "demo", classes=CLASSES,
                  hurts: bool = True, tie: bool = False) -> Path:
    """A store whose class correlation row peaks at the unit's label (learnable) and whose selectivity is noise;
    the last two units hurt no class when ablated (unlabelled)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, K, UNITS)
    onehot = np.eye(K)[labels]
    class_drop = 0.2 * onehot + 0.02 * rng.random((UNITS, K))
    if tie:  # the next class drops exactly as much as the unit's own
        class_drop[np.arange(UNITS), (labels + 1) % K] = class_drop.max(1)
    class_drop[-2:] = 0.0
    class_drop *= hurts  # hurts=False: ablating any unit changes no class's accuracy
    return write_instance(directory, name, class_drop, onehot + 0.3 * rng.normal(size=(UNITS, K)),
                          rng.normal(size=(UNITS, K)), model, classes)


def write_instance(directory: Path, name: str, class_drop, correlation, selectivity, model: str = "demo",
                   classes=CLASSES) -> Path:
    """A store holding exactly these class drops and attribute vectors at LAYER."""
    class_drop = np.asarray(class_drop, np.float64)
    writer = StoreWriter(directory / f"{name}.h5", name, {"model": model, "arch": "demo", "weights_sha256": name,
                                                          "layer_order": [LAYER]})
    with writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(classes, dtype=object))
    with writer.stage(f"ablation/{LAYER}") as h5:
        write_array(h5, f"layers/{LAYER}/ablation/class_drop", class_drop.astype(np.float32))
        write_array(h5, f"layers/{LAYER}/ablation/overall_drop", class_drop.mean(1).astype(np.float32))
    with writer.stage(f"attributes/{LAYER}") as h5:
        write_array(h5, f"layers/{LAYER}/attributes/correlation", np.asarray(correlation, np.float64))
        write_array(h5, f"layers/{LAYER}/attributes/selectivity", np.asarray(selectivity, np.float64))
    return writer.commit()


@pytest.fixture()
def instances(tmp_path) -> list[Path]:
    return [fake_instance(tmp_path, "demo" if s == 0 else f"demo-seed{s}", seed=s) for s in range(5)]


def test_labels_are_the_largest_drop_classes_with_ties():
    drop = np.array([[0.0, 0.1, 0.04], [0.0, 0.0, 0.0], [-0.02, 0.0, -0.04], [0.06, 0.06, 0.0]])
    best = predict.largest_drop_classes(drop)
    assert best.tolist() == [[False, True, False], [False] * 3, [False] * 3, [True, True, False]]
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    rows, labels, weights = predict.tie_weighted(x, best)  # unlabelled units drop out; the tied one splits in two
    assert rows[:, 0].tolist() == [1.0, 4.0, 4.0] and labels.tolist() == [1, 0, 1]
    assert weights.tolist() == [1.0, 0.5, 0.5]


def test_split_is_by_instance(instances):
    loaded = [predict.load_instance(path, LAYER)[0] for path in instances]
    x, y, groups = predict.design(loaded, "class correlation")
    train, test = predict.split_by_instance(groups, ["demo", "demo-seed1", "demo-seed2"])
    assert set(groups[train]) == {"demo", "demo-seed1", "demo-seed2"}
    assert set(groups[test]) == {"demo-seed3", "demo-seed4"}
    assert not set(groups[train]) & set(groups[test])
    assert train.sum() == 3 * (UNITS - 2) and test.sum() == 2 * (UNITS - 2)  # unlabelled units left out
    table = predict.predict_table(instances, n_train=3)
    assert table["train_stores"] == ["demo", "demo-seed1", "demo-seed2"]
    assert table["test_stores"] == ["demo-seed3", "demo-seed4"]
    assert table["n_train"] == 3 * (UNITS - 2) and table["n_test"] == 2 * (UNITS - 2)


def test_table_values(instances):
    table = predict.predict_table(instances, n_train=3, seed=0)
    rows = {row["attribute"]: row for row in table["rows"]}
    assert list(rows) == ["class correlation", "class selectivity", "ensemble"]  # no dissection: no concept IoU
    assert rows["class correlation"]["accuracy"] > 0.9
    assert rows["class selectivity"]["accuracy"] < 0.6  # noise features
    for row in rows.values():
        assert row["ci"][0] <= row["accuracy"] <= row["ci"][1]
        assert row["correct"] == round(row["accuracy"] * row["n_test"])
    assert table["chance_uniform"] == pytest.approx(1 / K) and 0 < table["chance_majority"] < 0.6
    assert table["unlabelled"] == {path.stem: 2 for path in instances}
    assert table["tied"] == {path.stem: 0 for path in instances}


def test_reproducible_by_seed(instances):
    first = predict.predict_table(instances, seed=7)
    second = predict.predict_table(instances, seed=7)
    assert first["rows"] == second["rows"]
    assert first["chance_majority"] == second["chance_majority"]


def test_cli_prints_and_stores_the_table(instances, capsys):
    from compute.predict import main

    assert main([str(p) for p in instances] + ["--layer", LAYER, "--seed", "1", "--resamples", "500"]) == 0
    out = capsys.readouterr().out
    assert "class correlation" in out and "ensemble" in out and "chance (uniform)" in out
    assert "strict" in out and "lenient" in out and "does not say how it scores ties" in out
    table = predict.predict_table(instances, seed=1, n_resamples=500)
    for path in instances:
        store = StoreReader(path)
        group = f"prediction/{LAYER}"
        stored = predict.read_stored(store, LAYER)
        assert stored["rows"] == [dict(row, ci=tuple(row["ci"])) for row in table["rows"]]
        assert stored["train_stores"] == table["train_stores"] and stored["seed"] == 1
        for key in ("n_excluded", "interval_method", "n_resamples", "strict_chance_majority", "strict_chance_uniform"):
            assert stored[key] == table[key]
        assert stored["interval_method"] == predict.CLUSTER and stored["n_resamples"] == 500
        # The first version's datasets are all still there, under their names: a reader of those alone still works.
        arrays = {name: store.read(f"{group}/{name}") for name in ("attributes", "accuracy", "ci", "correct", "n_test")}
        old = predict.read_table(arrays, store.read_attrs(group), LAYER)
        assert [row["accuracy"] for row in old["rows"]] == [row["accuracy"] for row in table["rows"]]
        assert all(row["strict_accuracy"] is None and row["bootstrap_ci"] is None for row in old["rows"])


@pytest.mark.parametrize("change", ["model", "classes", "layer", "too_few", "twice"])
def test_mismatched_stores_are_refused(instances, tmp_path, change):
    paths = list(instances)
    other = tmp_path / "other"
    other.mkdir()
    if change == "model":
        paths[4] = fake_instance(other, "bn", seed=9, model="demo-bn")
    elif change == "classes":
        paths[4] = fake_instance(other, "cls", seed=9, classes=list("abcd"))
    elif change == "too_few":
        paths = paths[:3]
    elif change == "twice":
        paths[4] = paths[3]
    with pytest.raises(UserError) as error:
        predict.predict_table(paths, layer="conv4" if change == "layer" else LAYER)
    assert "\n" not in str(error.value)


def test_prediction_page_computes_then_shows_tables(instances, monkeypatch):
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(instances[0].parent))
    at = open_view("prediction", instances[0])
    assert at.info and "no prediction table" in at.info[0].value
    assert at.multiselect(key="predict_stores").value == [str(p) for p in instances]
    at.button[0].click().run()
    assert not at.exception, at.exception
    assert at.success and at.get("vega_lite_chart") and at.dataframe
    assert StoreReader(instances[3]).has(f"prediction/{LAYER}/accuracy")

    fresh = open_view("prediction", instances[0])
    shown = fresh.dataframe[0].value
    assert list(shown["attribute"]) == ["class correlation", "class selectivity", "ensemble"]
    assert shown["strict accuracy (%)"].iloc[0] > 90 and shown["lenient accuracy (%)"].iloc[0] > 90
    assert {"strict 95% CI low (%)", "lenient 95% CI high (%)", "strict correct", "lenient correct"} <= set(shown)
    captions = " ".join(caption.value for caption in fresh.caption)
    assert "lowest class index where several classes tie" in captions and "any of the classes tied" in captions
    assert "the 4 test units whose ablation lowers no class's accuracy" in captions and "are excluded" in captions
    assert "two-level bootstrap that resamples the 2 test networks" in captions
    assert "does not say how it scores ties" in captions


def test_instances_without_drops_are_refused(tmp_path):
    paths = [fake_instance(tmp_path, f"flat{s}", seed=s, hurts=False) for s in range(4)]
    with pytest.raises(UserError, match="too few units"):
        predict.predict_table(paths)


def test_naming_any_tied_class_counts(tmp_path):
    paths = [fake_instance(tmp_path, f"tied{s}", seed=s, tie=s >= 3) for s in range(5)]
    table = predict.predict_table(paths)
    assert table["tied"] == {"tied0": 0, "tied1": 0, "tied2": 0, "tied3": UNITS - 2, "tied4": UNITS - 2}
    assert table["chance_uniform"] == pytest.approx(2 / K)  # two right answers out of K for every test unit
    assert table["rows"][0]["accuracy"] > 0.9  # the correlation peak names one of the two tied classes


# A hand-made split. Training: three networks whose units each hurt one class, the correlation vector peaking there
# (selectivity the same), so the classifier predicts the class a test unit's correlation peaks at. Test: two networks,
# (class drops, correlation peak) per unit; six units in every network.
TEST_UNITS = {
    "testA": [([0.1, 0, 0, 0], 0),      # one largest class, predicted: strict and lenient right
              ([0.1, 0.1, 0, 0], 1),    # 0 and 1 tie, 1 predicted: lenient right, strict wrong (its label is 0)
              ([0.1, 0.1, 0, 0], 0),    # 0 and 1 tie, 0 predicted: both right
              ([0, 0, 0.2, 0.2], 3),    # 2 and 3 tie, 3 predicted: lenient right, strict wrong
              ([0, 0, 0, 0], 1),        # no class drops: excluded from both scores
              ([-0.1, 0, -0.05, 0], 2)],  # its largest drop is 0: excluded too
    "testB": [([0, 0.1, 0, 0], 1),      # both right
              ([0, 0, 0.1, 0.1], 2),    # 2 and 3 tie, 2 predicted (the lowest index): both right
              ([0, 0.1, 0.1, 0], 2),    # 1 and 2 tie, 2 predicted: lenient right, strict wrong
              ([0.1, 0, 0, 0], 2),      # both wrong
              ([0, 0, 0, 0.1], 3),      # both right
              ([0, 0, 0.1, 0], 0)],     # both wrong
}


@pytest.fixture()
def hand_made(tmp_path) -> list[Path]:
    paths = []
    for s in range(3):
        labels = np.arange(6) % K  # classes 0, 1, 2, 3, 0, 1
        onehot = np.eye(K)[labels]
        paths.append(write_instance(tmp_path, f"train{s}", 0.1 * onehot, onehot, onehot))
    for name, units in TEST_UNITS.items():
        drop = np.array([d for d, _ in units], np.float64)
        peak = np.eye(K)[[p for _, p in units]]
        paths.append(write_instance(tmp_path, name, drop, peak, peak))
    return paths


def test_strict_labels_take_the_lowest_index_and_skip_units_without_a_drop():
    drop = np.array([[0.0, 0.1, 0.04], [0.0, 0.0, 0.0], [-0.02, 0.0, -0.04], [0.06, 0.06, 0.0], [0.0, 0.05, 0.05]])
    assert predict.strict_labels(drop).tolist() == [1, -1, -1, 0, 1]
    loaded = predict.Instance("x", Path("x.h5"), {}, predict.largest_drop_classes(drop))
    assert loaded.label.tolist() == [1, -1, -1, 0, 1]  # the same labels from the largest-drop classes


def test_strict_and_lenient_differ_on_ties(hand_made):
    table = predict.predict_table(hand_made, n_train=3, seed=0, n_resamples=1000)
    assert table["test_stores"] == ["testA", "testB"]
    assert table["n_test"] == 10 and table["n_excluded"] == 2  # the two units of testA with no positive drop
    assert table["unlabelled"]["testA"] == 2 and table["unlabelled"]["testB"] == 0
    assert [row["attribute"] for row in table["rows"]] == ["class correlation", "class selectivity", "ensemble"]
    for row in table["rows"]:
        assert (row["strict_correct"], row["correct"], row["n_test"]) == (5, 8, 10)
        assert row["strict_accuracy"] == 0.5 and row["accuracy"] == 0.8
    # The most frequent training classes are 0 and 1: the guess is 0. Its strict labels: testA 0, 0, 0; testB the
    # fourth unit. Leniently the same four units (no unit ties 0 with a lower class).
    assert table["strict_chance_majority"] == 0.4 and table["chance_majority"] == 0.4
    assert table["strict_chance_uniform"] == 1 / K
    assert table["interval_method"] == predict.CLUSTER and table["n_resamples"] == 1000
    text = predict.format_table(table)
    assert "50.00%" in text and "80.00%" in text and "5/8/10" in text
    assert "the 2 test units whose ablation lowers no class's accuracy" in text


def test_bootstrap_interval_contains_the_estimate_and_repeats_with_the_seed(hand_made):
    first = predict.predict_table(hand_made, seed=3, n_resamples=1000)
    again = predict.predict_table(hand_made, seed=3, n_resamples=1000)
    assert first["rows"] == again["rows"]
    for row in first["rows"]:
        assert row["strict_ci"][0] <= row["strict_accuracy"] <= row["strict_ci"][1]
        assert row["bootstrap_ci"][0] <= row["accuracy"] <= row["bootstrap_ci"][1]
        assert row["strict_ci"][1] - row["strict_ci"][0] > 0
    # The seed is the bootstrap's: on enough units another seed moves the interval, the same one repeats it.
    rng = np.random.default_rng(0)
    scores, groups = rng.random(300) < 0.6, np.repeat(["a", "b", "c"], 100)
    same = [predict.cluster_bootstrap(scores, groups, n_resamples=500, seed=5)[0] for _ in range(2)]
    other, _ = predict.cluster_bootstrap(scores, groups, n_resamples=500, seed=6)
    assert np.array_equal(*same) and not np.array_equal(same[0], other)
    assert same[0][0, 0] <= scores.mean() <= same[0][0, 1]


def test_bootstrap_resamples_networks_then_units():
    scores = np.r_[np.ones(50), np.zeros(50)]  # network a all right, network b all wrong
    groups = np.array(["a"] * 50 + ["b"] * 50)
    (cluster,), method = predict.cluster_bootstrap(scores, groups, n_resamples=2000, seed=0)
    # A quarter of the resamples draw a twice (accuracy 1), a quarter b twice (0): the 95% interval spans [0, 1].
    assert method == predict.CLUSTER and cluster.tolist() == [0.0, 1.0]
    (unit,), method = predict.cluster_bootstrap(scores, np.array(["a"] * 100), n_resamples=2000, seed=0)
    assert method == predict.PER_UNIT and 0.35 < unit[0] < 0.5 < unit[1] < 0.65  # units alone: about +-0.1
    again, _ = predict.cluster_bootstrap(np.c_[scores, 1 - scores], groups, n_resamples=2000, seed=0)
    assert again[0].tolist() == [0.0, 1.0] and again[1].tolist() == [0.0, 1.0]


def test_one_test_network_is_labelled_per_unit(hand_made):
    table = predict.predict_table(hand_made[:4], n_train=3, n_resamples=500)
    assert table["test_stores"] == ["testA"] and table["interval_method"] == predict.PER_UNIT
    assert (table["rows"][0]["strict_correct"], table["rows"][0]["correct"], table["n_test"]) == (2, 4, 4)
    assert "per-unit bootstrap" in predict.format_table(table)


def test_a_table_stored_before_the_strict_score_still_shows(hand_made, monkeypatch):
    table = predict.predict_table(hand_made, n_resamples=200)
    predict.save_table(table)
    group = f"prediction/{LAYER}"
    for path in hand_made:  # strip what the first version did not write
        with h5py.File(path, "r+") as h5:
            for name in predict.NEW_DATASETS:
                del h5[f"{group}/{name}"]
            for key in ("strict_chance_majority", "strict_chance_uniform", "n_excluded", "interval_method",
                        "n_resamples", "scoring"):
                del h5[group].attrs[key]
    old = predict.read_stored(StoreReader(hand_made[0]), LAYER)
    assert old["n_excluded"] == 2 and old["interval_method"] is None  # rebuilt from the test stores' counts
    assert old["rows"][0]["strict_accuracy"] is None and old["rows"][0]["accuracy"] == 0.8
    text = predict.format_table(old)
    assert "—" in text and "Wilson" in text

    monkeypatch.setenv("UNIT_ABLATION_STORES", str(hand_made[0].parent))
    at = open_view("prediction", hand_made[0])
    shown = at.dataframe[0].value
    assert list(shown["strict accuracy (%)"]) == ["—"] * 3 and list(shown["strict correct"]) == ["—"] * 3
    assert shown["lenient accuracy (%)"].iloc[0] == 80 and "lenient 95% Wilson CI low (%)" in shown
    assert at.metric[0].value == "—"
    assert "Wilson intervals over units (per-unit)" in " ".join(caption.value for caption in at.caption)
