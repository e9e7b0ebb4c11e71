"""Reading finished stores: open read-only, read what is asked, close. Nothing is held open between calls.

h5py serialises every call behind one global lock and has crashed with several threads sharing a file handle, so
callers (the app's cached loaders) keep the arrays, never the handle. Files are opened with HDF5 file locking off:
a finished store is never modified in place (writers rename new files over it), so there is nothing to lock against,
and locking fails on many network file systems.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from store.schema import (LAYER_ATTRS, PARTIAL_SUFFIX, ROOT_ATTRS, SCHEMA_VERSION, SECTION_COMMANDS, SUFFIX,
                          StoreError, attribute_problems, dtype_problems, layer_path, layers_of, parse_record,
                          shape_problems)


def _open(path: Path) -> h5py.File:
    if not path.exists():
        raise StoreError(f"store {path} not found: compute it with `python -m compute.all --model MODEL`")
    if not h5py.is_hdf5(path):
        raise StoreError(f"{path.name} is not an HDF5 store (truncated or another kind of file): recompute it")
    try:
        return h5py.File(path, "r", locking=False)
    except _DAMAGE as error:
        raise StoreError(f"{path.name}: {open_failure(error)}; copy it again or recompute it "
                         f"(`python -m store.check {path.name}` reports every problem)") from None


# What h5py raises on damaged metadata (a flipped byte in a B-tree, a heap, an object header), besides OSError.
_DAMAGE = (OSError, RuntimeError, KeyError, ValueError)
# What malformed content (a value of an unexpected type or shape) raises in our own code, besides _DAMAGE.
_MALFORMED = (TypeError, AttributeError, IndexError)
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*stored_eof = (\d+)")


def open_failure(error: Exception) -> str:
    """Why HDF5 could not open a file, in words; truncation (a copy cut short, a full disk) is the usual case."""
    text = str(error).strip()
    truncated = _TRUNCATED.search(text)
    if truncated:
        have, want = truncated.groups()
        return f"truncated: {have} of its {want} bytes are there (a copy or write was cut short, or the disk filled)"
    return f"cannot be opened as HDF5 ({text.splitlines()[0][:120] if text else 'no detail'}): the file is damaged"


@contextmanager
def _reading(path: Path):
    """Open briefly; whatever h5py raises on a damaged file becomes one StoreError line, never a traceback."""
    with _open(path) as handle:
        try:
            yield handle
        except _DAMAGE as error:
            raise StoreError(f"{path.name} is damaged ({str(error).splitlines()[0][:100]}): recompute it "
                             f"(`python -m store.check {path.name}` reports every problem)") from None


def _decode(value):
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray) and value.dtype == object:
        return np.array([v.decode() if isinstance(v, bytes) else v for v in value.ravel()], dtype=object).reshape(value.shape)
    if isinstance(value, np.generic):
        return value.item()
    return value


class StoreReader:
    """A finished store. Construction reads the provenance and the table of contents, and refuses (StoreError, one
    line) a store whose metadata does not fit the schema: attribute types, required paths, shapes, kinds of values.
    Pages then never meet a scalar where an array belongs; arrays are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        with _reading(self.path) as handle:
            try:
                self._load(handle)
            except _MALFORMED as error:  # whatever the checks below did not foresee: still one line
                raise StoreError(f"{self.path.name} is malformed ({type(error).__name__}: "
                                 f"{str(error).splitlines()[0][:100] if str(error) else 'no detail'}): recompute it "
                                 f"(`python -m store.check {self.path.name}` reports every problem)") from None

    def _load(self, handle: h5py.File) -> None:
        self.attrs = {key: _decode(value) for key, value in handle.attrs.items()}
        self._check_provenance()
        self.contents: set[str] = set()
        self.datasets: set[str] = set()  # the contents that hold arrays; the rest are groups
        self._metadata: dict[str, tuple] = {}  # dataset path -> (shape, dtype), from the object headers
        handle.visititems(self._index)
        self._check_layout(handle)
        self.stages = dict(handle["stages"].attrs) if "stages" in handle else {}
        self.classes = [str(name) for name in _decode(handle["classes"][()])]
        self.layers = self._ordered(list(handle["layers"]) if "layers" in handle else [])

    def _refuse(self, problems: list[str], what: str = "the store is inconsistent") -> None:
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise StoreError(f"{self.path.name}: {problems[0]}{more}: {what}; recompute it "
                             f"(`python -m store.check {self.path.name}` reports every problem)")

    def _check_provenance(self) -> None:
        """Attribute types first: a version or count written as text must be one line, not a ValueError."""
        self._refuse(attribute_problems(self.attrs, ROOT_ATTRS), "the store is malformed")
        version = self.attrs.get("schema_version")
        if version is None or "completed" not in self.attrs:
            raise StoreError(f"{self.path.name} is not a finished store of this tool: recompute it")
        if int(version) != SCHEMA_VERSION:
            raise StoreError(f"{self.path.name} has schema version {version}, this tool reads version "
                             f"{SCHEMA_VERSION}: recompute it with `python -m compute.all`")

    def _check_layout(self, handle: h5py.File) -> None:
        """What every page relies on, from metadata alone (no array is read): `classes` is there, groups are groups,
        shapes agree with the schema (the check store.check makes) and values are of the kind the writer writes."""
        for group in ("layers", "stages"):
            if group in handle and not isinstance(handle[group], h5py.Group):
                self._refuse([f"'{group}' is a dataset, not a group"], "the store is malformed")
        if "classes" not in self.datasets:
            raise StoreError(f"{self.path.name} has no 'classes' (the class names): the store is incomplete or "
                             f"damaged; recompute it")
        layers = {layer: {key: _decode(value) for key, value in handle[layer_path(layer)].attrs.items()}
                  for layer in layers_of(self.datasets)}
        wrong = [problem for layer, attrs in layers.items()
                 for problem in attribute_problems(attrs, LAYER_ATTRS, layer_path(layer))]
        self._refuse(wrong, "the store is malformed")
        units = {layer: attrs.get("units") for layer, attrs in layers.items()}
        shapes = {path: shape for path, (shape, _) in self._metadata.items()}
        self._refuse(shape_problems(shapes, units, self.attrs)[0])
        self._refuse(dtype_problems(self._metadata, exact=False))

    def _ordered(self, layers: list[str]) -> list[str]:
        """The layers in the run's order (`layer_order`, a JSON list checked at opening), unknown ones last."""
        ranked = json.loads(self.attrs["layer_order"]) if self.attrs.get("layer_order") else []
        return sorted(layers, key=lambda name: ranked.index(name) if name in ranked else len(ranked))

    def _index(self, name: str, item) -> None:
        self.contents.add(name)
        if isinstance(item, h5py.Dataset):
            self.datasets.add(name)
            self._metadata[name] = (item.shape, item.dtype)

    @property
    def name(self) -> str:
        return self.path.name[: -len(SUFFIX)]

    @property
    def config(self) -> dict:
        raw = self.attrs.get("config", "{}")
        return json.loads(raw) if isinstance(raw, str) else dict(raw)

    def stage_records(self) -> dict[str, dict]:
        """Each stage's record (key, options, inputs, finished; see SCHEMA.md), in run order."""
        return {name: parse_record(value) for name, value in self.stages.items()}

    def has(self, path: str) -> bool:
        return path.strip("/") in self.contents

    def has_section(self, layer: str, section: str) -> bool:
        return self.has(layer_path(layer, section))

    def require(self, layer: str, section: str) -> None:
        if layer not in self.layers:
            raise StoreError(f"layer '{layer}' is not in {self.path.name}: it holds {', '.join(self.layers) or 'none'}")
        if not self.has_section(layer, section):
            command = SECTION_COMMANDS.get(section, "python -m compute.all").replace("MODEL", str(self.attrs.get("model", "MODEL")))
            raise StoreError(f"{self.path.name} has no {section} results for {layer}: compute them with `{command}`")

    def read(self, path: str, selection=()):
        """The dataset at ``path`` (optionally a slice, e.g. one unit's row), as numpy; strings decoded."""
        path = path.strip("/")
        if not self.has(path):
            raise StoreError(f"{self.path.name} has no '{path}': recompute the store with a newer `compute.all`")
        with _reading(self.path) as handle:
            dataset = handle[path]
            try:
                value = dataset[selection] if selection != () else dataset[()]
            except OSError as error:  # fletcher32 mismatch or unreadable chunk
                raise StoreError(f"{self.path.name}: '{path}' is damaged ({str(error).splitlines()[0][:100]}): "
                                 f"recompute the store") from None
            return _decode(value)

    def read_attrs(self, path: str) -> dict:
        path = path.strip("/")
        with _reading(self.path) as handle:
            return {key: _decode(value) for key, value in handle[path].attrs.items()} if path in handle else {}

    def layer(self, layer: str, section: str, name: str, selection=()):
        return self.read(layer_path(layer, section, name), selection)

    def shape(self, path: str) -> tuple:
        with _reading(self.path) as handle:
            return tuple(handle[path.strip("/")].shape)


def list_stores(directory) -> list[Path]:
    """Finished stores in a directory, newest first. Temporary and hidden files (runs in progress) are skipped, and so
    are links that lead out of the directory (a reader of this listing never opens a file outside it) and anything
    that is not a regular file."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        return []
    found = {}
    for path in directory.glob("*" + SUFFIX):
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIX):
            continue
        if path.resolve().parent != directory or not path.is_file():  # a directory named x.h5 is no store
            continue
        try:  # a store deleted between the listing and the stat is simply not listed
            found[path] = path.stat().st_mtime
        except FileNotFoundError:
            continue
    return sorted(found, key=found.get, reverse=True)
