"""Predicting the class a unit matters most for from its attributes (the paper's Table 1).

``python -m compute.predict STORE... [--layer conv5] [--train 3] [--seed 0]``

Each store is one instance of the same architecture (e.g. the demo model trained with seeds 0..4). Per unit the
features are an attribute vector (class correlation [K], class selectivity [K], concept IoU [concepts] where the
stores hold dissection results); the label is the class whose accuracy drops most when the unit is ablated. One
logistic regression (standardised features) per attribute is trained on the units of the first ``--train`` instances
and tested on the units of the others; the ensemble averages the per-attribute models' predicted probabilities. The
split is by instance, never by unit: units of one network share its training history, so mixing them across the
split would leak. Accuracy comes with a Wilson interval and two chance levels: always guessing the training set's
most frequent class, and a uniform random guess. The table is printed and written into every input store under
``prediction/<layer>/``.

Ties: accuracy drops move in steps of 1/(images per class), so several classes often share a unit's largest drop
(about a third of the demo's conv5 units). Each of them is then "the class with the largest drop": a prediction is
correct if it names any of them, and in training the unit counts once, spread evenly over its tied classes (sample
weights 1/t). A unit whose ablation lowers no class's accuracy has no such class and is left out.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from compute.errors import UserError, run_cli

# Table 1's attributes: (name, section, dataset under layers/<layer>/).
FEATURES = (
    ("concept IoU", "dissection", "iou"),
    ("class correlation", "attributes", "correlation"),
    ("class selectivity", "attributes", "selectivity"),
)
ENSEMBLE = "ensemble"
CONFIDENCE = 0.95
MAX_ITER = 5000


@dataclass
class Instance:
    """One network instance's units at one layer: attribute matrices and each unit's largest-drop classes."""

    name: str
    path: Path
    features: dict[str, np.ndarray]
    best: np.ndarray  # bool [U, K]: the classes with the unit's largest positive drop (none where no class drops)
    identity: dict = field(default_factory=dict)  # what must agree across instances

    @property
    def labelled(self) -> np.ndarray:
        return self.best.any(1)


def largest_drop_classes(class_drop: np.ndarray) -> np.ndarray:
    """bool [U, K]: True for the classes whose accuracy drops most when the unit is ablated (several when tied).

    A unit whose ablation lowers no class's accuracy (largest drop <= 0) gets an all-False row: there is no class it
    matters for.
    """
    class_drop = np.asarray(class_drop)
    largest = class_drop.max(1, keepdims=True)
    return (class_drop == largest) & (largest > 0)


def load_instance(path, layer: str | None) -> tuple[Instance, str]:
    """Read one store's attribute matrices and largest-drop classes at ``layer`` (default: the deepest with
    ablation results)."""
    from store import StoreError, StoreReader

    path = Path(path)
    try:
        store = StoreReader(path)
        if layer is None:
            layers = [name for name in store.layers if store.has_section(name, "ablation")]
            if not layers:
                raise UserError(f"{path.name} has no ablation results: run `python -m compute.all` on it first")
            layer = layers[-1]
        store.require(layer, "ablation")
        store.require(layer, "attributes")
        features = {name: np.asarray(store.layer(layer, section, dataset), np.float64)
                    for name, section, dataset in FEATURES if store.has(f"layers/{layer}/{section}/{dataset}")}
        class_drop = store.layer(layer, "ablation", "class_drop")
        concepts = store.read("concepts/names") if store.has("concepts/names") else None
    except StoreError as error:
        raise UserError(str(error)) from None
    identity = {"model": store.attrs.get("model"), "arch": store.attrs.get("arch"), "classes": list(store.classes),
                "units": len(class_drop), "concepts": None if concepts is None else list(concepts),
                "weights": store.attrs.get("weights_sha256")}
    return Instance(store.name, path, features, largest_drop_classes(class_drop), identity), layer


def check_instances(instances: list[Instance], n_train: int) -> None:
    """Instances of one architecture, same classes and layer size, each a distinct network, enough for a split."""
    if n_train < 1 or len(instances) <= n_train:
        raise UserError(f"need more than --train {n_train} stores (got {len(instances)}): give at least "
                        f"{max(n_train, 1) + 1} instances of one model")
    first = instances[0]
    for other in instances[1:]:
        for key in ("model", "arch", "classes", "units"):
            if other.identity[key] != first.identity[key]:
                raise UserError(f"{other.name} and {first.name} differ in {key}: give stores of one architecture "
                                f"with the same classes and layer")
    for key in ("name", "weights"):
        values = [instance.name if key == "name" else instance.identity[key] for instance in instances]
        if len(set(values)) != len(values):
            raise UserError(f"one instance is given twice (same store {key}): give each trained network once")


def shared_features(instances: list[Instance]) -> list[str]:
    """Attributes every instance holds with the same columns (concept IoU only where all stores have dissection
    results over the same concepts)."""
    names = []
    for name, _, _ in FEATURES:
        arrays = [instance.features.get(name) for instance in instances]
        if any(a is None for a in arrays) or len({a.shape[1:] for a in arrays}) > 1:
            continue
        if name == "concept IoU" and len({json.dumps(i.identity["concepts"]) for i in instances}) > 1:
            continue
        names.append(name)
    return names


def design(instances: list[Instance], attribute: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stack the instances' labelled units: X [N, F], best [N, K] (their largest-drop classes), groups [N] (the
    instance each unit belongs to)."""
    xs, best, groups = [], [], []
    for instance in instances:
        keep = instance.labelled
        xs.append(instance.features[attribute][keep])
        best.append(instance.best[keep])
        groups.extend([instance.name] * int(keep.sum()))
    return np.concatenate(xs), np.concatenate(best), np.array(groups, dtype=object)


