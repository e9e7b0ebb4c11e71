"""Schema constants and path helpers shared by the writer, the reader and store.check."""

from __future__ import annotations

import json

import numpy as np

SCHEMA_VERSION = 1
SUFFIX = ".h5"
PARTIAL_SUFFIX = ".h5.partial"

# Paths other lab members read with h5py alone: a contract (more may be added, none removed without a version bump).
REQUIRED_ROOT = ("classes", "images/labels")
LAYER_SECTIONS = {
    "activations": ("activations/mean",),
    "ablation": ("ablation/baseline_class_acc", "ablation/class_drop", "ablation/overall_drop"),
    "attributes": ("attributes/l1", "attributes/selectivity", "attributes/correlation"),
}

# Expected shapes for store.check, by dimension name: N images, K classes, C concepts, G concept categories (bound
# store-wide); U the layer's units and any other name (topk, R rotations, S greedy steps, S1 = S + 1 counting the
# baseline, A attributes and T targets of relations...) bound per layer on first sight; "*" is free. Paths not
# listed are still read and checksummed, only their shapes go unchecked.
ROOT_SHAPES = {
    "classes": ("K",), "images/labels": ("N",), "images/files": ("N",), "images/predictions": ("N",),
    "images/probs": ("N", "K"), "concepts/names": ("C",), "concepts/categories": ("C",), "concepts/numbers": ("C",),
    "concepts/category_names": ("G",),
}
LAYER_SHAPES = {
    "activations/mean": ("N", "U"), "activations/max": ("N", "U"), "activations/moment_mean": ("U",),
    "activations/moment_std": ("U",), "activations/sparsity": ("U",),
    "ablation/class_drop": ("U", "K"), "ablation/overall_drop": ("U",), "ablation/baseline_class_acc": ("K",),
    "ablation/lost": ("U", "K"), "ablation/gained": ("U", "K"), "ablation/p_value": ("U", "K"),
    "ablation/q_value": ("U", "K"), "ablation/overall_lost": ("U",), "ablation/overall_gained": ("U",),
    "ablation/overall_p_value": ("U",), "ablation/overall_q_value": ("U",),
    "attributes/l1": ("U",), "attributes/selectivity": ("U", "K"), "attributes/correlation": ("U", "K"),
    "attributes/sparsity": ("U",), "attributes/act_mean": ("U",), "attributes/act_std": ("U",),
    "live/acts": ("N", "U", "*", "*"),
    "dissection/iou": ("U", "C"), "dissection/thresholds": ("U",), "dissection/best_concept": ("U",),
    "dissection/best_iou": ("U",), "dissection/best_by_category": ("U", "G"),
    "dissection/best_by_category_iou": ("U", "G"),
    "topimages/indices": ("U", "topk"), "topimages/scores": ("U", "topk"), "topimages/thresholds": ("U",),
    "topimages/thumbs": ("U", "topk", "*", "*", 3), "topimages/masks": ("U", "topk", "*", "*"),
    "rotation/class_drop": ("R", "U", "K"), "rotation/overall_drop": ("R", "U"), "rotation/seeds": ("R",),
    "rotation/lost": ("R", "U", "K"), "rotation/gained": ("R", "U", "K"), "rotation/p_value": ("R", "U", "K"),
    "rotation/q_value": ("R", "U", "K"), "rotation/overall_lost": ("R", "U"), "rotation/overall_gained": ("R", "U"),
    "rotation/overall_p_value": ("R", "U"), "rotation/overall_q_value": ("R", "U"),
    "greedy/classes": ("Kg",), "greedy/order": ("Kg", "S"), "greedy/heldout_order": ("Kg", "S"),
    "greedy/class_acc": ("Kg", "S1"), "greedy/heldout_acc": ("Kg", "S1"), "greedy/heldout_select_acc": ("Kg", "S1"),
    "greedy/overall_acc": ("Kg", "S1"), "greedy/all_class_acc": ("Kg", "S1", "K"),
    "greedy/random_class_acc": ("Rg", "Kg", "S1"),
    "relations/attributes": ("A",), "relations/targets": ("T",), "relations/pearson_r": ("A", "T"),
    "relations/pearson_p": ("A", "T"), "relations/pearson_ci": ("A", "T", 2), "relations/spearman_r": ("A", "T"),
    "relations/spearman_p": ("A", "T"), "relations/spearman_ci": ("A", "T", 2),
}
# Integer datasets that index something: their values must lie in [0, that dimension).
INDEX_RANGES = {"images/labels": "K", "images/predictions": "K", "topimages/indices": "N", "greedy/classes": "K"}

