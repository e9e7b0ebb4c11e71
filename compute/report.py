"""The paper's figures for one or more stores as image files, for papers and slides.

    python -m compute.report STORE [STORE ...] [--out DIR] [--format png|svg] [--layers conv4 conv5]

STORE is a store file or the name of one in the store directory. Each figure comes with a CSV of the numbers it draws,
and the charts are the ones the app shows (``figures/``), rendered without a browser. With several stores, the
variants comparison (Figs. 8 and 9) is written too.

Per store, ``significance.csv`` (also printed) says per layer how many units have a significant class drop and a
significant overall drop (positive, Benjamini-Hochberg q below ``--fdr``), and, where the layer has random rotations,
the same share for random directions and the Mann-Whitney tests of units against random directions
(``figures.rotation.comparison``, as on the Rotation page). ``README.txt`` beside the figures holds the sentences a
reader needs to read them: the drops' sign against the paper's Fig. 5, a BN-folded L1, how Table 1 is scored.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import altair as alt
import pandas as pd

from compute import paths
from compute.errors import UserError, run_cli
from compute.analysis.significance import LEVEL
from figures import FORMATS, render
from figures import attributes as fig5
from figures import dissection, greedy, overview, prediction, rotation, variants
from store import StoreError, StoreReader
from store.schema import layer_path, prediction_path

DETECTOR_IOU = 0.04


def resolve(name: str, store_dir: Path) -> StoreReader:
    """A store given as a path or as a name in the store directory, opened (one-line error if it cannot be)."""
    candidates = [Path(name), store_dir / name, store_dir / f"{name}.h5"]
    found = next((path for path in candidates if path.is_file()), None)
    if found is None:
        raise UserError(f"no store {name!r} (looked for it as a file and in {store_dir}): give a store file or the "
                        "name of one that `python -m compute.all` wrote")
    try:
        return StoreReader(found)
    except StoreError as error:
        raise UserError(str(error)) from None


class Report:
    """Writes figures (image + CSV of their numbers) under one directory and remembers what it wrote."""

    def __init__(self, out: Path, fmt: str):
        self.out, self.fmt, self.written, self.notes = out, fmt, [], {}
        out.mkdir(parents=True, exist_ok=True)

    def note(self, topic: str, text: str) -> None:
        """A sentence for README.txt under ``topic`` (each sentence once)."""
        self.notes.setdefault(topic, [])
        if text not in self.notes[topic]:
            self.notes[topic].append(text)

    def readme(self, title: str) -> None:
        """README.txt: what the directory holds, then the notes by topic."""
        if not self.notes:
            return
        lines = [title, "", "Each figure's numbers are in the CSV file of the same name.", ""]
        for topic, texts in self.notes.items():
            lines += [f"{topic}:", *(f"- {text}" for text in texts), ""]
        path = self.out / "README.txt"
        path.write_text("\n".join(lines))
        self.written.append(path)

    def figure(self, name: str, chart, numbers: pd.DataFrame | None = None) -> None:
        path = self.out / f"{name}.{self.fmt}"
        path.write_bytes(render(chart, self.fmt))
        self.written.append(path)
        if numbers is not None:
            self.table(name, numbers)

    def table(self, name: str, numbers: pd.DataFrame, index: bool = False) -> None:
        path = self.out / f"{name}.csv"
        numbers.to_csv(path, index=index)
        self.written.append(path)


def optional(store: StoreReader, layer: str, section: str, name: str):
    """A layer's dataset, or None in a store written before it existed."""
    path = layer_path(layer, section, name)
    return store.read(path) if store.has(path) else None


SIGNIFICANCE_TOPIC = "Significance (significance.csv)"


def significance_row(store: StoreReader, layer: str, level: float) -> dict:
    """One layer's line of significance.csv: units and how many have a significant class drop and overall drop, then
    (where the layer has random rotations) the rotation comparison of the Rotation page. Counts the store cannot give
    (written before the tests) are None."""
    drop = store.layer(layer, "ablation", "class_drop")
    overall = store.layer(layer, "ablation", "overall_drop")
    q_value = optional(store, layer, "ablation", "q_value")
    row = {"layer": layer, **overview.significance_counts(drop, q_value, overall,
                                                          optional(store, layer, "ablation", "overall_q_value"), level)}
    if store.has_section(layer, "rotation"):
        compared = rotation.comparison(drop, overall, store.layer(layer, "rotation", "class_drop"),
                                       store.layer(layer, "rotation", "overall_drop"), q_value,
                                       optional(store, layer, "rotation", "q_value"), level)
        row.update({key: value for key, value in compared.items() if key not in row})
    return row


