"""Predicting the class a unit matters most for from its attributes (the paper's Table 1).

``python -m compute.predict STORE... [--layer conv5] [--train 3] [--seed 0] [--resamples 2000]``

Each store is one instance of the same architecture (e.g. the demo model trained with seeds 0..4). Per unit the
features are an attribute vector (class correlation [K], class selectivity [K], concept IoU [concepts] where the
stores hold dissection results); the label is the class whose accuracy drops most when the unit is ablated. One
logistic regression (standardised features) per attribute is trained on the units of the first ``--train`` instances
and tested on the units of the others; the ensemble averages the per-attribute models' predicted probabilities. The
split is by instance, never by unit: units of one network share its training history, so mixing them across the
split would leak. Accuracy (strict and lenient, below) comes with a bootstrap interval and two chance levels: always
guessing the training set's most frequent class, and a uniform random guess. The table is printed and written into
every input store under ``prediction/<layer>/``.

Scoring: accuracy drops move in steps of 1/(images per class), so several classes often share a unit's largest drop
(about a third of the demo's conv5 units). The paper's label is "the index of the class which has the largest accuracy
drop" and its Table 1 does not say how ties are scored, so the table gives two scores on the same test units:

* strict: the label is the argmax of the unit's class-drop vector, the lowest class index on ties (``np.argmax``);
  a prediction counts only if it is that one class.
* lenient: a prediction counts if it names any of the classes tied for the largest drop.

Units counted: a unit whose ablation lowers no class's accuracy (largest class drop <= 0) has no class it matters for
and is excluded from both scores (and from training); how many test units that leaves out is reported. Every other
test unit counts once. In training a unit counts once, spread evenly over its tied classes (sample weights 1/t).

Intervals: a two-level (cluster) bootstrap that resamples the test networks with replacement and then the units within
each resampled network (seeded numpy Generator, ``n_resamples`` stored), percentile intervals. With one test network
only units are resampled and the interval is labelled per-unit: it says nothing about how another network would do.
The Wilson interval over units that earlier versions stored (``ci``, for the lenient score) is still written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import stats
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from compute.errors import UserError
from store.schema import layer_path, prediction_path

# Table 1's attributes: (name, section, dataset under layers/<layer>/).
FEATURES = (
    ("concept IoU", "dissection", "iou"),
    ("class correlation", "attributes", "correlation"),
    ("class selectivity", "attributes", "selectivity"),
)
ENSEMBLE = "ensemble"
CONFIDENCE = 0.95
MAX_ITER = 5000
N_RESAMPLES = 2000
# How the interval was obtained (stored as the group attribute ``interval_method``).
CLUSTER, PER_UNIT = "cluster bootstrap", "per-unit bootstrap"
# Datasets under prediction/<layer>/: the first five since the table was introduced, the rest added with the strict
# score and the bootstrap intervals (a store written before lacks them; readers show them as missing).
DATASETS = ("attributes", "accuracy", "ci", "correct", "n_test")
NEW_DATASETS = ("strict_accuracy", "strict_correct", "strict_ci", "bootstrap_ci")


@dataclass
class Instance:
    """One network instance's units at one layer: attribute matrices and each unit's largest-drop classes."""

    name: str
    path: Path
    features: dict[str, np.ndarray]
    best: np.ndarray  # bool [U, K]: the classes with the unit's largest positive drop (none where no class drops)
    identity: dict = field(default_factory=dict)  # what must agree across instances
    label: np.ndarray | None = None  # int [U]: the strict label (strict_labels), -1 where no class drops

    def __post_init__(self):
        if self.label is None:  # the first True of a row of best is the lowest-index maximum: np.argmax's choice
            self.label = np.where(self.best.any(1), self.best.argmax(1), -1)

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


def strict_labels(class_drop: np.ndarray) -> np.ndarray:
    """int [U]: the strict label of each unit, the argmax of its class-drop vector with the lowest class index on ties
    (what ``np.argmax`` returns); -1 for a unit whose ablation lowers no class's accuracy (largest drop <= 0), which
    is excluded from both scores."""
    class_drop = np.asarray(class_drop)
    return np.where(class_drop.max(1) > 0, class_drop.argmax(1), -1)


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
                    for name, section, dataset in FEATURES if store.has(layer_path(layer, section, dataset))}
        class_drop = store.layer(layer, "ablation", "class_drop")
        concepts = store.read("concepts/names") if store.has("concepts/names") else None
    except StoreError as error:
        raise UserError(str(error)) from None
    identity = {"model": store.attrs.get("model"), "arch": store.attrs.get("arch"), "classes": list(store.classes),
                "units": len(class_drop), "concepts": None if concepts is None else list(concepts),
                "weights": store.attrs.get("weights_sha256")}
    return Instance(store.name, path, features, largest_drop_classes(class_drop), identity,
                    strict_labels(class_drop)), layer


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


def cluster_bootstrap(scores: np.ndarray, groups: np.ndarray, n_resamples: int = N_RESAMPLES,
                      confidence: float = CONFIDENCE, seed: int = 0) -> tuple[np.ndarray, str]:
    """Percentile intervals of the mean of each column of ``scores`` [N, S] (0/1 per test unit) from a two-level
    bootstrap: draw as many networks as there are (``groups`` [N] names each unit's network) with replacement, then
    within each drawn network as many of its units as it has, with replacement; the statistic is correct units over
    units drawn, as the point estimate pools them. Returns (intervals [S, 2], method): ``CLUSTER`` with two or more
    networks, else ``PER_UNIT`` (one network: only its units are resampled, so network-to-network variation is not
    in the interval). The same resampled units serve every column. Seeded numpy Generator: same inputs, same intervals.

    scipy.stats.bootstrap resamples observations at one level only (paired samples at most), not networks and then
    units within them, hence the loop here. With few test networks (the paper's two) the network level is coarse:
    half of the resamples then hold one network twice.
    """
    scores = np.asarray(scores, np.float64)
    scores = scores[:, None] if scores.ndim == 1 else scores
    _, member = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    members = [np.flatnonzero(member == g) for g in range(member.max() + 1)]
    rng = np.random.default_rng(seed)
    means = np.empty((n_resamples, scores.shape[1]))
    for r in range(n_resamples):
        networks = rng.integers(len(members), size=len(members))
        units = np.concatenate([members[g][rng.integers(len(members[g]), size=len(members[g]))] for g in networks])
        means[r] = scores[units].mean(0)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail], axis=0)
    return np.stack([low, high], 1), CLUSTER if len(members) > 1 else PER_UNIT


def _accuracy_row(name: str, lenient: np.ndarray, strict: np.ndarray, confidence: float) -> dict:
    """One attribute's scores over the test units: lenient (``correct``, ``accuracy``, its Wilson interval ``ci``) and
    strict; the bootstrap intervals are added by predict_table once every row is known."""
    k, n = int(lenient.sum()), len(lenient)
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return {"attribute": name, "correct": k, "n_test": n, "accuracy": k / n, "ci": (ci.low, ci.high),
            "strict_correct": int(strict.sum()), "strict_accuracy": float(strict.mean())}


def predict_table(paths, layer: str | None = None, n_train: int = 3, seed: int = 0,
                  confidence: float = CONFIDENCE, n_resamples: int = N_RESAMPLES) -> dict:
    """Table 1 over the given stores: train on the first ``n_train`` instances, test on the rest.

    Returns {'layer', 'rows': [{'attribute', 'strict_accuracy', 'strict_correct', 'strict_ci', 'accuracy' (lenient),
    'correct', 'bootstrap_ci' (its bootstrap interval), 'ci' (its Wilson interval), 'n_test'}...],
    'chance_majority', 'chance_uniform' (lenient), 'strict_chance_majority', 'strict_chance_uniform', 'n_train',
    'n_test', 'n_excluded' (test units with no positive drop), 'train_stores', 'test_stores', 'unlabelled', 'tied',
    'seed', 'confidence', 'interval_method', 'n_resamples', 'paths'}. Same stores and seed give identical numbers.
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
    # Strict labels of the labelled units, in design()'s order (instance by instance, labelled units only).
    label = np.concatenate([instance.label[instance.labelled] for instance in instances])
    rows, probabilities, scores = [], [], []
    for attribute in attributes:
        x, best, groups = design(instances, attribute)
        train, test = split_by_instance(groups, train_names)
        x_train, y_train, weight = tie_weighted(x[train], best[train])
        if len(np.unique(y_train)) < 2 or not test.any():
            raise UserError(f"too few units whose ablation lowers a class's accuracy at {layer} "
                            f"({train.sum()} for training, {test.sum()} for testing): use better-trained instances")
        model = _classifier(seed).fit(x_train, y_train, logisticregression__sample_weight=weight)
        probabilities.append(model.predict_proba(x[test]))
        predicted = model.predict(x[test])
        scores += [best[test, predicted], predicted == label[test]]
        rows.append(_accuracy_row(attribute, scores[-2], scores[-1], confidence))
    # Labels and split do not depend on the attribute: every model saw the same units, so best, label, train, test,
    # the training labels and the probability columns (model.classes_) are shared.
    classes = model.classes_
    ensemble = classes[np.mean(probabilities, axis=0).argmax(1)]
    scores += [best[test, ensemble], ensemble == label[test]]
    rows.append(_accuracy_row(ENSEMBLE, scores[-2], scores[-1], confidence))
    intervals, method = cluster_bootstrap(np.stack(scores, 1), groups[test], n_resamples, confidence, seed)
    for row, lenient, strict in zip(rows, intervals[0::2], intervals[1::2]):
        row["bootstrap_ci"], row["strict_ci"] = tuple(map(float, lenient)), tuple(map(float, strict))
    majority = np.bincount(y_train, weights=weight).argmax()
    test_instances = instances[n_train:]
    return {
        "layer": layer, "rows": rows, "attributes": attributes,
        "chance_majority": float(np.mean(best[test, majority])),
        "chance_uniform": float(best[test].sum(1).mean() / best.shape[1]),
        "strict_chance_majority": float(np.mean(label[test] == majority)),
        "strict_chance_uniform": 1 / best.shape[1],
        "n_train": int(train.sum()), "n_test": int(test.sum()),
        "n_excluded": sum(int((~i.labelled).sum()) for i in test_instances),
        "train_stores": train_names, "test_stores": [i.name for i in test_instances],
        "unlabelled": {i.name: int((~i.labelled).sum()) for i in instances},
        "tied": {i.name: int((i.best.sum(1) > 1).sum()) for i in instances},
        "seed": seed, "confidence": confidence, "interval_method": method, "n_resamples": n_resamples,
        "paths": [str(i.path) for i in instances],
    }


SCORING = ("strict: a prediction counts only if it is the argmax of the unit's class-drop vector, the lowest class "
           "index on ties; lenient (accuracy, correct): it counts if it is any class tied for the largest drop. Both "
           "count every test unit once except units whose ablation lowers no class's accuracy (largest drop <= 0), "
           "which are excluded (n_excluded). strict_ci and bootstrap_ci (lenient): percentile intervals from a "
           "bootstrap resampling the test networks, then the units within each (interval_method, n_resamples, seed); "
           "ci: Wilson interval over units (lenient).")


def _percent(value, width: int = 7) -> str:
    return f"{'—':>{width}}" if value is None else f"{100 * value:>{width - 1}.2f}%"


def _interval(ci) -> str:
    return f"{'—':<16}" if ci is None else f"[{100 * ci[0]:5.1f}%, {100 * ci[1]:5.1f}%]"


def format_table(table: dict) -> str:
    """Plain-text Table 1: strict and lenient accuracy per attribute with their intervals, then chance levels, the
    split and how each score is counted."""
    from figures.prediction import scoring_notes

    level = int(round(100 * table["confidence"]))
    lines = [f"Predicting the class each unit of {table['layer']} matters most for "
             f"(train: {', '.join(table['train_stores'])}; test: {', '.join(table['test_stores'])})",
             f"{'attribute':<20}{'strict':>8}   {f'{level}% CI':<16}  {'lenient':>8}   {f'{level}% CI':<16}  "
             f"correct strict/lenient/units"]
    for row in table["rows"]:
        strict = "—" if row.get("strict_correct") is None else row["strict_correct"]
        lines.append(f"{row['attribute']:<20}{_percent(row.get('strict_accuracy'), 8)}   "
                     f"{_interval(row.get('strict_ci'))}  {_percent(row['accuracy'], 8)}   "
                     f"{_interval(row.get('bootstrap_ci'))}  {strict}/{row['correct']}/{row['n_test']}")
    lines.append(f"{'chance (majority)':<20}{_percent(table.get('strict_chance_majority'), 8)}   {'':<16}  "
                 f"{_percent(table['chance_majority'], 8)}   always the training set's most frequent class")
    lines.append(f"{'chance (uniform)':<20}{_percent(table.get('strict_chance_uniform'), 8)}   {'':<16}  "
                 f"{_percent(table['chance_uniform'], 8)}   a uniform random guess (1/K; lenient: more where classes "
                 f"tie)")
    lines.append(f"{table['n_train']} training units, {table['n_test']} test units; "
                 f"{sum(table['tied'].values())} units with tied classes; seed {table['seed']}")
    lines.extend(scoring_notes(table))
    return "\n".join(lines)


def save_table(table: dict) -> None:
    """Write the table into every input store under prediction/<layer>/ (each store replaced atomically).

    The datasets and attributes of the first version (``DATASETS``; chance levels, split, seed...) are all still
    written under their names; the strict score and the bootstrap intervals are added beside them."""
    from store.writer import amend, write_array

    group = prediction_path(table['layer'])
    rows = table["rows"]
    arrays = {
        "attributes": np.array([r["attribute"] for r in rows], dtype=object),
        "accuracy": np.array([r["accuracy"] for r in rows]),
        "ci": np.array([r["ci"] for r in rows]),
        "correct": np.array([r["correct"] for r in rows], np.int64),
        "n_test": np.array([r["n_test"] for r in rows], np.int64),
        "strict_accuracy": np.array([r["strict_accuracy"] for r in rows]),
        "strict_correct": np.array([r["strict_correct"] for r in rows], np.int64),
        "strict_ci": np.array([r["strict_ci"] for r in rows]),
        "bootstrap_ci": np.array([r["bootstrap_ci"] for r in rows]),
    }
    attrs = {key: table[key] for key in ("chance_majority", "chance_uniform", "strict_chance_majority",
                                         "strict_chance_uniform", "n_train", "n_test", "n_excluded", "seed",
                                         "confidence", "interval_method", "n_resamples")}
    attrs.update({key: json.dumps(table[key]) for key in ("train_stores", "test_stores", "unlabelled", "tied")})
    attrs["scoring"] = SCORING
    for path in table["paths"]:
        with amend(Path(path)) as h5:
            if group in h5:
                del h5[group]
            for name, value in arrays.items():
                write_array(h5, f"{group}/{name}", value)
            h5[group].attrs.update(attrs)


def _pair(values) -> tuple[float, float]:
    return float(values[0]), float(values[1])


def read_table(arrays: dict, attrs: dict, layer: str) -> dict:
    """The stored table back in predict_table's shape, from its datasets and the group's attributes (the app reads
    them through its cached loaders). A table stored before the strict score and the bootstrap intervals existed
    reads back with None for them (shown as "—"); its ``n_excluded`` is rebuilt from the test stores' unlabelled
    counts."""
    present = [name for name in NEW_DATASETS if arrays.get(name) is not None]
    rows = []
    for i, (name, acc, ci, correct, n) in enumerate(zip(arrays["attributes"], arrays["accuracy"], arrays["ci"],
                                                       arrays["correct"], arrays["n_test"])):
        rows.append({"attribute": str(name), "accuracy": float(acc), "ci": _pair(ci), "correct": int(correct),
                     "n_test": int(n),
                     "strict_accuracy": float(arrays["strict_accuracy"][i]) if "strict_accuracy" in present else None,
                     "strict_correct": int(arrays["strict_correct"][i]) if "strict_correct" in present else None,
                     "strict_ci": _pair(arrays["strict_ci"][i]) if "strict_ci" in present else None,
                     "bootstrap_ci": _pair(arrays["bootstrap_ci"][i]) if "bootstrap_ci" in present else None})
    table = {"layer": layer, "rows": rows, "attributes": [r["attribute"] for r in rows if r["attribute"] != ENSEMBLE]}
    for key in ("chance_majority", "chance_uniform", "confidence"):
        table[key] = float(attrs[key])
    for key in ("strict_chance_majority", "strict_chance_uniform"):
        table[key] = float(attrs[key]) if key in attrs else None
    for key in ("n_train", "n_test", "seed"):
        table[key] = int(attrs[key])
    for key in ("train_stores", "test_stores", "unlabelled", "tied"):
        table[key] = json.loads(attrs[key])
    table["n_excluded"] = (int(attrs["n_excluded"]) if "n_excluded" in attrs
                           else sum(table["unlabelled"].get(name, 0) for name in table["test_stores"]))
    table["interval_method"] = str(attrs["interval_method"]) if "interval_method" in attrs else None
    table["n_resamples"] = int(attrs["n_resamples"]) if "n_resamples" in attrs else None
    return table


def read_stored(store, layer: str) -> dict:
    """The table stored in ``store`` (a StoreReader) for ``layer``, old or new (the datasets it lacks read as None)."""
    group = prediction_path(layer)
    arrays = {name: store.read(f"{group}/{name}") for name in DATASETS + NEW_DATASETS if store.has(f"{group}/{name}")}
    return read_table(arrays, store.read_attrs(group), layer)
