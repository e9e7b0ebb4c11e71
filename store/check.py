"""Verify stores: ``python -m store.check PATH...`` (store files, or directories of them).

A store passes when it is an HDF5 file that opens, is a finished store of this schema version whose attributes have
the types the writer gives them (``schema.ROOT_ATTRS``, ``schema.LAYER_ATTRS``), holds the required paths
(``schema.REQUIRED_ROOT``, ``schema.LAYER_SECTIONS`` for every layer), has shapes that agree across sections
(``schema.ROOT_SHAPES``, ``schema.LAYER_SHAPES``: the check StoreReader makes when it opens a store) and index values in
range, stores every dataset with the writer's type and filters (``schema.ROOT_DTYPES``, ``schema.LAYER_DTYPES``; every
numeric array with shuffle, gzip level 4 and a fletcher32 checksum), and reads in full: every chunk of every dataset is
read, so each chunk's fletcher32 checksum is verified and every compressed chunk is decompressed.

One line per problem, saying what is wrong and what to do. Exit status: 0 all fine, 1 problems, 2 usage errors.
Library use: ``check_store(path)`` returns the problems as a list of strings (empty when fine); it never raises for
a damaged file, whatever the damage, because its job is to report it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

from store.reader import list_stores, open_failure
from store.schema import (GZIP_LEVEL, INDEX_RANGES, LAYER_ATTRS, LAYER_SECTIONS, LAYER_SHAPES, REQUIRED_ROOT,
                          ROOT_ATTRS, SCHEMA_VERSION, SECTION_COMMANDS, TEXT, attribute_problems, dtype_kind,
                          dtype_problems, expected_filters, layer_path, layers_of, parse_record, shape_problems)

RECOMPUTE = "recompute it with `python -m compute.all --model MODEL --force`"


@dataclass
class Report:
    """What one check found: problems (one line each) and what was verified."""

    problems: list[str] = field(default_factory=list)
    layers: int = 0
    datasets: int = 0
    chunks: int = 0
    fix: str = RECOMPUTE  # what to do, with the store's model once its provenance is read
    unguarded: int = 0  # superblock and object headers in HDF5's earliest format: no checksum

    def summary(self) -> str:
        # Stores written before the writer used HDF5's 1.10 format are sound, but a flipped byte in their metadata
        # could pass unnoticed: said beside "ok" rather than as a problem.
        old = (f"; {self.unguarded} metadata blocks without checksums (HDF5's earliest format: written by an older "
               f"version of this tool, or edited outside store.writer): recompute it to have them checked"
               if self.unguarded else "")
        return (f"ok: schema {SCHEMA_VERSION}, {self.layers} layers, {self.datasets} datasets, "
                f"{self.chunks} checksummed chunks verified{old}")


def check_store(path) -> list[str]:
    """Every problem of the store at ``path``, one line each; an empty list means the store is sound."""
    return inspect(path).problems


def inspect(path) -> Report:
    path = Path(path)
    report = Report()
    problem = _file_problem(path)
    if problem:
        report.problems.append(problem)
        return report
    try:
        handle = h5py.File(path, "r", locking=False)
    except Exception as error:  # noqa: BLE001 - HDF5 raises OSError, but a damaged superblock may raise anything
        report.problems.append(_open_problem(error))
        return report
    with handle:
        try:
            _check_open_store(handle, report)
        except Exception as error:  # noqa: BLE001 - damage no check above foresaw: still one line, never a traceback
            report.problems.append(f"the file is damaged ({type(error).__name__}: {_first_line(error)}); "
                                   + report.fix)
    return report


def _file_problem(path: Path) -> str | None:
    """Problems visible before HDF5 is involved: missing, empty, or not HDF5 at all."""
    if not path.is_file():
        return "no such file" if not path.exists() else "not a file"
    size = path.stat().st_size
    if size == 0:
        return "empty file (0 bytes): a copy or a write was cut short; copy it again or " + RECOMPUTE
    if not h5py.is_hdf5(path):
        return (f"not an HDF5 file ({size} bytes without the HDF5 signature): another kind of file, or damaged at "
                f"its start; " + RECOMPUTE)
    return None


def _open_problem(error: Exception) -> str:
    fix = "copy it again or " + RECOMPUTE if "truncated" in str(error) else RECOMPUTE
    return f"{open_failure(error)}; {fix}"


def _first_line(text: str, limit: int = 120) -> str:
    line = str(text).strip().splitlines()[0] if str(text).strip() else "no detail"
    return line[:limit]


def _check_open_store(handle: h5py.File, report: Report) -> None:
    attrs = _attrs(handle, report)
    report.fix = RECOMPUTE.replace("MODEL", str(attrs.get("model", "MODEL")))
    if not _attribute_types_ok(attrs, report) or not _version_ok(attrs, report):
        return
    datasets = _walk(handle, report)
    report.datasets = len(datasets)
    layers = layers_of(datasets)
    report.layers = len(layers)
    _check_layout(handle, attrs, datasets, layers, report)
    _check_shapes(handle, attrs, datasets, layers, report)
    for name, dataset in datasets.items():
        _check_format(name, dataset, report)
    for name, dataset in datasets.items():
        _verify_data(name, dataset, report)
    if not report.problems:  # the counts are compared only once every number they use is known sound
        _check_counts(datasets, layers, report)


def _attrs(handle: h5py.File, report: Report) -> dict:
    try:
        return {key: value.decode() if isinstance(value, bytes) else value for key, value in handle.attrs.items()}
    except Exception as error:  # noqa: BLE001
        report.problems.append(f"its attributes (provenance) cannot be read ({_first_line(error)}): the file is "
                               f"damaged; " + report.fix)
        return {}


def _attribute_types_ok(attrs: dict, report: Report) -> bool:
    """Provenance attributes of the wrong type (a count written as text, a layer order that is no JSON list), one line
    each. Nothing else is checked then: the version itself may be among them, and readers refuse such a store."""
    problems = attribute_problems(attrs, ROOT_ATTRS)
    report.problems.extend(f"{problem}: the store is malformed; {report.fix}" for problem in problems)
    return not problems


def _version_ok(attrs: dict, report: Report) -> bool:
    """Schema version and completion; a store of another schema version is not checked further (its layout differs)."""
    version = attrs.get("schema_version")
    if version is None:
        report.problems.append("no schema_version attribute: not a store written by compute.all; " + report.fix)
        return False
    if int(version) != SCHEMA_VERSION:
        fix = report.fix if int(version) < SCHEMA_VERSION else "update this tool to read it (git pull)"
        report.problems.append(f"schema version {int(version)}, this tool reads version {SCHEMA_VERSION}: {fix}")
        return False
    if "completed" not in attrs:
        report.problems.append("not finished (no 'completed' attribute): a run in progress or killed wrote it; "
                               "rerun the same `python -m compute.all` command to resume")
    return True


def _walk(handle: h5py.File, report: Report) -> dict[str, h5py.Dataset]:
    """Every dataset by path, group by group, so that damaged metadata is reported where it is."""
    found: dict[str, h5py.Dataset] = {}
    report.unguarded = int(handle.id.get_create_plist().get_version()[0] < 2) + int(not _checksummed(handle))
    pending = [("", handle)]
    while pending:
        prefix, group = pending.pop()
        try:
            names = list(group.keys())
        except Exception as error:  # noqa: BLE001
            report.problems.append(f"group '{prefix or '/'}' cannot be listed ({_first_line(error)}): the file is "
                                   f"damaged; " + report.fix)
            continue
        for name in names:
            text = name if isinstance(name, str) else name.decode("utf-8", "backslashreplace")  # a damaged link name
            path = f"{prefix}/{text}" if prefix else text
            try:
                item = group[name]
            except Exception as error:  # noqa: BLE001
                report.problems.append(f"'{path}' cannot be opened ({_first_line(error)}): the file is damaged; "
                                       + report.fix)
                continue
            try:  # attributes carry provenance and settings that readers use
                dict(item.attrs)
            except Exception as error:  # noqa: BLE001
                report.problems.append(f"attributes of '{path}' cannot be read ({_first_line(error)}): the file is "
                                       f"damaged; " + report.fix)
            report.unguarded += not _checksummed(item)
            if isinstance(item, h5py.Group):
                pending.append((path, item))
            elif isinstance(item, h5py.Dataset):
                found[path] = item
    try:  # the reader's table of contents: HDF5's own visit reads every object header in full
        handle.visit(lambda name: None)
    except Exception as error:  # noqa: BLE001
        report.problems.append(f"its table of contents cannot be read ({_first_line(error)}): the file is damaged; "
                               + report.fix)
    return dict(sorted(found.items()))


def _checksummed(item) -> bool:
    """Whether the object's header carries a checksum (version 2, HDF5 1.8+ format; store.writer writes only these)."""
    try:
        return h5py.h5o.get_info(item.id).hdr.version >= 2
    except Exception:  # noqa: BLE001 - an unreadable header is reported where it is opened
        return True


