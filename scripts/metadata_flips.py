"""Flip the bytes of a store's HDF5 metadata one at a time; count the reads that hand out wrong values without an error.

    python scripts/metadata_flips.py STORE [--sample N] [--seed 0] [--mask 0xFF]
    python scripts/metadata_flips.py --small [--libver earliest]     # a 9 KB store made here, every byte swept

The metadata region is every byte of the file outside the chunks of chunked datasets (those carry fletcher32
checksums of their own): the superblock, object headers, chunk indexes, heaps, free space. For each byte, a copy of
the store with that byte XORed with ``--mask`` is read twice, as the app reads it and as ``store.check`` vouches for
it:

- through ``StoreReader``: open it, read every dataset the original holds and compare with the original (the root
  attributes too). A read that returns a different value without raising ``StoreError`` is counted, numbers apart
  from text; any other exception is a crash (a traceback in the app).
- through ``store.check``: when it reports nothing, every dataset and attribute is read back with plain h5py and
  compared: a passed store with a different value is counted.

The reads run in worker processes, because HDF5 itself can die (segmentation fault) or loop on a damaged file: such a
flip is counted as a death or a hang (``--hang`` seconds without an answer) and a fresh worker goes on.

Targets: zero wrong numbers, zero exceptions other than StoreError, and no death or hang outside text. Text (class
names, file names, every string attribute) lives in HDF5's global heap, which carries no checksum in any HDF5 format:
wrong text, and the deaths and hangs there, are printed for the record. ``--sample N`` draws N bytes of the metadata
region at random: the tiny test store (13 MB) has 128 KB of it, a third of it text, and each flip reads the whole store
twice (about 0.5 s there, a few seconds on the 48 MB demo store): sample a few hundred. Exit status 1 when a target
is missed.
"""

from __future__ import annotations

import argparse
import importlib
import multiprocessing
import random
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from store import SCHEMA_VERSION, StoreError, StoreReader  # noqa: E402
from store.check import check_store  # noqa: E402
from store.writer import open_for_writing, write_array  # noqa: E402


HANG_SECONDS = 30.0  # one flip's reads take milliseconds on the small store, about 3 s on the demo store


@dataclass
class Counts:
    flipped: int = 0
    reader_reads: int = 0           # dataset reads through StoreReader, plus one for its root attributes
    reader_errors: int = 0          # flips the reader refused with a StoreError somewhere
    reader_wrong_numbers: int = 0   # reads that returned different numbers without an error
    reader_wrong_text: int = 0
    reader_crashes: int = 0         # anything but StoreError out of the reader
    check_reported: int = 0         # flips store.check reported
    check_wrong_numbers: int = 0    # flips store.check passed while a number differed
    check_wrong_text: int = 0
    check_crashes: int = 0          # an exception out of check_store, or a passed file h5py cannot read
    hard_crashes: int = 0           # the process died (HDF5 itself crashed on the damaged file)
    hangs: int = 0                  # the reads did not finish in time (HDF5 loops on some damaged files)
    lost: list[int] = field(default_factory=list)  # the offsets of those deaths and hangs
    examples: list[str] = field(default_factory=list)

    def add(self, other: "Counts") -> None:
        for name, value in vars(other).items():
            setattr(self, name, getattr(self, name) + value)

    def wrong_numbers(self) -> int:
        return self.reader_wrong_numbers + self.check_wrong_numbers

    def exceptions(self) -> int:
        return self.reader_crashes + self.check_crashes

    def report(self) -> str:
        return "\n".join([
            f"bytes flipped: {self.flipped}",
            f"StoreReader: {self.reader_reads} reads, {self.reader_errors} flips refused with one line, "
            f"{self.reader_wrong_numbers} reads with wrong numbers and no error, {self.reader_wrong_text} with wrong "
            f"text, {self.reader_crashes} crashes",
            f"store.check: {self.check_reported} flips reported, {self.check_wrong_numbers} passed with wrong "
            f"numbers, {self.check_wrong_text} passed with wrong text, {self.check_crashes} crashes",
            f"process deaths (HDF5 crashed): {self.hard_crashes}, hangs (reads that did not finish): {self.hangs}"
            + (f", at bytes {', '.join(map(str, sorted(self.lost)[:20]))}" if self.lost else ""),
            f"wrong numbers without an error (target 0): {self.wrong_numbers()}",
            f"exceptions other than StoreError (target 0): {self.exceptions()}",
            *(f"  e.g. {line}" for line in self.examples[:10]),
        ])


