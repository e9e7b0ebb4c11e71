"""``python -m compute.report``: the paper's figures as image files, each with the numbers it draws as CSV."""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd
import pytest

from compute.report import main as report
from store import StoreReader

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
