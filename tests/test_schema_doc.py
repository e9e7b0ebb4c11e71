"""store/SCHEMA.md names every path a run writes: the contract other lab members read with h5py alone."""

from __future__ import annotations

import re

import h5py

from tests.conftest import ROOT


def documented_paths() -> set[str]:
    """Every path of SCHEMA.md's layout table: a row's first backticked path, and its siblings named after it."""
    paths = set()
    for line in (ROOT / "store" / "SCHEMA.md").read_text().splitlines():
        if not line.startswith("| `"):
            continue
        tokens = re.findall(r"`([^`]+)`", line.split(" | ")[0])
        first = tokens[0]
        parent = first.rsplit("/", 1)[0] if "/" in first else ""
        for token in tokens:
            full = token if "/" in token else f"{parent}/{token}" if parent else token
            braces = re.search(r"\{([^}]+)\}", full)
            options = braces.group(1).split(",") if braces else [None]
            for option in options:
                paths.add(full if option is None else full[:braces.start()] + option + full[braces.end():])
    return paths


def general(path: str, layers: list[str]) -> str:
    """A store path with its layer and free names replaced by the placeholders SCHEMA.md uses."""
    parts = path.split("/")
    if parts[0] in ("layers", "prediction") and len(parts) > 1 and parts[1] in layers:
        parts[1] = "<L>"
    text = "/".join(parts)
    text = re.sub(r"^(layers/<L>/live/tail)/.+$", r"\1/<param>", text)
    return re.sub(r"^(layers/<L>/greedy_live)/[^/]+/", r"\1/<name>/", text)


def test_every_path_a_run_writes_is_in_the_schema(tiny_run):
    with h5py.File(tiny_run["store"], "r") as handle:
        layers = list(handle["layers"])
        written = []
        handle.visititems(lambda name, item: written.append(name) if isinstance(item, h5py.Dataset) else None)
    documented = documented_paths()
    missing = sorted({general(path, layers) for path in written} - documented)
    assert not missing, f"paths written but not in store/SCHEMA.md: {missing}"
    assert len(written) > 60  # the tiny run has every stage, dissection, greedy, rotation and live included


def test_the_schema_reader_sees_rows_and_siblings():
    documented = documented_paths()
    assert {"layers/<L>/ablation/class_drop", "layers/<L>/ablation/overall_lost", "layers/<L>/greedy/flips/thumbs",
            "layers/<L>/ablation/flips/thumbs", "concepts/categories", "layers/<L>/live/tail/<param>"} <= documented
    assert general("layers/conv5/greedy_live/mine/order", ["conv5"]) == "layers/<L>/greedy_live/<name>/order"