def make_small_store(path: Path, libver=None) -> Path:
    """A complete store (store.check passes it) of 9 KB: 2 classes, 4 images, one layer of 2 units with the required
    sections (9 datasets: text, integers and floats), written as the writer writes. ``libver`` None writes in the
    tool's format; ("earliest", "latest") in HDF5's default one, which stores had before."""
    rng = np.random.default_rng(0)
    handle = open_for_writing(path, "w") if libver is None else h5py.File(path, "w", libver=libver)
    with handle:
        write_array(handle, "classes", np.array(["beach", "forest"], dtype=object))
        write_array(handle, "images/labels", np.array([0, 1, 1, 0]))
        layer = "layers/conv5"
        write_array(handle, f"{layer}/activations/mean", rng.random((4, 2), dtype=np.float32))
        handle[layer].attrs["units"] = 2
        write_array(handle, f"{layer}/ablation/class_drop", np.array([[0.5, -0.5], [0.0, 1.0]], np.float32))
        write_array(handle, f"{layer}/ablation/overall_drop", np.array([0.0, 0.5], np.float32))
        write_array(handle, f"{layer}/ablation/baseline_class_acc", np.array([1.0, 0.5], np.float32))
        for name, shape in (("l1", (2,)), ("selectivity", (2, 2)), ("correlation", (2, 2))):
            write_array(handle, f"{layer}/attributes/{name}", rng.random(shape, dtype=np.float32))
        for key, value in {"schema_version": SCHEMA_VERSION, "completed": "2026-12-01T00:00:00+0000",
                           "model": "demo", "num_images": 4, "num_classes": 2, "layer_order": '["conv5"]'}.items():
            handle.attrs[key] = value
    return path


def metadata_offsets(path: Path) -> np.ndarray:
    """Offsets of every byte outside the chunks of chunked datasets."""
    data = np.zeros(path.stat().st_size, bool)

    def mark(_, item):
        if isinstance(item, h5py.Dataset) and item.chunks is not None:
            for index in range(item.id.get_num_chunks()):
                chunk = item.id.get_chunk_info(index)
                data[chunk.byte_offset: chunk.byte_offset + chunk.size] = True

    with h5py.File(path, "r", locking=False) as handle:
        handle.visititems(mark)
    return np.flatnonzero(~data)


def global_heaps(raw: bytes) -> list[tuple[int, int, int]]:
    """(start, end of the objects, end) of each global heap collection: where HDF5 keeps variable-length strings.
    Found by their signature; objects run until the free-space object (index 0), after which HDF5 reads nothing."""
    heaps, start = [], raw.find(b"GCOL")
    while start >= 0:
        size = int.from_bytes(raw[start + 8: start + 16], "little")
        position = start + 16
        while position + 16 <= min(start + size, len(raw)):
            index = int.from_bytes(raw[position: position + 2], "little")
            if index == 0:
                position += 16
                break
            length = int.from_bytes(raw[position + 8: position + 16], "little")
            position += 16 + -(-length // 8) * 8  # object data is padded to a multiple of 8 bytes
        heaps.append((start, min(position, start + size), start + size))
        start = raw.find(b"GCOL", start + 4)
    return heaps


def parsed_metadata_offsets(path: Path) -> np.ndarray:
    """The metadata offsets less the free space of global heaps (zeros HDF5 never parses): what a flip can change."""
    free = np.zeros(path.stat().st_size, bool)
    for _, objects_end, end in global_heaps(path.read_bytes()):
        free[objects_end:end] = True
    offsets = metadata_offsets(path)
    return offsets[~free[offsets]]


def text_region(path: Path) -> np.ndarray:
    """Per byte, whether it belongs to text: a global heap, or the heap references a string dataset stores."""
    text = np.zeros(path.stat().st_size, bool)
    for start, _, end in global_heaps(path.read_bytes()):
        text[start:end] = True

    def mark(_, item):
        if isinstance(item, h5py.Dataset) and item.dtype.kind == "O" and item.id.get_offset() is not None:
            text[item.id.get_offset(): item.id.get_offset() + item.id.get_storage_size()] = True

    with h5py.File(path, "r", locking=False) as handle:
        handle.visititems(mark)
    return text


def _value(item):
    value = item[()]
    return value.tolist() if isinstance(value, np.ndarray) and value.dtype == object else value


def snapshot(path: Path) -> dict:
    """Every dataset's values and every attribute, keyed ("data", path) and ("attr", object path, name)."""
    found = {}

    def take(name, item):
        for key, value in item.attrs.items():
            found[("attr", name, key)] = value
        if isinstance(item, h5py.Dataset):
            found[("data", name)] = _value(item)

    with h5py.File(path, "r", locking=False) as handle:
        take("", handle)
        handle.visititems(take)
    return found


def is_text(value) -> bool:
    if isinstance(value, (str, bytes, list)):
        return True
    return isinstance(value, np.ndarray) and value.dtype.kind in "OSU"


def same(a, b) -> bool:
    if isinstance(a, bytes):
        a = a.decode(errors="replace")
    if isinstance(b, bytes):
        b = b.decode(errors="replace")
    if isinstance(a, list) or isinstance(b, list):
        return [x.decode() if isinstance(x, bytes) else x for x in np.ravel(np.asarray(a, object))] == \
               [x.decode() if isinstance(x, bytes) else x for x in np.ravel(np.asarray(b, object))]
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))