def _check_layout(handle, attrs: dict, datasets: dict, layers: list[str], report: Report) -> None:
    """Required paths, the configured layers, and a section for every stage recorded as finished."""
    for path in REQUIRED_ROOT:
        if path not in datasets:
            report.problems.append(f"'{path}' is missing: the store is incomplete; " + report.fix)
    if not layers:
        report.problems.append("no layers: the store holds no results; " + report.fix)
    configured = _configured_layers(attrs)
    for layer in configured:
        if layer not in layers:
            report.problems.append(f"layer {layer} was asked for (config) but has no results; " + report.fix)
    for layer in layers:
        for section, paths in LAYER_SECTIONS.items():
            wanted = [layer_path(layer, p) for p in paths]
            missing = [p for p in wanted if p not in datasets]
            if len(missing) == len(wanted):
                report.problems.append(f"layers/{layer} has no {section} section: {_section_command(section, attrs)}")
            else:
                report.problems.extend(f"'{p}' is missing from the {section} section; " + report.fix for p in missing)
    optional = (set(SECTION_COMMANDS) | {p.split("/")[0] for p in LAYER_SHAPES}) - set(LAYER_SECTIONS)
    for stage, skipped in _recorded_stages(handle):
        section, _, layer = stage.partition("/")
        if section in optional and not skipped and layer and not _present(handle, layer_path(layer, section)):
            report.problems.append(f"stage {stage} is recorded as finished but 'layers/{layer}/{section}' is missing: "
                                   f"the store was edited or damaged; " + report.fix)


