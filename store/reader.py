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

from store.schema import PARTIAL_SUFFIX, SCHEMA_VERSION, SECTION_COMMANDS, SUFFIX, StoreError, layer_path


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
    """A finished store. Construction reads the provenance and the table of contents; arrays are read on demand."""

    def __init__(self, path):
        self.path = Path(path)
        with _reading(self.path) as handle:
            self.attrs = {key: _decode(value) for key, value in handle.attrs.items()}
            version = self.attrs.get("schema_version")
            if version is None or "completed" not in self.attrs:
                raise StoreError(f"{self.path.name} is not a finished store of this tool: recompute it")
            if int(version) != SCHEMA_VERSION:
                raise StoreError(f"{self.path.name} has schema version {version}, this tool reads version "
                                 f"{SCHEMA_VERSION}: recompute it with `python -m compute.all`")
            self.contents: set[str] = set()
            self.datasets: set[str] = set()  # the contents that hold arrays; the rest are groups
            handle.visititems(self._index)
            self.stages = dict(handle["stages"].attrs) if "stages" in handle else {}
            self.classes = list(_decode(handle["classes"][()])) if "classes" in handle else []
            self.layers = list(handle["layers"]) if "layers" in handle else []
            order = self.attrs.get("layer_order")
            if order:
                ranked = json.loads(order)
                self.layers.sort(key=lambda name: ranked.index(name) if name in ranked else len(ranked))

    def _index(self, name: str, item) -> None:
        self.contents.add(name)
        if isinstance(item, h5py.Dataset):
            self.datasets.add(name)

    @property
    def name(self) -> str:
        return self.path.name[: -len(SUFFIX)]

    @property
    def config(self) -> dict:
        raw = self.attrs.get("config", "{}")
        return json.loads(raw) if isinstance(raw, str) else dict(raw)

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
    are links that lead out of the directory: a reader of this listing never opens a file outside it."""
    directory = Path(directory).resolve()
    if not directory.is_dir():
        return []
    found = {}
    for path in directory.glob("*" + SUFFIX):
        if path.name.startswith(".") or path.name.endswith(PARTIAL_SUFFIX):
            continue
        if path.resolve().parent != directory:
            continue
        try:  # a store deleted between the listing and the stat is simply not listed
            found[path] = path.stat().st_mtime
        except FileNotFoundError:
            continue
    return sorted(found, key=found.get, reverse=True)
