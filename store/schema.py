"""Schema constants and path helpers shared by the writer, the reader and store.check."""

from __future__ import annotations

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
    return "/".join(("layers", layer) + parts)