# Which command fills a section, for the messages readers show when a section is missing.
SECTION_COMMANDS = {
    "ablation": "python -m compute.all --model MODEL",
    "attributes": "python -m compute.all --model MODEL",
    "dissection": "python -m compute.all --model MODEL  (the dissection stage needs the concept data set)",
    "topimages": "python -m compute.all --model MODEL",
    "greedy": "python -m compute.all --model MODEL --greedy-steps 20",
    "rotation": "python -m compute.all --model MODEL --rotations 3",
    "live": "python -m compute.all --model MODEL  (live data is kept for the deepest chosen layer)",
    "prediction": "python -m compute.predict STORE...",
}


class StoreError(Exception):
    """A store that cannot be used as asked: missing, not HDF5, old schema, missing section. One-line message."""


def layer_path(layer: str, *parts: str) -> str:
    """``layers/<layer>/<parts...>``: where a layer's sections live (every path under ``layers/`` is built here)."""
    return "/".join(("layers", layer) + parts)


def prediction_path(layer: str, *parts: str) -> str:
    """``prediction/<layer>/<parts...>``: compute.predict's table of a layer, amended into a finished store."""
    return "/".join(("prediction", layer) + parts)


# -- What the writer writes, for the reader (when it opens a store) and store.check ----------------------------------
# Dataset types by path (the layer paths relative to layers/<L>/). store.check compares the exact type; the reader
# only the kind (text, integers, floats, booleans), which is what a page depends on: an old or hand-made store with
# float64 drops reads fine, a store whose `classes` holds numbers or whose indices are floats does not.
TEXT = "text"
ROOT_DTYPES = {
    "classes": TEXT, "images/labels": "int64", "images/files": TEXT, "images/predictions": "int64",
    "images/probs": "float32", "concepts/names": TEXT, "concepts/categories": TEXT, "concepts/numbers": "int64",
    "concepts/category_names": TEXT,
}
_COUNTS = ("lost", "gained", "overall_lost", "overall_gained")
_TESTS = ("p_value", "q_value", "overall_p_value", "overall_q_value")
LAYER_DTYPES = {
    **{f"activations/{name}": "float32" for name in ("mean", "max", "moment_mean", "moment_std", "sparsity")},
    **{f"ablation/{name}": "float32" for name in ("class_drop", "overall_drop", "baseline_class_acc")},
    **{f"{section}/{name}": "int32" for section in ("ablation", "rotation") for name in _COUNTS},
    **{f"{section}/{name}": "float64" for section in ("ablation", "rotation") for name in _TESTS},
    **{f"attributes/{name}": "float32" for name in ("l1", "selectivity", "correlation", "sparsity", "act_mean",
                                                    "act_std")},
    "live/acts": "float32",
    **{f"dissection/{name}": "float32" for name in ("iou", "thresholds", "best_iou", "best_by_category_iou")},
    "dissection/best_concept": "int64", "dissection/best_by_category": "int64",
    "topimages/indices": "int64", "topimages/scores": "float32", "topimages/thresholds": "float32",
    "topimages/thumbs": "uint8", "topimages/masks": "bool",
    "rotation/class_drop": "float32", "rotation/overall_drop": "float32", "rotation/seeds": "int64",
    **{f"greedy/{name}": "int64" for name in ("classes", "order", "heldout_order")},
    **{f"greedy/{name}": "float32" for name in ("class_acc", "heldout_acc", "heldout_select_acc", "overall_acc",
                                                "all_class_acc", "random_class_acc")},
    "relations/attributes": TEXT, "relations/targets": TEXT,
    **{f"relations/{name}": "float64" for name in ("pearson_r", "pearson_p", "pearson_ci", "spearman_r", "spearman_p",
                                                   "spearman_ci")},
}
# The filters write_array / create_array give every numeric array with at least one element, as HDF5 lists them:
# (filter id, parameters). Shuffle's parameter is the element size, which HDF5 fills in.
SHUFFLE, DEFLATE, FLETCHER32 = 2, 1, 3
GZIP_LEVEL = 4


