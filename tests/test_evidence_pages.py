"""The pages show which drops are beyond sampling noise: Overview counts, Unit marks, Search filters (issue 14)."""

import shutil

import h5py
import pytest

from tests.views import open_view

UNIT, CLASS = 3, 2


@pytest.fixture()
def evidence_store(tiny_run, tmp_path, monkeypatch):
    """A copy of the tiny store in which conv5 unit 3 loses every image of class 2, with a q-value of 0.02 written in.
    (Six images a class cannot make a significant drop among a layer's 3,072 tests: p = 1/32 at best, q = 1. The tiny
    network is at chance: nothing else is significant.)"""
    directory = tmp_path / "stores"
    directory.mkdir()
    path = directory / "demo.h5"
    shutil.copy(tiny_run["store"], path)
    with h5py.File(path, "r+") as f:
        group = f["layers/conv5/ablation"]
        lost, gained, drop = group["lost"][()], group["gained"][()], group["class_drop"][()]
        lost[UNIT, CLASS], gained[UNIT, CLASS], drop[UNIT, CLASS] = 6, 0, 1.0
        group["lost"][...], group["gained"][...], group["class_drop"][...] = lost, gained, drop
        q = group["q_value"][()]
        q[UNIT, CLASS] = 0.02
        group["q_value"][...] = q
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    return {"path": path, "units": lost.shape[0]}


def test_overview_counts_units_with_a_significant_drop(evidence_store):
    at = open_view("overview", evidence_store["path"], layer="conv5")
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Significant class drop"] == f"1 / {evidence_store['units']}"
    assert metrics["Significant overall drop"] == f"0 / {evidence_store['units']}"
    at = open_view("overview", evidence_store["path"], layer="conv5", fdr="0.01")
    assert {m.label: m.value for m in at.metric}["Significant class drop"] == f"0 / {evidence_store['units']}"


def test_unit_page_marks_significant_classes_with_their_counts(evidence_store):
    at = open_view("unit", evidence_store["path"], layer="conv5", unit=str(UNIT))
    metrics = {m.label: m for m in at.metric}
    assert metrics["Significant class drops (q < 0.05)"].value == "1"
    assert metrics["Max class drop"].value == "100.0 pts"
    assert "6 images lost, 0 gained" in metrics["Max class drop"].proto.help
    at = open_view("unit", evidence_store["path"], layer="conv5", unit="4")
    assert {m.label: m.value for m in at.metric}["Significant class drops (q < 0.05)"] == "0"


def test_search_keeps_only_significant_units(evidence_store):
    at = open_view("search", evidence_store["path"], significant="1")
    assert at.checkbox(key="search_significant").value
    found = {m.label: m.value for m in at.metric}["Units found"]
    assert found.startswith("1 of ")


def test_old_stores_without_counts_still_show(tiny_run, tmp_path, monkeypatch):
    directory = tmp_path / "old"
    directory.mkdir()
    path = directory / "demo.h5"
    shutil.copy(tiny_run["store"], path)
    with h5py.File(path, "r+") as f:
        for layer in f["layers"]:
            for name in ("lost", "gained", "p_value", "q_value", "overall_lost", "overall_gained",
                         "overall_p_value", "overall_q_value"):
                del f[f"layers/{layer}/ablation/{name}"]
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(directory))
    at = open_view("overview", path, layer="conv5")
    assert {m.label: m.value for m in at.metric}["Significant class drop"] == "—"
    at = open_view("unit", path, layer="conv5", unit="1")
    assert {m.label: m.value for m in at.metric}["Significant class drops (q < 0.05)"] == "—"
    open_view("search", path)
