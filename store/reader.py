"""Reading finished stores: open read-only, read what is asked, close. Nothing is held open between calls.

h5py serialises every call behind one global lock and has crashed with several threads sharing a file handle, so
callers (the app's cached loaders) keep the arrays, never the handle. Files are opened with HDF5 file locking off:
a finished store is never modified in place (writers rename new files over it), so there is nothing to lock against,
and locking fails on many network file systems.
"""

from __future__ import annotations

import json
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
    except OSError as error:
        raise StoreError(f"{path.name} cannot be opened ({str(error).splitlines()[0][:120]}): the file is damaged, "
                         f"recompute it") from None


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
        with _open(self.path) as handle:
            self.attrs = {key: _decode(value) for key, value in handle.attrs.items()}
            version = self.attrs.get("schema_version")
            if version is None or "completed" not in self.attrs:
                raise StoreError(f"{self.path.name} is not a finished store of this tool: recompute it")
            if int(version) != SCHEMA_VERSION:
                raise StoreError(f"{self.path.name} has schema version {version}, this tool reads version "
                                 f"{SCHEMA_VERSION}: recompute it with `python -m compute.all`")
            self.contents: set[str] = set()
            handle.visit(self.contents.add)
            self.stages = dict(handle["stages"].attrs) if "stages" in handle else {}
            self.classes = list(_decode(handle["classes"][()])) if "classes" in handle else []
            self.layers = list(handle["layers"]) if "layers" in handle else []
            order = self.attrs.get("layer_order")
            if order:
                ranked = json.loads(order)
                self.layers.sort(key=lambda name: ranked.index(name) if name in ranked else len(ranked))

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
        with _open(self.path) as handle:
            dataset = handle[path]
            try:
                value = dataset[selection] if selection != () else dataset[()]
            except OSError as error:  # fletcher32 mismatch or unreadable chunk
                raise StoreError(f"{self.path.name}: '{path}' is damaged ({str(error).splitlines()[0][:100]}): "
                                 f"recompute the store") from None
            return _decode(value)

    def read_attrs(self, path: str) -> dict:
        path = path.strip("/")
        with _open(self.path) as handle:
            return {key: _decode(value) for key, value in handle[path].attrs.items()} if path in handle else {}

    def layer(self, layer: str, section: str, name: str, selection=()):
        return self.read(layer_path(layer, section, name), selection)

    def shape(self, path: str) -> tuple:
        with _open(self.path) as handle:
            return tuple(handle[path.strip("/")].shape)


def list_stores(directory) -> list[Path]:
    """Finished stores in a directory, newest first. Temporary and hidden files (runs in progress) are skipped."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob("*" + SUFFIX) if not p.name.startswith(".") and not p.name.endswith(PARTIAL_SUFFIX)]
    return sorted(found, key=lambda p: p.stat().st_mtime, reverse=True)
