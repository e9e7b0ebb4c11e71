"""Writing a run: each stage into its own part file, assembled into the store by one atomic rename.

Why parts: HDF5 does not survive a writer killed mid-write (the file's metadata may be left inconsistent), so a stage
never writes into a file anyone else needs. Stage ``s`` is written as ``.<run>.parts/<s>.h5.tmp`` and renamed to
``<s>.h5`` when it completes; the final ``<run>.h5`` appears only when every stage is done (temporary name, then
``os.replace``). A killed run leaves at most a ``.tmp`` part, which the next run discards and redoes: readers, who only
open ``*.h5`` files in the store directory, never see a partial store.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
import numpy as np

from store.schema import GZIP_LEVEL, SCHEMA_VERSION, SUFFIX, StoreError


# HDF5's 1.10 file format: its superblock, object headers (which hold every dataset's shape, type, filters and
# attributes), chunk indexes and B-trees carry checksums, so a flipped byte in them fails the read instead of handing
# out wrong numbers. The default ("earliest") format has none. Pinned at v110 on both ends so that a newer HDF5 never
# writes objects that HDF5 1.10 cannot read.
LIBVER = ("v110", "v110")


def open_for_writing(path, mode: str = "w") -> h5py.File:
    """Every h5py file a store is written through ("w" new, "a"/"r+" amend): in the checksummed format above."""
    return h5py.File(path, mode, libver=LIBVER)


# Writers take turns through flock; a file system without locks (an NFS mount with `nolock`) cannot host a writer.
_NO_LOCKS = ("cannot lock files in {where} ({why}): write the store on a local disk (--store DIR) and copy it into "
             "the shared directory, or mount it with locking")


# The filters of every numeric array (store.check compares each dataset's with schema.expected_filters).
FILTERS = {"compression": "gzip", "compression_opts": GZIP_LEVEL, "shuffle": True, "fletcher32": True}


def write_array(group: h5py.Group, path: str, data, **attrs) -> h5py.Dataset:
    """Create ``path`` under ``group`` (replacing it), compressed and fletcher32-checksummed where it can be.

    Every numeric array, however small, is chunked with a checksum, so that store.check can vouch for every number;
    strings (variable-length, kept in HDF5's global heap) and scalars cannot carry one.
    """
    if path in group:
        del group[path]
    array = np.asarray(data)
    if array.dtype.kind in "US" or array.dtype == object:
        dataset = group.create_dataset(path, data=np.asarray(array, dtype=object), dtype=h5py.string_dtype())
    elif array.ndim == 0 or array.size == 0:  # scalars and empty arrays cannot be chunked, so cannot carry checksums
        dataset = group.create_dataset(path, data=array)
    else:
        dataset = group.create_dataset(path, data=array, chunks=True, **FILTERS)
    for key, value in attrs.items():
        dataset.attrs[key] = value
    dataset.flush()  # a full disk fails here, not later in the close when the caller drops the dataset (see _discard)
    return dataset


def create_array(group: h5py.Group, path: str, shape, dtype, chunks=None) -> h5py.Dataset:
    """An empty filtered dataset to fill in slices (streamed results too large to hold at once)."""
    if path in group:
        del group[path]
    return group.create_dataset(path, shape=shape, dtype=dtype, chunks=chunks or True, **FILTERS)


def _attr_value(value):
    """HDF5 attributes hold numbers and plain strings; anything richer is stored as JSON text."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float, np.number)):
        return value
    if isinstance(value, str):
        return str(value)  # str subclasses (torch's version string) would become numpy unicode arrays
    return json.dumps(value, default=str)


def _create(temporary: Path) -> h5py.File:
    """A new file to write; none is left behind when even its creation fails (a full disk)."""
    try:
        return open_for_writing(temporary, "w")
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def _discard(handle: h5py.File, temporary: Path) -> None:
    """Close and remove a file that will not be finished, without writing to its disk again.

    Closing flushes HDF5's caches (dirty chunks and metadata). On the full disk that stopped the write that flush
    fails again, and after a failed flush HDF5 crashes the process (a segfault on the next close or at exit). So the
    file's descriptor is first pointed at an empty file in memory, which takes the flush and is then dropped.
    """
    if handle.id.valid:
        descriptor = handle.id.get_vfd_handle()
        try:
            spare = os.memfd_create("discarded-store-part")
            try:
                os.dup2(spare, descriptor)
            finally:
                os.close(spare)
        except (AttributeError, OSError):  # no memfd (not Linux): free the file's space for the flush instead
            try:
                os.ftruncate(descriptor, 0)
            except OSError:
                pass
        try:
            handle.close()
        except (OSError, RuntimeError):
            pass  # the error that stopped the write is the one to report
    temporary.unlink(missing_ok=True)


def _merge(source: h5py.Group, target: h5py.Group) -> None:
    for key, value in source.attrs.items():
        target.attrs[key] = value
    for name, item in source.items():
        if isinstance(item, h5py.Group):
            _merge(item, target.require_group(name))
        else:
            if name in target:
                del target[name]
            source.copy(item, target, name=name)


class StoreWriter:
    """Writes one run's store; resumable stage by stage.

    >>> writer = StoreWriter(path, run_key, provenance)
    >>> if not writer.done("ablation/conv5"):
    ...     with writer.stage("ablation/conv5") as h5:
    ...         write_array(h5, "layers/conv5/ablation/class_drop", drop)
    >>> writer.commit()
    """

    def __init__(self, path: Path, run_key: str, provenance: dict, shard_rank: int = 0):
        self.path = Path(path)
        if not self.path.name.endswith(SUFFIX):
            raise StoreError(f"store path {self.path} must end in {SUFFIX}")
        self.run_key = run_key
        self.provenance = dict(provenance)
        self.parts = self.path.with_name("." + self.path.name[: -len(SUFFIX)] + ".parts")
        try:
            self.parts.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise StoreError(f"cannot write in {self.path.parent} ({error.strerror}): choose a writable --store") from None
        # Rank 0 of a run (or a lone process) owns the parts; other ranks only add their shard parts.
        self._lock = open(self.parts / ("lock" if shard_rank == 0 else f"lock-rank{shard_rank}"), "w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(f"another process is writing {self.path.name}: wait for it or kill it") from None
        except OSError as error:
            raise StoreError(_NO_LOCKS.format(where=self.path.parent, why=error.strerror)) from None
        if shard_rank == 0:
            self._start_or_resume()

    # Resume only parts made for the same run (model, weights, data, settings); anything else is stale.
    def _start_or_resume(self) -> None:
        key_file = self.parts / "run.json"
        if key_file.exists():
            try:
                previous = json.loads(key_file.read_text()).get("run_key")
            except ValueError:
                previous = None
            if previous != self.run_key:
                for stale in self.parts.glob("*.h5*"):
                    stale.unlink()
        for leftover in self.parts.glob("*.tmp"):
            leftover.unlink()
        for lock in self.parts.glob("lock-rank*"):
            lock.unlink(missing_ok=True)
        key_file.write_text(json.dumps({"run_key": self.run_key, "provenance": self.provenance}, default=str))

    def _part(self, stage: str) -> Path:
        return self.parts / (stage.replace("/", "__") + ".h5")

    def done(self, stage: str) -> bool:
        return self._part(stage).exists()

    def completed_stages(self) -> list[str]:
        return sorted(p.name[:-3].replace("__", "/") for p in self.parts.glob("*.h5"))

    @contextmanager
    def stage(self, stage: str):
        """Yield an h5py file for this stage; it counts only if the block finishes without an exception."""
        final = self._part(stage)
        temporary = final.with_name(final.name + ".tmp")
        handle = _create(temporary)
        try:
            yield handle
            handle.attrs["stage"] = stage
            handle.attrs["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            handle.flush()  # a full disk fails here, while the file can still be discarded safely
            handle.close()
            os.replace(temporary, final)
        except BaseException:
            _discard(handle, temporary)
            raise

    def read_part(self, stage: str, path: str):
        """Read back a dataset an earlier stage wrote (later stages build on earlier results)."""
        with h5py.File(self._part(stage), "r") as handle:
            return handle[path][()]

    def read_part_group(self, stage: str, group: str) -> dict:
        """Every dataset under ``group`` of a part, as numpy arrays keyed by their path below the group."""
        arrays = {}
        with h5py.File(self._part(stage), "r") as handle:
            handle[group].visititems(lambda name, item: arrays.__setitem__(name, item[()])
                                     if isinstance(item, h5py.Dataset) else None)
        return arrays

    def discard(self, stage: str) -> None:
        self._part(stage).unlink(missing_ok=True)

    def commit(self) -> Path:
        """Assemble every part into ``<run>.h5`` under a temporary name, then rename it into place."""
        temporary = self.path.with_name("." + self.path.name + ".assembling")
        target = _create(temporary)
        try:
            self._assemble(target)
            target.flush()
            target.close()
        except BaseException:
            _discard(target, temporary)
            raise
        os.replace(temporary, self.path)
        self.close()
        shutil.rmtree(self.parts, ignore_errors=True)
        return self.path

    def _assemble(self, target: h5py.File) -> None:
        for part in sorted(self.parts.glob("*.h5")):
            with h5py.File(part, "r") as source:
                stage = source.attrs.get("stage", part.stem)
                finished = source.attrs.get("finished", "")
                _merge(source, target)
            target.require_group("stages").attrs[str(stage)] = str(finished)
        for attr in ("stage", "finished"):
            if attr in target.attrs:
                del target.attrs[attr]
        for key, value in self.provenance.items():
            target.attrs[key] = _attr_value(value)
        target.attrs["run_key"] = self.run_key
        target.attrs["schema_version"] = SCHEMA_VERSION
        target.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


@contextmanager
def amend(path: Path):
    """Add to a finished store without ever exposing a half-written file: copy, write, rename over.

    Amends of one store take turns, so two writers adding different results (compute.predict, say) never lose each
    other's work to the last rename; holding the turn, copies left by a killed amend are known stale and removed.
    """
    path = Path(path)
    if not path.exists():
        raise StoreError(f"store {path} not found: run `python -m compute.all` first")
    with _exclusive(path.with_name("." + path.name + ".lock")):
        for stale in path.parent.glob("." + path.name + ".amend-*"):
            stale.unlink(missing_ok=True)
        temporary = path.with_name("." + path.name + f".amend-{os.getpid()}")
        shutil.copy2(path, temporary)
        try:
            with open_for_writing(temporary, "a") as handle:
                yield handle
            os.replace(temporary, path)
        finally:
            temporary.unlink(missing_ok=True)


@contextmanager
def _exclusive(lock_path: Path):
    """An exclusive flock on ``lock_path``, removed on release; the kernel frees it if the holder dies.

    The file is unlinked while still locked, so a waiter may end up holding a lock on a removed file: it checks that
    the path still names the file it locked and otherwise tries again.
    """
    while True:
        handle = open(lock_path, "w")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as error:
            handle.close()
            raise StoreError(_NO_LOCKS.format(where=lock_path.parent, why=error.strerror)) from None
        try:
            if os.stat(lock_path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        handle.close()