def _present(handle, path: str) -> bool:
    try:
        return path in handle
    except Exception:  # noqa: BLE001 - there but damaged: the walk reports it
        return True


def _configured_layers(attrs: dict) -> list[str]:
    try:
        config = json.loads(attrs.get("config", "{}"))
        return [str(layer) for layer in config.get("layers", [])] if isinstance(config, dict) else []
    except (TypeError, ValueError):
        return []


def _recorded_stages(handle) -> list[tuple[str, bool]]:
    """(stage, whether it was skipped) for every stage the store records."""
    try:
        attrs = handle["stages"].attrs if "stages" in handle else {}
        return [(stage, "skipped" in parse_record(value)) for stage, value in attrs.items()]
    except Exception:  # noqa: BLE001 - a damaged stages group shows up again when the walk lists it
        return []


def _section_command(section: str, attrs: dict) -> str:
    command = SECTION_COMMANDS.get(section, "python -m compute.all --model MODEL")
    return f"compute it with `{command.replace('MODEL', str(attrs.get('model', 'MODEL')))}`"


def _check_shapes(handle, attrs: dict, datasets: dict, layers: list[str], report: Report) -> None:
    """Shapes against the named dimensions of the schema tables and provenance counts (the reader's check too, from
    store.schema), the layers' attribute types, and index ranges against the dimensions bound."""
    units = {layer: _layer_units(handle, layer, report) for layer in layers}
    problems, scopes = shape_problems({name: dataset.shape for name, dataset in datasets.items()}, units, attrs)
    report.problems.extend(f"{problem}: the store is inconsistent; " + report.fix for problem in problems)
    for scope, bound in scopes.items():
        for relative, dim in INDEX_RANGES.items():
            path = layer_path(scope, relative) if scope else relative
            if path in datasets:
                _check_range(path, datasets[path], bound, dim, report)