def _through_reader(path: Path, original: dict, counts: Counts, where: int) -> None:
    datasets = [key[1] for key in original if key[0] == "data"]
    root = {key[2]: value for key, value in original.items() if key[0] == "attr" and key[1] == ""}
    refused = False
    try:
        reader = StoreReader(path)
    except StoreError:
        counts.reader_errors += 1
        return
    except Exception as error:  # noqa: BLE001 - the point is to count these
        counts.reader_crashes += 1
        counts.examples.append(f"byte {where}: StoreReader raised {type(error).__name__}: {error}")
        return
    counts.reader_reads += 1
    wrong = [key for key, value in root.items() if key not in reader.attrs or not same(reader.attrs[key], value)]
    _count_wrong(counts, "reader", where, [("attr", "", k) for k in wrong], original)
    for name in datasets:
        counts.reader_reads += 1
        try:
            value = reader.read(name)
        except StoreError:
            refused = True
            continue
        except Exception as error:  # noqa: BLE001
            counts.reader_crashes += 1
            counts.examples.append(f"byte {where}: reading {name} raised {type(error).__name__}: {error}")
            continue
        if not same(value if not isinstance(value, np.ndarray) or value.dtype != object else value.tolist(),
                    original[("data", name)]):
            _count_wrong(counts, "reader", where, [("data", name)], original)
    counts.reader_errors += refused


def _count_wrong(counts: Counts, who: str, where: int, keys: list, original: dict) -> None:
    for key in keys:
        text = is_text(original.get(key))
        field_name = f"{who}_wrong_{'text' if text else 'numbers'}"
        setattr(counts, field_name, getattr(counts, field_name) + 1)
        if not text:
            counts.examples.append(f"byte {where}: {who} handed out a wrong value for {key}")


def _through_check(path: Path, original: dict, counts: Counts, where: int) -> None:
    try:
        problems = check_store(path)
    except Exception as error:  # noqa: BLE001
        counts.check_crashes += 1
        counts.examples.append(f"byte {where}: check_store raised {type(error).__name__}: {error}")
        return
    if problems:
        counts.check_reported += 1
        return
    try:
        now = snapshot(path)
    except Exception as error:  # noqa: BLE001
        counts.check_crashes += 1
        counts.examples.append(f"byte {where}: store.check passed a file h5py cannot read ({error})")
        return
    wrong = [key for key in original if key not in now or not same(now[key], original[key])]
    numbers = [key for key in wrong if not is_text(original[key])]
    counts.check_wrong_numbers += bool(numbers)
    counts.check_wrong_text += bool(wrong) and not numbers
    if numbers:
        counts.examples.append(f"byte {where}: store.check passed, but {numbers[0]} differs")


def flip_outcome(damaged: Path, original: dict, where: int) -> Counts:
    """How the reader and store.check fared on one damaged copy."""
    counts = Counts(flipped=1)
    _through_reader(damaged, original, counts, where)
    _through_check(damaged, original, counts, where)
    return counts


def _worker(raw: bytes, offsets, mask: int, original: dict, damaged: Path, pipe) -> None:
    """Flip, read, flip back, in one copy of the store (a fresh one per worker: a dead worker leaves its flip in)."""
    damaged.write_bytes(raw)
    for where in offsets:
        _poke(damaged, where, raw[where] ^ mask)
        pipe.send(("start", int(where)))
        pipe.send(("done", flip_outcome(damaged, original, int(where))))
        _poke(damaged, where, raw[where])
    pipe.close()


def _poke(path: Path, where: int, value: int) -> None:
    with open(path, "r+b") as handle:
        handle.seek(where)
        handle.write(bytes([value]))


