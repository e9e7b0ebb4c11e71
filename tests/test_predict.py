"""Table 1 on synthetic instances: the split is by instance, numbers are reproducible by seed, and the stored table
reads back; mismatched stores are refused; the Predicting classes page shows and computes tables."""

from pathlib import Path

import numpy as np
import pytest

from compute import predict
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
    writer = StoreWriter(directory / f"{name}.h5", name, {"model": model, "arch": "demo", "weights_sha256": name,
                                                          "layer_order": [LAYER]})
    with writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(classes, dtype=object))
    with writer.stage(f"ablation/{LAYER}") as h5:
        write_array(h5, f"layers/{LAYER}/ablation/class_drop", class_drop.astype(np.float32))
        write_array(h5, f"layers/{LAYER}/ablation/overall_drop", class_drop.mean(1).astype(np.float32))
    with writer.stage(f"attributes/{LAYER}") as h5:
        write_array(h5, f"layers/{LAYER}/attributes/correlation", onehot + 0.3 * rng.normal(size=(UNITS, K)))
        write_array(h5, f"layers/{LAYER}/attributes/selectivity", rng.normal(size=(UNITS, K)))
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
    assert predict.main([str(p) for p in instances] + ["--layer", LAYER, "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "class correlation" in out and "ensemble" in out and "chance (uniform)" in out
    table = predict.predict_table(instances, seed=1)
    for path in instances:
        store = StoreReader(path)
        group = f"prediction/{LAYER}"
        arrays = {name: store.read(f"{group}/{name}") for name in ("attributes", "accuracy", "ci", "correct", "n_test")}
        stored = predict.read_table(arrays, store.read_attrs(group), LAYER)
        assert stored["rows"] == [dict(row, ci=tuple(row["ci"])) for row in table["rows"]]
        assert stored["train_stores"] == table["train_stores"] and stored["seed"] == 1


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
    assert shown["accuracy (%)"].iloc[0] > 90


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