def significance_table(report: Report, store: StoreReader, layers: list[str], level: float) -> pd.DataFrame:
    """significance.csv (one row per layer, the level in the column names), printed as well."""
    frame = pd.DataFrame([significance_row(store, layer, level) for layer in layers])
    frame = frame.rename(columns={name: name.replace(" drop", f" drop (q < {level})", 1) for name in frame.columns
                                  if "significant" in name})
    report.table("significance", frame)
    missing = frame.isna().any().any()
    report.note(SIGNIFICANCE_TOPIC, (
        f"A drop is significant when it is positive (accuracy lost) and its q-value is below {level}: exact McNemar "
        "test on the images the ablation flips each way, Benjamini-Hochberg over the layer's units x classes (for "
        "random directions, over each rotation's directions x classes; the shares pool all rotations' directions)."))
    if "rotations" in frame.columns:
        report.note(SIGNIFICANCE_TOPIC, rotation.TEST_NOTE)
    if missing:
        report.note(SIGNIFICANCE_TOPIC, "Empty cells: not in this store (written before the significance tests), "
                    f"recompute with python -m compute.all --model {store.attrs.get('model', 'MODEL')} --force.")
    print(f"{store.name}: significance at q < {level} (one column per layer)")
    print(frame.set_index("layer").T.to_string(na_rep="—", float_format=lambda v: f"{v:.4g}"))
    return frame


def layer_figures(report: Report, store: StoreReader, layer: str) -> None:
    """Every per-layer figure the store has the sections for."""
    from compute.analysis.relations import (CONFIDENCE, FOLDED_L1, SIGN_NOTE, TARGETS, coefficients, drop_targets,
                                            folded_l1, name_folded_l1, scalar_attributes, store_reader)

    title = f"{store.name} {layer}"
    drop = store.layer(layer, "ablation", "class_drop")
    overall = store.layer(layer, "ablation", "overall_drop")
    frame = overview.curve_frame(drop, overall)
    report.figure(f"fig3-{layer}", overview.curve_chart(frame, title=title), frame)
    if store.has_section(layer, "attributes"):
        read = store_reader(store.read, store.has, layer)
        attributes, targets = scalar_attributes(read), drop_targets(read)
        table = coefficients(read, attributes, targets)
        l1 = store.read_attrs(layer_path(layer, "attributes", "l1"))
        if folded_l1(l1):
            attributes, table = name_folded_l1(attributes, table)
            report.note("Fig. 5", f"{layer}: {FOLDED_L1} is |gamma| / sqrt(running var + eps) * ||w||_1 of "
                        f"{l1.get('source', 'the conv')}'s filter through batch norm {folded_l1(l1)}; batch norm "
                        "undoes any rescaling of the filter, so this, not the plain ||w||_1, is the unit's own norm.")
        units = fig5.unit_frame(attributes, targets, drop, list(store.classes))
        shown = [name for name in attributes if name in list(table["attributes"])]
        chart = fig5.scatter_grid(units, shown, [name for name, *_ in TARGETS], table, interactive=False)
        report.figure(f"fig5-{layer}", chart.properties(title=alt.TitleParams(
            f"{title}: attributes against drops", anchor="start",
            subtitle="drops are baseline minus ablated (positive = accuracy lost), the opposite of the paper's "
                     "Fig. 5 sign")), units)
        report.table(f"fig5-{layer}-coefficients", fig5.coefficient_frame(table, CONFIDENCE))
        report.note("Fig. 5", f"{SIGN_NOTE} (fig5-<layer>-coefficients.csv)")
    if store.has_section(layer, "greedy"):
        acc = {name: store.layer(layer, "greedy", name) for name in
               ("classes", "class_acc", "random_class_acc", "heldout_acc", "heldout_select_acc")}
        chart, numbers = greedy.greedy_against_random(acc["class_acc"], acc["random_class_acc"])
        report.figure(f"fig4b-{layer}", chart.properties(title=f"{title}: greedy against random order"), numbers)
        chart, numbers = greedy.class_curves(acc["class_acc"], [store.classes[int(k)] for k in acc["classes"]])
        report.figure(f"fig4a-{layer}", chart.properties(title=f"{title}: greedy ablation per class"), numbers)
        marks, summary = greedy.drop_summary(acc["class_acc"], acc["heldout_acc"], acc["random_class_acc"])
        report.table(f"fig4-{layer}-summary", pd.DataFrame(summary, index=pd.Index(marks, name="units ablated")),
                     index=True)
    if store.has_section(layer, "rotation"):
        curves = rotation.curves(drop, overall, store.layer(layer, "rotation", "class_drop"),
                                 store.layer(layer, "rotation", "overall_drop"))
        for name, values in curves.items():
            numbers = pd.concat([rotation.sorted_band(v).assign(kind=kind) for kind, v in values.items()])
            report.figure(f"fig7-{layer}-{name.replace(' ', '-')}",
                          rotation.curve_chart(values, name).properties(title=f"{title}: {name}"), numbers)
    if store.has(prediction_path(layer, "accuracy")):
        from compute.analysis.prediction import read_stored

        table = read_stored(store, layer)
        report.figure(f"table1-{layer}", prediction.accuracy_chart(table), prediction.table_frame(table))
        for text in prediction.scoring_notes(table):
            report.note(f"Table 1 ({layer})", text)


