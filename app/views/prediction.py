"""Predicting classes (the paper's Table 1): how well each attribute vector predicts the class a unit matters most for.

Shows the tables ``python -m compute.predict`` stored in the chosen store; a form runs it here over stores of the
same architecture picked from the store directory (the first ones train, the rest test).
"""

from __future__ import annotations

from pathlib import Path

import streamlit as st

from app import loaders
from app.common import chart_downloads, coming_notes, current_store, guarded
from app.common import table as show
from figures.prediction import MISSING, accuracy_chart, scoring_notes, table_frame
from compute.analysis import prediction as predict
from compute.errors import UserError
from store.schema import prediction_path

# Every stored table has these; the strict score's datasets (predict.NEW_DATASETS) are read where present.
DATASETS = predict.DATASETS


def stored_layers(store) -> list[str]:
    return [layer for layer in store.layers if store.has(prediction_path(layer, "accuracy"))]


def stored_table(store, layer: str) -> dict:
    group = prediction_path(layer)
    arrays = {name: loaders.array(store.path, f"{group}/{name}") for name in DATASETS + predict.NEW_DATASETS
              if name in DATASETS or store.has(f"{group}/{name}")}
    return predict.read_table(arrays, store.read_attrs(group), layer)


def _percent(value) -> str:
    return MISSING if value is None else f"{100 * value:.1f}%"


def show_table(table: dict) -> None:
    # Two rows of two: four in a row cut the longer values short ("343 / ...") on a 1000 px page.
    cols = [column for _ in range(2) for column in st.columns(2)]
    ensemble = next((row for row in table["rows"] if row["attribute"] == predict.ENSEMBLE), table["rows"][-1])
    cols[0].metric("Ensemble, strict", _percent(ensemble.get("strict_accuracy")),
                   help="Counts only the largest-drop class, the lowest class index on ties")
    cols[1].metric("Ensemble, lenient", _percent(ensemble["accuracy"]),
                   help="Counts any class tied for the largest drop")
    cols[2].metric("Chance (most frequent class)", f"{_percent(table.get('strict_chance_majority'))} / "
                   f"{_percent(table['chance_majority'])}", help="strict / lenient")
    cols[3].metric("Units train / test / excluded", f"{table['n_train']} / {table['n_test']} / "
                   f"{table.get('n_excluded', MISSING)}",
                   help="excluded: test units whose ablation lowers no class's accuracy")
    chart, frame = accuracy_chart(table), table_frame(table)
    # Taller on the page than the figure's 320 px: its four title lines, slanted labels and three legends left the
    # bars a third of it, and the last legend was cut off at the bottom.
    st.altair_chart(chart.properties(height=460), width="stretch")
    chart_downloads(chart, f"table1-{table['layer']}")
    show(frame, f"table1-{table['layer']}", hide_index=True, width="stretch",
         column_config={c: st.column_config.NumberColumn(format="%.1f") for c in frame.columns
                        if "%" in c and frame[c].dtype.kind == "f"})
    st.caption(" ".join(scoring_notes(table)))
    st.caption(f"Layer {table['layer']}. Trained on {', '.join(table['train_stores'])}; tested on "
               f"{', '.join(table['test_stores'])}. Chance (uniform guess): "
               f"{_percent(table.get('strict_chance_uniform'))} strict, {_percent(table['chance_uniform'])} lenient. "
               f"Seed {table['seed']}.")


def same_model_stores(store) -> list[str]:
    """Paths of the stores in the store directory made with the chosen store's model (instances of it)."""
    found = []
    for path, _ in loaders.available_stores(str(loaders.store_directory())):
        try:
            if loaders.reader(Path(path)).attrs.get("model") == store.attrs.get("model"):
                found.append(path)
        except Exception:  # an unusable file in the directory is simply not offered
            continue
    return sorted(found, key=lambda p: Path(p).stem)


def run_form(store, expanded: bool) -> None:
    candidates = same_model_stores(store)
    with st.expander("Compute a table from instances of this model", expanded=expanded):
        with st.form("predict_form"):
            chosen = st.multiselect("Stores, training instances first", candidates, default=candidates,
                                    format_func=lambda p: Path(p).stem, key="predict_stores")
            cols = st.columns(3)
            layers = [layer for layer in store.layers if store.has_section(layer, "ablation")]
            layer = cols[0].selectbox("Layer", layers, index=len(layers) - 1 if layers else None, key="predict_layer")
            n_train = int(cols[1].number_input("Training instances", min_value=1, value=3, step=1, key="predict_train"))
            seed = int(cols[2].number_input("Seed", min_value=0, value=0, step=1, key="predict_seed"))
            submitted = st.form_submit_button("Train and test")
        if submitted:
            try:
                with st.spinner(f"Training on {n_train} instances, testing on {len(chosen) - n_train}..."):
                    table = predict.predict_table(chosen, layer=layer, n_train=n_train, seed=seed)
                    predict.save_table(table)
            except UserError as error:
                st.error(str(error))
                return
            st.success(f"Stored under prediction/{table['layer']}/ in {len(chosen)} stores.")
            show_table(table)


def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Predicting the class a unit matters most for")
    layers = stored_layers(store)
    coming = False
    if layers:
        layer = st.selectbox("Layer", layers, index=len(layers) - 1, key="prediction_layer")
        show_table(stored_table(store, layer))
    else:
        coming = announce_table()
        if not coming:
            st.info(f"{store.name} holds no prediction table yet. Compute one below or with "
                    f"`python -m compute.predict STORE...` (instances of one model; the first three train).")
    run_form(store, expanded=not (layers or coming))


def announce_table() -> bool:
    """Say how far the first run's background work is with Table 1's instances and the table; False when none is
    being computed (or the suite is not making a table)."""
    from store.progress import suite_status

    directory = loaders.store_directory()
    suite = suite_status(directory)
    if suite is None or not suite.table_stores:
        return False
    present = {Path(path).stem for path, _ in loaders.available_stores(str(directory))}
    missing = [name for name in suite.table_stores if name not in present]
    names = suite.table_stores
    split = (f"trains on {', '.join(names[:3])} and tests on {', '.join(names[3:])}" if len(names) > 3
             else f"is computed over {', '.join(names)}")
    return coming_notes(missing, f"Table 1 {split}; it appears here when computed.", table=True)


guarded(render)
