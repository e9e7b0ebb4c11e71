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