def _check_counts(datasets: dict, layers: list[str], report: Report) -> None:
    """The paired counts behind each drop reproduce it exactly: class_drop == float32((lost - gained) / n_k), with
    0 <= lost, gained <= n_k, n_k the class's validation images."""
    if "images/labels" not in datasets or "classes" not in datasets:
        return
    per_class = np.bincount(datasets["images/labels"][()], minlength=len(datasets["classes"])).astype(np.float64)
    for layer in layers:
        for section in ("ablation", "rotation"):
            paths = [layer_path(layer, section, name) for name in ("lost", "gained", "class_drop")]
            if not all(path in datasets for path in paths):
                continue
            lost, gained, drop = (datasets[path][()] for path in paths)
            if lost.shape != drop.shape or gained.shape != drop.shape or drop.shape[-1] != len(per_class):
                continue  # reported by the shape check
            if (lost < 0).any() or (gained < 0).any() or (lost > per_class).any() or (gained > per_class).any():
                report.problems.append(f"'{paths[0]}' or '{paths[1]}' counts more images than its class has: the "
                                       f"store is inconsistent; " + report.fix)
            elif not np.array_equal(((lost - gained) / np.maximum(per_class, 1)).astype(np.float32), drop):
                report.problems.append(f"'{paths[2]}' is not (lost - gained) / images of the class: the store is "
                                       f"inconsistent; " + report.fix)


def _layer_units(handle, layer: str, report: Report):
    """The layer group's 'units' (None when absent or unreadable); its attributes of the wrong type are reported."""
    try:
        attrs = {key: value.decode() if isinstance(value, bytes) else value
                 for key, value in handle[layer_path(layer)].attrs.items()}
    except Exception:  # noqa: BLE001 - unreadable attributes are reported by the walk
        return None
    problems = attribute_problems(attrs, LAYER_ATTRS, layer_path(layer))
    report.problems.extend(f"{problem}: the store is malformed; " + report.fix for problem in problems)
    return attrs.get("units")


def _check_format(path: str, dataset: h5py.Dataset, report: Report) -> None:
    """The type and filters the writer gives the dataset. A numeric array without its fletcher32 checksum could hold
    any numbers: it was not written by store.writer, or its header was damaged in a file of the earliest format."""
    problems = dtype_problems({path: (dataset.shape, dataset.dtype)}, exact=True)
    report.problems.extend(f"{problem}: the store is inconsistent; " + report.fix for problem in problems)
    if dtype_kind(dataset.dtype) == TEXT or dataset.ndim == 0 or dataset.size == 0:
        return  # strings and scalars cannot carry a checksum; see write_array
    try:
        plist = dataset.id.get_create_plist()
        pipeline = [plist.get_filter(index) for index in range(plist.get_nfilters())]
    except Exception as error:  # noqa: BLE001
        report.problems.append(f"'{path}': its filters cannot be read ({_first_line(error)}): the file is damaged; "
                               + report.fix)
        return
    if [(number, tuple(values)) for number, _, values, _ in pipeline] != expected_filters(dataset.dtype.itemsize):
        found = ", ".join(f"{name.decode(errors='replace')}{tuple(values)}" for _, _, values, name in pipeline)
        report.problems.append(f"'{path}' is stored with {found or 'no filters'}, not the writer's shuffle, gzip level "
                               f"{GZIP_LEVEL} and fletcher32 checksum (its numbers cannot be verified): it was not "
                               f"written by store.writer; " + report.fix)


