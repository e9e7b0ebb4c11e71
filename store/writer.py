"""Writing a run: each stage into its own part file, assembled into the store by one atomic rename.

Why parts: HDF5 does not survive a writer killed mid-write (the file's metadata may be left inconsistent), so a stage
never writes into a file anyone else needs. Stage ``s`` is written as ``.<run>.parts/<s>.h5.tmp`` and renamed to
``<s>.h5`` when it completes; the final ``<run>.h5`` appears only when every stage is done (temporary name, then
``os.replace``). A killed run leaves at most a ``.tmp`` part, which the next run discards and redoes: readers, who only
open ``*.h5`` files in the store directory, never see a partial store.

Every part carries its stage's key (a hash of what the stage's result depends on). A rerun keeps the parts whose key is
unchanged and takes unchanged stages out of the finished store (``reuse``): the store records, per stage, its key,
options and contents (``stages`` attributes), so a changed setting recomputes only the stages it touches.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from contextlib import contextmanager
import re
from pathlib import Path

import h5py
import numpy as np

from store.schema import GZIP_LEVEL, SCHEMA_VERSION, SUFFIX, StoreError, parse_record


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

    def __init__(self, path: Path, run_key: str, provenance: dict, shard_rank: int = 0, plan: dict | None = None):
        """``plan``: stage name -> {"key": ..., and what else the store records about the stage (options, needs)},
        in run order. Without one every stage is keyed by ``run_key`` (all or nothing, as a one-off writer wants)."""
        self.path = Path(path)
        if not self.path.name.endswith(SUFFIX):
            raise StoreError(f"store path {self.path} must end in {SUFFIX}")
        self.run_key = run_key
        self.provenance = dict(provenance)
        self.plan = dict(plan) if plan is not None else None
        self.measured: dict[str, dict] = {}  # time and peak memory of the stages this process computed (for commit)
        self.parts = self.parts_of(self.path)
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

    # Resume only parts made with the key the stage has now (same model, weights, data, options, inputs).
    def _start_or_resume(self) -> None:
        for leftover in self.parts.glob("*.tmp"):
            leftover.unlink()
        for lock in self.parts.glob("lock-rank*"):
            lock.unlink(missing_ok=True)
        for part in self.parts.glob("*.h5"):
            stage = part.name[:-3].replace("__", "/")
            if _part_key(part) != self.key_of(stage):
                part.unlink()
        plan = list(self.plan) if self.plan is not None else None
        (self.parts / "run.json").write_text(json.dumps({"run_key": self.run_key, "provenance": self.provenance,
                                                         "plan": plan}, default=str))

    @staticmethod
    def parts_of(path: Path) -> Path:
        """The hidden folder where a run's finished stages wait for assembly."""
        path = Path(path)
        return path.with_name("." + path.name[: -len(SUFFIX)] + ".parts")

    @staticmethod
    def part_matches(parts: Path, stage: str, key: str) -> bool:
        """Whether ``parts`` holds a finished part of ``stage`` made with ``key`` (read without taking the lock)."""
        part = parts / (stage.replace("/", "__") + ".h5")
        return part.exists() and _part_key(part) == key

    def key_of(self, stage: str) -> str | None:
        """The key a part of ``stage`` must carry; a shard part (``<stage>/shard-r-of-w``) carries its stage's."""
        if self.plan is None:
            return self.run_key
        name = _SHARD.sub("", stage)
        while name not in self.plan and "/" in name:  # a stage's own sub-parts (one per pass) carry its key
            name = name.rsplit("/", 1)[0]
        return self.plan[name]["key"] if name in self.plan else self.run_key

    def _part(self, stage: str) -> Path:
        return self.parts / (stage.replace("/", "__") + ".h5")

    def done(self, stage: str) -> bool:
        return self._part(stage).exists()

    def skipped(self, stage: str) -> str | None:
        """Why a finished stage wrote nothing (it was recorded as skipped), or None."""
        with h5py.File(self._part(stage), "r") as handle:
            reason = handle.attrs.get("skipped")
        return None if reason is None else str(reason)

    def skip(self, stage: str, reason: str) -> None:
        """Record that ``stage`` has nothing to write (no concept data, 0 rotations...), so reruns need not ask."""
        with self.stage(stage) as handle:
            handle.attrs["skipped"] = reason

    def reuse(self, stage: str, source: Path) -> bool:
        """Take ``stage``'s results out of the finished store ``source`` when it recorded them under the stage's
        current key; False (nothing written) otherwise."""
        try:
            with h5py.File(source, "r", locking=False) as store:
                record = stage_record(store, stage)
                if record is None or record.get("key") != self.key_of(stage):
                    return False
                with self.stage(stage) as part:
                    if record.get("skipped"):
                        part.attrs["skipped"] = record["skipped"]
                    _copy_contents(store, part, record.get("contents", {}))
                return True
        except (OSError, KeyError, ValueError):  # an unreadable or older store is simply not reused
            return False

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
            handle.attrs["key"] = self.key_of(stage) or ""
            if "finished" not in handle.attrs:  # a reused stage keeps the time it was computed
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
        # Amends take turns with the assembly, so an addition to the previous version made meanwhile is carried over
        # (or reported), never lost to the rename.
        with _exclusive(self.path.with_name("." + self.path.name + ".lock")):
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
        stages = self._stage_order()
        for stage in stages:
            with h5py.File(self._part(stage), "r") as source:
                record = {"key": str(source.attrs.get("key", "")), "finished": str(source.attrs.get("finished", "")),
                          "contents": _contents(source)}
                if "skipped" in source.attrs:
                    record["skipped"] = str(source.attrs["skipped"])
                _merge(source, target)
            if self.plan is not None:
                record.update({k: v for k, v in self.plan[stage].items() if k != "key"})
            record.update(self.measured.get(stage, {}))
            if "stages" not in target:  # attributes in creation order: readers list the stages in run order
                target.create_group("stages", track_order=True)
            target["stages"].attrs[stage] = json.dumps(record, default=str)
        for attr in ("stage", "finished", "key", "skipped"):
            if attr in target.attrs:
                del target.attrs[attr]
        self._carry_additions(target, stages)
        for key, value in self.provenance.items():
            target.attrs[key] = _attr_value(value)
        target.attrs["run_key"] = self.run_key
        target.attrs["schema_version"] = SCHEMA_VERSION
        target.attrs["completed"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")

    def _stage_order(self) -> list[str]:
        """The stages to assemble: the plan's, in its order (a part left from an earlier plan is not included)."""
        finished = self.completed_stages()
        if self.plan is None:
            return finished
        missing = [stage for stage in self.plan if stage not in finished]
        if missing:
            raise StoreError(f"cannot assemble {self.path.name}: stage {missing[0]} is not finished")
        return list(self.plan)

    def _carry_additions(self, target: h5py.File, stages: list[str]) -> None:
        """Keep what was added to the previous version after it was computed (compute.predict's tables, saved live
        greedy runs) where every stage it was built on is unchanged; said on the console where not."""
        if not self.path.exists():
            return
        new_keys = {stage: json.loads(target["stages"].attrs[stage])["key"] for stage in stages}
        with h5py.File(self.path, "r", locking=False) as old:
            if "stages" not in old:
                return
            records = {stage: parse_record(value) for stage, value in old["stages"].attrs.items()}
            if not all("contents" in record for record in records.values()):
                return  # a store from before per-stage records: what was added cannot be told from what was computed
            owned = {path for record in records.values() for path in record.get("contents", {}).get("datasets", [])}
            for path in _additions(old, owned):
                based_on = _based_on(path, records)
                if all(new_keys.get(s) == records[s].get("key") for s in based_on):
                    parent = path.rsplit("/", 1)[0] if "/" in path else None
                    _copy_contents(old, target, {"datasets": [path], "attrs": {parent: list(old[parent].attrs)}
                                                 if parent else {}})
                else:
                    print(f"{self.path.name}: dropped {path}, added after the run, because a stage it was built on "
                          f"changed: compute it again (compute.predict, or the Greedy page)")

    def close(self) -> None:
        if not self._lock.closed:
            fcntl.flock(self._lock, fcntl.LOCK_UN)
            self._lock.close()


_SHARD = re.compile(r"/shard-\d+-of-\d+$")


def _part_key(part: Path) -> str | None:
    try:
        with h5py.File(part, "r") as handle:
            return str(handle.attrs["key"]) if "key" in handle.attrs else None
    except (OSError, KeyError):  # a damaged part is stale
        return None


def stage_record(store: h5py.File, stage: str) -> dict | None:
    if "stages" not in store or stage not in store["stages"].attrs:
        return None
    return parse_record(store["stages"].attrs[stage])


def _contents(part: h5py.File) -> dict:
    """What a part holds: its datasets, and the attribute names of each group that carries some."""
    datasets, attrs = [], {}

    def visit(name, item):
        if isinstance(item, h5py.Dataset):
            datasets.append(name)
        elif len(item.attrs):
            attrs[name] = sorted(item.attrs)
    part.visititems(visit)
    return {"datasets": datasets, "attrs": attrs}


def _copy_contents(source: h5py.File, target: h5py.Group, contents: dict) -> None:
    for path in contents.get("datasets", []):
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        group = target.require_group(parent) if parent else target
        source.copy(source[path], group, name=path.rsplit("/", 1)[-1])
    for path, names in contents.get("attrs", {}).items():
        group = target.require_group(path)
        for name in names:
            group.attrs[name] = source[path].attrs[name]


def _additions(store: h5py.File, owned: set[str]) -> list[str]:
    found = []
    store.visititems(lambda name, item: found.append(name)
                     if isinstance(item, h5py.Dataset) and name not in owned else None)
    return found


# What the known additions are computed from: compute.predict's table reads a layer's drops and attributes, a saved
# live greedy run the layer's live data. Anything else added is taken to rest on every stage of its layer.
ADDITION_INPUTS = {"prediction": ("setup", "ablation", "attributes"), "greedy_live": ("setup", "live")}


def _based_on(path: str, records: dict) -> list[str]:
    """The stages an addition at ``path`` was built on (``prediction/<L>/...``, ``layers/<L>/<kind>/...``)."""
    parts = path.split("/")
    if parts[0] == "prediction" and len(parts) > 2:
        layer, kind = parts[1], "prediction"
    elif parts[0] == "layers" and len(parts) > 3:
        layer, kind = parts[1], parts[2]
    else:
        return list(records)
    sections = ADDITION_INPUTS.get(kind)
    chosen = []
    for stage in records:
        section, _, of = stage.partition("/")
        if of in (layer, "") and (sections is None or section in sections):
            chosen.append(stage)
    return chosen


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