def sweep(path: Path, offsets, mask: int = 0xFF, work: Path | None = None, log=None,
          hang_seconds: float = HANG_SECONDS, workers: int = 2) -> Counts:
    """Flip each byte at ``offsets`` (XOR ``mask``) in a copy of ``path`` and read the copy both ways.

    The reads run in worker processes (``workers`` lanes, each its own share of the offsets): HDF5 can die of a
    damaged file (a segmentation fault in the library) or loop on it, which is counted against the flip in flight, and
    a fresh worker goes on with the next byte."""
    log = log or (lambda line: print(line, flush=True))
    raw, original = path.read_bytes(), snapshot(path)
    offsets = [int(where) for where in offsets]
    # Fresh interpreters (spawn, not fork: the caller may hold h5py's lock in another thread) import this file by
    # its module name, from the scripts folder.
    if str(Path(__file__).resolve().parent) not in sys.path:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
    lane = Lane(raw, original, mask, hang_seconds, importlib.import_module("metadata_flips")._worker, log,
                len(offsets))
    with tempfile.TemporaryDirectory(dir=work) as scratch:
        shares = [(offsets[index::workers], Path(scratch) / f"{index}-{path.name}") for index in range(workers)]
        with ThreadPoolExecutor(workers) as pool:
            results = list(pool.map(lambda share: lane.run(*share), shares))
    total = Counts()
    for result in results:
        total.add(result)
    return total


class Lane:
    """One worker process at a time flipping its share of the offsets; replaced when it dies or hangs."""

    def __init__(self, raw, original, mask, hang_seconds, target, log, of):
        self.raw, self.original, self.mask, self.hang_seconds = raw, original, mask, hang_seconds
        self.target, self.log, self.of = target, log, of
        self.done, self.started, self.lock = 0, time.monotonic(), threading.Lock()

    def run(self, offsets: list[int], damaged: Path) -> Counts:
        total, position = Counts(), 0
        context = multiprocessing.get_context("spawn")
        while position < len(offsets):
            receiver, sender = context.Pipe(duplex=False)
            worker = context.Process(target=self.target, args=(self.raw, offsets[position:], self.mask, self.original,
                                                                damaged, sender))
            worker.start()
            sender.close()
            in_flight, hung = None, False
            while True:
                if in_flight is not None and not receiver.poll(self.hang_seconds):
                    worker.kill()  # HDF5 loops on some damaged files: a hang, counted like a crash
                    hung = True
                    break
                try:
                    kind, value = receiver.recv()
                except EOFError:
                    break
                if kind == "start":
                    in_flight = value
                    continue
                total.add(value)
                in_flight, position = None, position + 1
                self._progress()
            worker.join()
            receiver.close()
            if in_flight is not None:  # the worker died or hung reading this flip
                what = f"hung for {self.hang_seconds} s" if hung else f"the process died (exit {worker.exitcode})"
                total.add(Counts(flipped=1, hangs=int(hung), hard_crashes=int(not hung), lost=[in_flight],
                                 examples=[f"byte {in_flight}: {what}"]))
                position += 1
                self._progress()
        return total

    def _progress(self) -> None:
        with self.lock:
            self.done += 1
            if self.done % 500 == 0:
                self.log(f"  {self.done} of {self.of} flips, {time.monotonic() - self.started:.0f} s")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("store", nargs="?", type=Path, help="a finished store (a copy is flipped, never the store)")
    parser.add_argument("--small", action="store_true", help="sweep a 9 KB store made here instead")
    parser.add_argument("--libver", choices=["earliest", "v110"], default="v110",
                        help="with --small: earliest writes HDF5's default format (stores before this check)")
    parser.add_argument("--sample", type=int, default=0, help="flip this many random metadata bytes (0: every one)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hang", type=float, default=HANG_SECONDS,
                        help="seconds after which one flip's reads count as a hang (HDF5 loops on some damage)")
    parser.add_argument("--workers", type=int, default=2, help="worker processes flipping at once")
    parser.add_argument("--mask", type=lambda text: int(text, 0), default=0xFF, help="XORed into each byte")
    args = parser.parse_args(argv)
    if not args.small and args.store is None:
        parser.error("name a store, or --small")
    with tempfile.TemporaryDirectory() as scratch:
        path = args.store
        if args.small:
            libver = None if args.libver == "v110" else ("earliest", "latest")
            path = make_small_store(Path(scratch) / "small.h5", libver)
        offsets, text = metadata_offsets(path), text_region(path)
        print(f"{path}: {path.stat().st_size} bytes, {len(offsets)} outside checksummed chunks "
              f"({int(text[offsets].sum())} of them text)", flush=True)
        if args.sample and args.sample < len(offsets):
            offsets = sorted(random.Random(args.seed).sample(list(offsets), args.sample))
        counts = sweep(path, offsets, args.mask, hang_seconds=args.hang, workers=args.workers)
    print(counts.report())
    outside = [where for where in counts.lost if not text[where]]
    print(f"deaths and hangs outside text (global heaps, string heap references; target 0): {len(outside)}")
    return 0 if counts.wrong_numbers() == 0 and counts.exceptions() == 0 and not outside else 1


if __name__ == "__main__":
    raise SystemExit(main())