def expected_filters(itemsize: int) -> list[tuple[int, tuple]]:
    return [(SHUFFLE, (itemsize,)), (DEFLATE, (GZIP_LEVEL,)), (FLETCHER32, ())]


# Attribute types. Provenance at the root, and the attributes of a layer's group. Attributes not listed are free.
INTEGER, INTEGERS, NUMBER, JSON_OBJECT, JSON_NAMES = "an integer", "integers", "a number", "a JSON object", \
    "a JSON list of names"
ROOT_ATTRS = {
    "schema_version": INTEGER, "num_images": INTEGER, "num_classes": INTEGER, "seed": INTEGER,
    "config": JSON_OBJECT, "layer_order": JSON_NAMES,
    **{key: TEXT for key in ("model", "arch", "run_name", "description", "weights_path", "weights_sha256", "data_kind",
                             "data_path", "data_fingerprint", "concepts_path", "code_version", "created", "completed",
                             "device", "precision", "torch_version", "ablation_note", "run_key")},
}
LAYER_ATTRS = {"units": INTEGER, "map_shape": INTEGERS}


# -- Checks shared by the reader (on opening a store, from metadata only) and store.check ---------------------------
# Each returns one line per problem saying what is wrong; the caller adds what to do.
def attribute_problems(attrs: dict, expected: dict, owner: str = "") -> list[str]:
    """Attributes of the wrong type (values as h5py returns them, bytes decoded): a number written as text breaks
    every reader that computes with it, so it is refused here rather than raised as a TypeError in a page."""
    where = f"{owner} attribute" if owner else "attribute"
    return [f"{where} {key} is {_describe(attrs[key])}, expected {kind}" for key, kind in expected.items()
            if key in attrs and not is_kind(attrs[key], kind)]


def is_kind(value, kind: str) -> bool:
    if kind == TEXT:
        return isinstance(value, str)
    if kind == INTEGER:
        return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))
    if kind == NUMBER:
        return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))
    if kind == INTEGERS:
        return isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"
    parsed = _json(value)
    if kind == JSON_OBJECT:
        return isinstance(parsed, dict)
    return isinstance(parsed, list) and all(isinstance(name, str) for name in parsed)  # JSON_NAMES


def _json(value):
    try:
        return json.loads(value) if isinstance(value, str) else None
    except ValueError:
        return None


def _describe(value) -> str:
    if isinstance(value, str):
        return f"text {value[:40]!r}"
    if isinstance(value, np.ndarray):
        return f"an array of shape {value.shape}"
    return f"{type(value).__name__} {str(value)[:40]!r}"


def layers_of(paths) -> list[str]:
    """The layers that hold at least one dataset, from dataset paths."""
    return sorted({path.split("/")[1] for path in paths if path.startswith("layers/") and path.count("/") >= 2})