def detector_figure(report: Report, store: StoreReader, layers: list[str], threshold: float) -> None:
    names, categories = store.read("concepts/names"), store.read("concepts/categories")
    found = {layer: dissection.detector_frame(store.layer(layer, "dissection", "best_concept"),
                                              store.layer(layer, "dissection", "best_iou"), names, categories,
                                              threshold) for layer in layers}
    for layer, detectors in found.items():
        report.table(f"dissection-{layer}-concepts", dissection.concept_table(detectors))
    counts = dissection.category_counts(found)
    report.figure("dissection-detectors", dissection.counts_chart(counts, layers).properties(
        title=f"{store.name}: detector units (IoU > {threshold})"), counts)


def store_report(store: StoreReader, out: Path, fmt: str, layers: list[str] | None, threshold: float,
                 level: float = LEVEL) -> Report:
    report = Report(out, fmt)
    chosen = [layer for layer in store.layers if store.has_section(layer, "ablation")
              and (not layers or layer in layers)]
    if not chosen:
        raise UserError(f"{store.name} has no ablation results for {', '.join(layers) if layers else 'any layer'}: "
                        f"its layers are {', '.join(store.layers) or 'none'}")
    from tqdm import tqdm

    for layer in tqdm(chosen, desc=f"figures for {store.name}", unit="layer"):
        layer_figures(report, store, layer)
    dissected = [layer for layer in chosen if store.has_section(layer, "dissection")]
    if dissected:
        detector_figure(report, store, dissected, threshold)
    significance_table(report, store, chosen, level)
    report.readme(f"Figures of the store {store.name}, written by python -m compute.report.")
    return report


def variants_report(stores: list[StoreReader], out: Path, fmt: str, layers: list[str] | None,
                    threshold: float) -> Report:
    """Figs. 8 and 9 over the stores' shared ablated (and dissected) layers."""
    report = Report(out, fmt)
    names = [store.name for store in stores]
    layers = [layer for layer in stores[0].layers if all(s.has_section(layer, "ablation") for s in stores)
              and (not layers or layer in layers)]
    if not layers:
        raise UserError(f"the stores {', '.join(names)} share no ablated layer to compare")
    frame = variants.sorted_max_drops({(s.name, layer): s.layer(layer, "ablation", "class_drop")
                                       for s in stores for layer in layers})
    report.figure("fig8-variants", variants.max_drop_chart(frame, names, layers), frame)
    rows = [{"store": s.name, "layer": layer, "units": len(iou), "detectors": int((iou > threshold).sum())}
            for s in stores for layer in layers if s.has_section(layer, "dissection")
            for iou in [s.layer(layer, "dissection", "best_iou")]]
    if rows:
        report.figure("fig9-variants", variants.detector_chart(pd.DataFrame(rows), names, layers), pd.DataFrame(rows))
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.report", description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", metavar="STORE", help="store files, or names in the store directory")
    parser.add_argument("--out", type=Path, default=Path("reports"), help="directory for the figures (default ./reports)")
    parser.add_argument("--format", choices=FORMATS, default="png")
    parser.add_argument("--layers", nargs="+", help="only these layers (default: every ablated layer)")
    parser.add_argument("--iou-threshold", type=float, default=DETECTOR_IOU, help="best-concept IoU of a detector")
    parser.add_argument("--fdr", type=float, default=LEVEL, help="false discovery rate below which a drop's q-value "
                                                                 f"is significant (default {LEVEL})")
    parser.add_argument("--store-dir", help="where store names are looked up (default: $UNIT_ABLATION_STORES or "
                                            "<data dir>/stores)")
    parser.add_argument("--data-dir")
    args = parser.parse_args(argv)
    if not 0 < args.fdr < 1:
        raise UserError(f"--fdr must be between 0 and 1 (got {args.fdr})")
    store_dir = paths.store_dir(args.store_dir, args.data_dir)
    stores = [resolve(name, store_dir) for name in args.stores]
    written = []
    try:
        for store in stores:
            written += store_report(store, args.out / store.name, args.format, args.layers,
                                    args.iou_threshold, args.fdr).written
        if len(stores) > 1:
            written += variants_report(stores, args.out / "variants", args.format, args.layers,
                                       args.iou_threshold).written
    except StoreError as error:
        raise UserError(str(error)) from None
    images = sum(path.suffix == f".{args.format}" for path in written)
    tables = sum(path.suffix == ".csv" for path in written)
    notes = sum(path.suffix == ".txt" for path in written)
    print(f"wrote {images} figures, {tables} CSV files and {notes} README.txt under {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