def split_by_instance(groups: np.ndarray, train_names) -> tuple[np.ndarray, np.ndarray]:
    """Boolean train and test masks over units: a unit is in training iff its instance is a training instance."""
    train = np.isin(groups, list(train_names))
    return train, ~train


def _classifier(seed: int):
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=MAX_ITER, random_state=seed))


def tie_weighted(x: np.ndarray, best: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Training rows: each unit once per tied class, weighted 1/t, so every unit weighs 1 in all."""
    unit, label = np.nonzero(best)
    return x[unit], label, 1.0 / best.sum(1)[unit]


def _accuracy_row(name: str, correct: np.ndarray, confidence: float) -> dict:
    k, n = int(correct.sum()), len(correct)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"attribute": name, "correct": k, "n_test": n, "accuracy": k / n, "ci": (ci.low, ci.high)}


def predict_table(paths, layer: str | None = None, n_train: int = 3, seed: int = 0,
                  confidence: float = CONFIDENCE) -> dict:
    """Table 1 over the given stores: train on the first ``n_train`` instances, test on the rest.

    Returns {'layer', 'rows': [{'attribute', 'accuracy', 'ci', 'correct', 'n_test'}...], 'chance_majority',
    'chance_uniform', 'n_train', 'n_test', 'train_stores', 'test_stores', 'unlabelled', 'tied', 'seed', 'confidence',
    'paths'}. Same stores and seed give identical numbers.
    """
    instances = []
    for path in paths:
        instance, chosen = load_instance(path, layer)
        layer = layer or chosen
        instances.append(instance)
    check_instances(instances, n_train)
    attributes = shared_features(instances)
    if not attributes:
        raise UserError("the stores hold no attribute vectors: run `python -m compute.all` on them first")
    train_names = [instance.name for instance in instances[:n_train]]
    rows, probabilities = [], []
    for attribute in attributes:
        x, best, groups = design(instances, attribute)
        train, test = split_by_instance(groups, train_names)
        x_train, y_train, weight = tie_weighted(x[train], best[train])
        if len(np.unique(y_train)) < 2 or not test.any():
            raise UserError(f"too few units whose ablation lowers a class's accuracy at {layer} "
                            f"({train.sum()} for training, {test.sum()} for testing): use better-trained instances")
        model = _classifier(seed).fit(x_train, y_train, logisticregression__sample_weight=weight)
        probabilities.append(model.predict_proba(x[test]))
        rows.append(_accuracy_row(attribute, best[test, model.predict(x[test])], confidence))
    # Labels and split do not depend on the attribute: every model saw the same units, so best, train, test, the
    # training labels and the probability columns (model.classes_) are shared.
    classes = model.classes_
    ensemble = classes[np.mean(probabilities, axis=0).argmax(1)]
    rows.append(_accuracy_row(ENSEMBLE, best[test, ensemble], confidence))
    majority = np.bincount(y_train, weights=weight).argmax()
    return {
        "layer": layer, "rows": rows, "attributes": attributes,
        "chance_majority": float(np.mean(best[test, majority])),
        "chance_uniform": float(best[test].sum(1).mean() / best.shape[1]),
        "n_train": int(train.sum()), "n_test": int(test.sum()),
        "train_stores": train_names, "test_stores": [i.name for i in instances[n_train:]],
        "unlabelled": {i.name: int((~i.labelled).sum()) for i in instances},
        "tied": {i.name: int((i.best.sum(1) > 1).sum()) for i in instances},
        "seed": seed, "confidence": confidence, "paths": [str(i.path) for i in instances],
    }


def format_table(table: dict) -> str:
    """Plain-text Table 1: one line per attribute, then chance levels and the split."""
    level = int(round(100 * table["confidence"]))
    lines = [f"Predicting the class each unit of {table['layer']} matters most for "
             f"(train: {', '.join(table['train_stores'])}; test: {', '.join(table['test_stores'])})",
             f"{'attribute':<20}{'accuracy':>10}   {level}% CI (Wilson)    correct/units"]
    for row in table["rows"]:
        lines.append(f"{row['attribute']:<20}{100 * row['accuracy']:>9.2f}%   "
                     f"[{100 * row['ci'][0]:5.1f}%, {100 * row['ci'][1]:5.1f}%]    {row['correct']}/{row['n_test']}")
    lines.append(f"{'chance (majority)':<20}{100 * table['chance_majority']:>9.2f}%   "
                 f"always the training set's most frequent class")
    lines.append(f"{'chance (uniform)':<20}{100 * table['chance_uniform']:>9.2f}%   "
                 f"a uniform random guess (1/K, more where classes tie)")
    skipped = sum(table["unlabelled"].values())
    lines.append(f"{table['n_train']} training units, {table['n_test']} test units; {skipped} units whose ablation "
                 f"lowers no class's accuracy left out; {sum(table['tied'].values())} units with tied classes; "
                 f"seed {table['seed']}")
    return "\n".join(lines)


def save_table(table: dict) -> None:
    """Write the table into every input store under prediction/<layer>/ (each store replaced atomically)."""
    from store.writer import amend, write_array

    group = f"prediction/{table['layer']}"
    rows = table["rows"]
    arrays = {
        "attributes": np.array([r["attribute"] for r in rows], dtype=object),
        "accuracy": np.array([r["accuracy"] for r in rows]),
        "ci": np.array([r["ci"] for r in rows]),
        "correct": np.array([r["correct"] for r in rows], np.int64),
        "n_test": np.array([r["n_test"] for r in rows], np.int64),
    }
    attrs = {key: table[key] for key in ("chance_majority", "chance_uniform", "n_train", "n_test", "seed",
                                         "confidence")}
    attrs.update({key: json.dumps(table[key]) for key in ("train_stores", "test_stores", "unlabelled", "tied")})
    for path in table["paths"]:
        with amend(Path(path)) as h5:
            if group in h5:
                del h5[group]
            for name, value in arrays.items():
                write_array(h5, f"{group}/{name}", value)
            h5[group].attrs.update(attrs)


def read_table(arrays: dict, attrs: dict, layer: str) -> dict:
    """The stored table back in predict_table's shape, from its datasets and the group's attributes (the app reads
    them through its cached loaders)."""
    rows = [{"attribute": str(name), "accuracy": float(acc), "ci": (float(ci[0]), float(ci[1])),
             "correct": int(correct), "n_test": int(n)}
            for name, acc, ci, correct, n in zip(arrays["attributes"], arrays["accuracy"], arrays["ci"],
                                                 arrays["correct"], arrays["n_test"])]
    table = {"layer": layer, "rows": rows, "attributes": [r["attribute"] for r in rows if r["attribute"] != ENSEMBLE]}
    for key in ("chance_majority", "chance_uniform", "confidence"):
        table[key] = float(attrs[key])
    for key in ("n_train", "n_test", "seed"):
        table[key] = int(attrs[key])
    for key in ("train_stores", "test_stores", "unlabelled", "tied"):
        table[key] = json.loads(attrs[key])
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compute.predict", description=__doc__.splitlines()[0])
    parser.add_argument("stores", nargs="+", help="store files (.h5), one per instance; the first --train train")
    parser.add_argument("--layer", default=None, help="layer (default: the deepest one with ablation results)")
    parser.add_argument("--train", type=int, default=3, help="instances used for training (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="random state of the classifiers")
    parser.add_argument("--no-save", action="store_true", help="print only; do not write the table into the stores")
    args = parser.parse_args(argv)
    table = predict_table(args.stores, layer=args.layer, n_train=args.train, seed=args.seed)
    print(format_table(table))
    if not args.no_save:
        save_table(table)
        print(f"stored under prediction/{table['layer']}/ in {len(table['paths'])} stores")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
