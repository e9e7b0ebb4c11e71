"""``python -m compute.report``: the paper's figures as image files, each with the numbers it draws as CSV; the
significance table (printed too) from the store's q-values; README.txt with the sign convention, a BN-folded L1 named
as such, and Table 1 read with ``compute.predict.read_stored`` (strict score and bootstrap intervals)."""

from __future__ import annotations

import shutil

import h5py
import numpy as np
import pandas as pd
import pytest
from scipy import stats

from compute.report import main as report
from compute.analysis.significance import LEVEL, significant_drops
from store import StoreReader, StoreWriter
from store.writer import write_array
from tests.test_rotation import significant_copy, strip_tests

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def written(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    assert report([str(tiny_run["store"]), "--out", str(out)]) == 0
    return out / "demo"


def test_every_section_of_the_store_gets_its_figure(written):
    names = {path.name for path in written.iterdir()}
    for layer in ("conv3", "conv4", "conv5"):
        assert {f"fig3-{layer}.png", f"fig5-{layer}.png", f"fig7-{layer}-max-class-drop.png"} <= names
    assert {"fig4a-conv5.png", "fig4b-conv5.png", "fig4-conv5-summary.csv", "dissection-detectors.png"} <= names
    assert "fig4b-conv3.png" not in names  # greedy ran on conv5 only
    for image in written.glob("*.png"):
        assert image.read_bytes().startswith(PNG) and image.stat().st_size > 5_000


def test_figure_numbers_are_the_stores(written, tiny_run):
    store = StoreReader(tiny_run["store"])
    curves = pd.read_csv(written / "fig3-conv4.csv")
    drop = store.layer("conv4", "ablation", "class_drop")
    top = curves[curves["curve"] == "max class drop"].sort_values("rank")
    np.testing.assert_allclose(top["drop (%)"], 100 * np.sort(drop.max(1))[::-1], atol=1e-4)
    summary = pd.read_csv(written / "fig4-conv5-summary.csv", index_col=0)
    acc = store.layer("conv5", "greedy", "class_acc")
    last = acc.shape[1] - 1
    assert summary.loc[last, "greedy, in-sample (paper)"] == pytest.approx(100 * (acc[:, 0] - acc[:, last]).mean())
    detectors = pd.read_csv(written / "dissection-detectors.csv")
    best = store.layer("conv5", "dissection", "best_iou")
    assert detectors[detectors["layer"] == "conv5"]["units"].sum() == int((best > 0.04).sum())


def test_several_stores_add_the_variants_comparison(tiny_run, tmp_path):
    other = tmp_path / "demo-copy.h5"
    shutil.copy(tiny_run["store"], other)
    assert report([str(tiny_run["store"]), str(other), "--out", str(tmp_path / "out"), "--format", "svg",
                   "--layers", "conv5"]) == 0
    variants = tmp_path / "out" / "variants"
    assert (variants / "fig8-variants.svg").read_text().lstrip().startswith("<svg")
    frame = pd.read_csv(variants / "fig9-variants.csv")
    assert list(frame["store"]) == ["demo", "demo-copy"] and frame["detectors"].nunique() == 1
    assert not (tmp_path / "out" / "demo" / "fig3-conv4.svg").exists()


@pytest.mark.parametrize("argv, message", [
    (["no-such-store"], "no store 'no-such-store'"),
    (["STORE", "--layers", "fc9"], "no ablation results for fc9"),
])
def test_bad_input_is_one_line(tiny_run, tmp_path, capsys, argv, message):
    from compute.errors import run_cli

    argv = [str(tiny_run["store"]) if a == "STORE" else a for a in argv]
    assert run_cli(report, argv + ["--out", str(tmp_path), "--store-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def significance_expected(path, layer: str, level: float = LEVEL) -> dict:
    """significance.csv's numbers for one layer, from the store with compute.analysis.significance and scipy (the rotation
    comparison only where the layer has random rotations)."""
    store = StoreReader(path)
    read = lambda section, name: store.layer(layer, section, name)  # noqa: E731
    units = read("ablation", "class_drop")
    unit_sig = significant_drops(read("ablation", "q_value"), units, level).any(1)
    expected = {
        "units": len(units),
        f"units with a significant class drop (q < {level})": int(unit_sig.sum()),
        f"units with a significant overall drop (q < {level})":
            int(significant_drops(read("ablation", "overall_q_value"), read("ablation", "overall_drop"), level).sum()),
    }
    if not store.has_section(layer, "rotation"):
        return expected
    random = read("rotation", "class_drop")
    random_sig = significant_drops(read("rotation", "q_value"), random, level).any(2)
    return {**expected,
            "random directions": random_sig.size,
            f"random directions with a significant class drop (q < {level})": int(random_sig.sum()),
            f"units with a significant class drop (q < {level}) (%)": 100 * unit_sig.mean(),
            f"random directions with a significant class drop (q < {level}) (%)": 100 * random_sig.mean(),
            "max class drop: p (units > random)": stats.mannwhitneyu(
                np.float64(units.max(1)), np.float64(random.max(2).ravel()), alternative="greater").pvalue,
            "overall drop: p (units > random)": stats.mannwhitneyu(
                np.float64(read("ablation", "overall_drop")), np.float64(read("rotation", "overall_drop").ravel()),
                alternative="greater").pvalue}


def check_significance(frame: pd.DataFrame, path, layers) -> None:
    for layer in layers:
        row = frame.set_index("layer").loc[layer]
        for column, value in significance_expected(path, layer).items():
            assert row[column] == pytest.approx(value, rel=1e-12), (layer, column)


def test_significance_table_is_the_stores(written, tiny_run):
    frame = pd.read_csv(written / "significance.csv")
    assert list(frame["layer"]) == ["conv3", "conv4", "conv5"]
    check_significance(frame, tiny_run["store"], ["conv3", "conv4", "conv5"])
    assert (frame[f"units with a significant class drop (q < {LEVEL})"] == 0).all()  # 6 images per class: none can be


def test_significance_counts_hand_made_drops_and_prints(tiny_run, tmp_path, capsys):
    path = significant_copy(tiny_run["store"], tmp_path / "edited.h5")
    assert report([str(path), "--out", str(tmp_path / "out"), "--layers", "conv4", "conv5"]) == 0
    frame = pd.read_csv(tmp_path / "out" / "edited" / "significance.csv")
    check_significance(frame, path, ["conv4", "conv5"])
    row = frame.set_index("layer").loc["conv5"]
    assert row[f"units with a significant class drop (q < {LEVEL})"] == 10  # unit 10's gain is no drop
    assert row[f"units with a significant overall drop (q < {LEVEL})"] == 5
    assert row[f"random directions with a significant class drop (q < {LEVEL})"] == 3
    assert row["max class drop: p (units > random)"] < 0.05
    printed = capsys.readouterr().out
    assert f"significance at q < {LEVEL}" in printed
    rows = [line.rsplit(maxsplit=2) for line in printed.splitlines() if line.strip()]
    lines = {label: values for label, *values in rows}
    assert lines["layer"] == ["conv4", "conv5"]  # one column per layer
    assert lines[f"units with a significant class drop (q < {LEVEL})"] == ["0", "10"]
    # at a stricter level the hand-set q of 0.01 no longer counts
    assert report([str(path), "--out", str(tmp_path / "strict"), "--layers", "conv5", "--fdr", "0.01"]) == 0
    strict = pd.read_csv(tmp_path / "strict" / "edited" / "significance.csv")
    assert strict["units with a significant class drop (q < 0.01)"].tolist() == [0]


def test_a_store_without_the_tests_leaves_the_counts_empty(tiny_run, tmp_path):
    path = strip_tests(significant_copy(tiny_run["store"], tmp_path / "old.h5"))
    assert report([str(path), "--out", str(tmp_path / "out"), "--layers", "conv5"]) == 0
    frame = pd.read_csv(tmp_path / "out" / "old" / "significance.csv")
    assert frame[f"units with a significant class drop (q < {LEVEL})"].isna().all()
    assert frame["units"].tolist() == [128] and frame["max class drop: p (units > random)"].notna().all()
    readme = (tmp_path / "out" / "old" / "README.txt").read_text()
    assert "recompute with python -m compute.all --model demo --force" in readme


def test_readme_states_the_sign_and_the_test(written):
    from compute.analysis.relations import SIGN_NOTE
    from figures.rotation import TEST_NOTE

    readme = (written / "README.txt").read_text()
    assert SIGN_NOTE in readme and TEST_NOTE in readme
    assert "BN-folded" not in readme  # the demo network has no batch norm


def test_bn_folded_l1_is_named_so(tiny_run, tmp_path):
    path = tmp_path / "folded.h5"
    shutil.copy(tiny_run["store"], path)
    with h5py.File(path, "r+") as h5:
        h5["layers/conv5/attributes/l1"].attrs["folded_batch_norm"] = "bn5"
    assert report([str(path), "--out", str(tmp_path / "out"), "--layers", "conv5"]) == 0
    coefficients = pd.read_csv(tmp_path / "out" / "folded" / "fig5-conv5-coefficients.csv")
    assert "BN-folded L1" in set(coefficients["attribute"]) and "L1" not in set(coefficients["attribute"])
    assert "BN-folded L1" in pd.read_csv(tmp_path / "out" / "folded" / "fig5-conv5.csv").columns
    assert "batch norm bn5" in (tmp_path / "out" / "folded" / "README.txt").read_text()


K, UNITS = 4, 24


def prediction_instance(directory, name: str, seed: int):
    """A store with conv5 drops and attributes only (like one written before the significance tests), whose class
    correlation peaks at the class its unit hurts most."""
    rng = np.random.default_rng(seed)
    onehot = np.eye(K)[rng.integers(0, K, UNITS)]
    class_drop = 0.2 * onehot + 0.02 * rng.random((UNITS, K))
    writer = StoreWriter(directory / f"{name}.h5", name, {"model": "demo", "arch": "demo", "weights_sha256": name,
                                                          "layer_order": ["conv5"]})
    with writer.stage("setup") as h5:
        write_array(h5, "classes", np.array([f"class{k}" for k in range(K)], dtype=object))
    with writer.stage("ablation/conv5") as h5:
        write_array(h5, "layers/conv5/ablation/class_drop", class_drop.astype(np.float32))
        write_array(h5, "layers/conv5/ablation/overall_drop", class_drop.mean(1).astype(np.float32))
    with writer.stage("attributes/conv5") as h5:
        write_array(h5, "layers/conv5/attributes/correlation", onehot + 0.3 * rng.normal(size=(UNITS, K)))
        write_array(h5, "layers/conv5/attributes/selectivity", rng.normal(size=(UNITS, K)))
    return writer.commit()


def test_table1_has_the_strict_score_and_bootstrap_intervals(tmp_path):
    from compute.analysis import prediction as predict
    from figures.prediction import scoring_notes, table_frame

    paths = [prediction_instance(tmp_path, f"seed{s}", s) for s in range(5)]
    predict.save_table(predict.predict_table(paths, n_train=3, seed=0, n_resamples=200))
    assert report([str(paths[-1]), "--out", str(tmp_path / "out")]) == 0
    out = tmp_path / "out" / "seed4"
    shown = pd.read_csv(out / "table1-conv5.csv")
    stored = table_frame(predict.read_stored(StoreReader(paths[-1]), "conv5"))
    assert list(shown.columns) == list(stored.columns)
    assert "strict accuracy (%)" in shown and "lenient 95% CI low (%)" in shown  # bootstrap, not Wilson
    np.testing.assert_allclose(shown["strict accuracy (%)"], stored["strict accuracy (%)"].astype(float))
    np.testing.assert_allclose(shown["lenient 95% CI high (%)"], stored["lenient 95% CI high (%)"].astype(float))
    readme = (out / "README.txt").read_text()
    assert all(note in readme for note in scoring_notes(predict.read_stored(StoreReader(paths[-1]), "conv5")))
    # no counts, p- or q-values in these stores: the significance table says so instead of guessing
    frame = pd.read_csv(out / "significance.csv")
    assert frame["units"].tolist() == [UNITS]
    assert frame[f"units with a significant class drop (q < {LEVEL})"].isna().all()