def shape_problems(shapes: dict, units: dict, attrs: dict) -> tuple[list[str], dict[str, dict]]:
    """Dataset shapes (path -> shape, as the metadata gives them) against ROOT_SHAPES and LAYER_SHAPES, and the
    provenance counts num_images and num_classes against the arrays.

    Returns the problems and, for store.check's range checks, the dimensions bound per scope ("" for the store, a
    layer's name for its own): name -> (size, where it came from). ``units`` maps a layer to its group's 'units'.
    """
    problems: list[str] = []
    shared: dict[str, tuple[int, str]] = {}
    for path, expected in ROOT_SHAPES.items():
        if path in shapes:
            _bind(shared, path, shapes[path], expected, problems)
    for key, dim in (("num_images", "N"), ("num_classes", "K")):
        value = attrs.get(key)
        if is_kind(value, INTEGER) and dim in shared and int(value) != shared[dim][0]:
            problems.append(f"attribute {key} = {int(value)} but '{shared[dim][1]}' has {shared[dim][0]}")
    scopes = {"": shared}
    for layer in layers_of(shapes):
        bound = dict(shared)
        if is_kind(units.get(layer), INTEGER):
            bound["U"] = (int(units[layer]), f"layers/{layer} attribute 'units'")
        for relative, expected in LAYER_SHAPES.items():
            path = layer_path(layer, relative)
            if path in shapes:
                _bind(bound, path, shapes[path], expected, problems)
        scopes[layer] = bound
    return problems, scopes


def _bind(bound: dict, path: str, shape: tuple, expected: tuple, problems: list[str]) -> None:
    """Match a shape against named dimensions, binding names seen for the first time."""
    shape = tuple(shape)
    if len(shape) != len(expected):
        problems.append(f"'{path}' has shape {shape}, expected {len(expected)} dimensions "
                        f"({', '.join(map(str, expected))})")
        return
    for size, name in zip(shape, expected):
        if name == "*":
            continue
        if isinstance(name, int):
            want, source = name, "the schema"
        elif name in bound:
            want, source = bound[name]
        else:
            bound[name] = (size, path)
            continue
        if size != want:
            problems.append(f"'{path}' has shape {shape}, but {name} = {want} (from {source})")
            return


def expected_dtype(path: str) -> str | None:
    """The type the writer gives the dataset at ``path`` (TEXT or a numpy type name); None for paths not listed."""
    if path in ROOT_DTYPES:
        return ROOT_DTYPES[path]
    parts = path.split("/", 2)
    return LAYER_DTYPES.get(parts[2]) if len(parts) == 3 and parts[0] == "layers" else None


def dtype_kind(dtype) -> str:
    """text, integers, floats or booleans (anything else by its numpy kind): what a reader of the values relies on."""
    dtype = np.dtype(dtype)
    return {"O": TEXT, "S": TEXT, "U": TEXT, "i": "integers", "u": "integers", "f": "floats",
            "b": "booleans"}.get(dtype.kind, dtype.kind)


def dtype_problems(metadata: dict, exact: bool) -> list[str]:
    """Datasets whose type differs from the writer's (path -> (shape, dtype), from metadata). ``exact`` compares the
    numpy type (store.check), otherwise only its kind (the reader). Empty arrays hold no values and are skipped (numpy
    gives an empty list the type float64)."""
    problems = []
    for path, (shape, dtype) in metadata.items():
        expected = expected_dtype(path)
        if expected is None or 0 in tuple(shape):
            continue
        want = TEXT if expected == TEXT else (np.dtype(expected) if exact else dtype_kind(expected))
        have = dtype_kind(dtype) if expected == TEXT or not exact else np.dtype(dtype)
        if have != want:
            described = TEXT if dtype_kind(dtype) == TEXT else np.dtype(dtype).name
            problems.append(f"'{path}' holds {described} values, expected {expected}")
    return problems


def parse_record(value) -> dict:
    """A stage's record in a store's ``stages`` attributes; a store from before per-stage keys kept only a time."""
    try:
        record = json.loads(value)
    except (TypeError, ValueError):
        return {"finished": str(value)}
    return record if isinstance(record, dict) else {"finished": str(value)}