def _check_range(path: str, dataset, bound: dict, dim: str, report: Report) -> None:
    if dim not in bound or dataset.size == 0 or dataset.dtype.kind not in "iu":
        return
    try:
        values = dataset[()]
    except Exception:  # noqa: BLE001 - unreadable data is reported by _verify_data
        return
    limit = bound[dim][0]
    if values.min() < 0 or values.max() >= limit:
        report.problems.append(f"'{path}' holds values in [{values.min()}, {values.max()}], outside [0, {limit}) "
                               f"({dim}, from {bound[dim][1]}): the store is inconsistent; " + report.fix)


def _verify_data(path: str, dataset: h5py.Dataset, report: Report) -> None:
    """Read every chunk (fletcher32 is verified and gzip decompressed on read) and count the ones that fail.

    A chunk missing from the chunk index would silently read as the fill value (zeros), so the index is compared
    with the chunk grid first: every dataset of a finished store is written in full.
    """
    try:
        if dataset.chunks is None or dataset.size == 0:  # strings are decoded too: the reader hands out text
            (dataset.asstr() if h5py.check_string_dtype(dataset.dtype) else dataset)[()]
            return
        stored = {tuple(dataset.id.get_chunk_info(i).chunk_offset) for i in range(dataset.id.get_num_chunks())}
        grid = [(tuple(s.start for s in selection), selection) for selection in dataset.iter_chunks()]
        missing = [start for start, _ in grid if start not in stored]
        failed = [(start, _read_failure(dataset, selection)) for start, selection in grid if start in stored]
        failed = [(start, error) for start, error in failed if error]
    except Exception as error:  # noqa: BLE001
        report.problems.append(f"'{path}' cannot be read ({_first_line(error)}): the file is damaged; " + report.fix)
        return
    if dataset.fletcher32:
        report.chunks += len(grid) - len(missing) - len(failed)
    if missing:
        report.problems.append(f"'{path}': {len(missing)} of {len(grid)} chunks are missing from its chunk index "
                               f"(first at {missing[0]}; they would read as zeros): the file is damaged; " + report.fix)
    if failed:
        what = "fail their fletcher32 checksum or cannot be decompressed" if dataset.fletcher32 else "cannot be read"
        report.problems.append(f"'{path}': {len(failed)} of {len(grid)} chunks {what} (first at {failed[0][0]}: "
                               f"{failed[0][1]}): the file is damaged; copy it again or " + report.fix)


def _read_failure(dataset: h5py.Dataset, selection) -> str | None:
    try:
        dataset[selection]
        return None
    except Exception as error:  # noqa: BLE001
        return _first_line(error, 80)


def _targets(raw_paths: list[str]) -> tuple[list[Path], list[str]]:
    """Store files named directly or found in named directories; lines for directories that hold none."""
    targets, empty = [], []
    for raw in raw_paths:
        path = Path(raw)
        if path.is_dir():
            stores = sorted(list_stores(path))
            targets.extend(stores)
            if not stores:
                empty.append(f"{path}: no finished stores (*.h5) in this directory")
        else:
            targets.append(path)
    return targets, empty


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m store.check", description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+", metavar="PATH", help="store files (.h5) or directories of stores")
    args = parser.parse_args(argv)
    missing = [raw for raw in args.paths if not Path(raw).exists()]
    if missing:
        for raw in missing:
            print(f"error: {raw}: no such file or directory", file=sys.stderr)
        return 2
    targets, empty = _targets(args.paths)
    for line in empty:
        print(line)
    failed = bool(empty)
    for path in targets:
        report = inspect(path)
        for problem in report.problems:
            print(f"{path}: {problem}")
        if not report.problems:
            print(f"{path}: {report.summary()}")
        failed = failed or bool(report.problems)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
