"""Reader for concept data in the Broden layout (Bau et al. 2017): the real Broden and SynthScenes alike.

Layout (see broden1_224/README.txt):
- ``index.csv``: ``image,split,ih,iw,sh,sw,<category>...``. A category cell holds ``;``-separated entries, dominant
  first: an integer is an image-level label (it covers the whole image), anything else is a PNG (relative to
  ``images/``) whose per-pixel label number is R + 256*G. Segmentations are ``sh x sw`` (half the image size in
  broden1_224).
- ``label.csv``: ``number,name,category,frequency,coverage,syns``; the category cell lists ``name(count)`` entries,
  the count being the images in which the label appears in that category (``material(36);object(3)``). Label 0
  means unlabelled.
- ``category.csv``: ``name,first,last,count,frequency``, one row per category, in Broden's order.
- ``c_<category>.csv``: ``code,number,name,frequency,coverage``, the labels of one category with their coverage in
  it (pixel portions in units of whole images).

A label can sit in several categories' columns (fabric is mostly material but also appears in object masks), so a
label has one *primary* category, chosen as NetDissect-Lite does (``primary_categories_per_index``): the category in
which it covers most (c_<category>.csv's coverage). Without the c_ files, or on a tie, the category in which it
appears in most images (label.csv's count) decides, then the one listed first. (NetDissect-Lite breaks exact
coverage ties towards the later category of category.csv.) Whether an image is annotated in a category is then a
question about the labels it carries, not about the index.csv column they came in: see compute.lib.dissection.

Masks are decoded lazily, one image at a time: the real Broden has 63,305 images.
"""

from __future__ import annotations

import csv
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import cv2
import numpy as np

from compute.errors import UserError

HINT = "download broden1_224 from netdissect.csail.mit.edu/data/ and unzip it, or pass --concepts PATH"
INDEX_COLUMNS = ("image", "split", "ih", "iw", "sh", "sw")
FINGERPRINT_FILES = ("index.csv", "label.csv", "category.csv")  # and every c_<category>.csv there
_CATEGORY_ENTRY = re.compile(r"^\s*([^()]+?)\s*\((\d+)\)\s*$")


class Concept(NamedTuple):
    number: int
    name: str
    category: str  # the primary one (see the module docstring)


@dataclass
class ImageLabels:
    """The annotations of one image.

    pixel: one decoded label map (int32 [sh, sw]) per mask file, whatever its category.
    image_level: label numbers that apply to the whole image (scene, texture).
    shape: (sh, sw), the segmentation size the image-level labels cover.

    Which index.csv column an entry came from is deliberately not kept: a label's category is its primary one
    (BrodenDataset.concepts), whichever column holds it in this image.
    """

    pixel: list[np.ndarray]
    image_level: list[int]
    shape: tuple[int, int]


def _read_csv(path: Path, required: tuple[str, ...]) -> list[dict[str, str]]:
    if not path.exists():
        raise UserError(f"Broden {path.stem} not found at {path}: {HINT}")
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in required if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path} lacks the column(s) {', '.join(missing)}: the Broden folder is damaged; "
                                f"{HINT}")
            return list(reader)
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise UserError(f"cannot read {path} ({error}): the Broden folder is damaged; {HINT}") from None


def _label_categories(cell: str, where: str) -> list[tuple[str, int]]:
    """``object(123);part(4)`` -> [('object', 123), ('part', 4)]."""
    entries = []
    for entry in cell.split(";"):
        match = _CATEGORY_ENTRY.match(entry)
        if not match:
            raise UserError(f"{where}: malformed category cell {cell!r} (expected like 'object(123)'); {HINT}")
        entries.append((match.group(1), int(match.group(2))))
    return entries


def _float(value: str, where: str) -> float:
    try:
        return float(value) if value.strip() else 0.0  # Broden leaves some statistics empty
    except ValueError:
        raise UserError(f"{where}: expected a number, got {value!r}: the Broden tables are damaged; {HINT}") from None


def primary_category(entries: list[tuple[str, int]], coverage: dict[str, float]) -> str:
    """The category a label belongs to for dissection: most coverage, then most images, then listed first.

    entries: label.csv's (category, images) pairs, in their listed order; coverage: the label's coverage in each
    category (c_<category>.csv), empty when those files are absent.
    """
    ranked = [(coverage.get(name, 0.0), count, -position) for position, (name, count) in enumerate(entries)]
    return entries[ranked.index(max(ranked))][0]


def _int(value: str, where: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise UserError(f"{where}: expected an integer, got {value!r}: the Broden index is damaged; {HINT}") from None


class BrodenDataset:
    """Images and concept annotations of a Broden-layout folder, optionally restricted to one split."""

    def __init__(self, root, split: str | None = None):
        self.root = Path(root).expanduser()
        self.split = split
        if not (self.root / "index.csv").exists():
            raise UserError(f"Broden index not found at {self.root / 'index.csv'}: {HINT}")
        self.categories = [row["name"] for row in
                           _read_csv(self.root / "category.csv", ("name", "first", "last", "count", "frequency"))]
        self.concepts = self._read_labels()
        self._rows, pixel = self._read_index(split)
        self.pixel_categories = [c for c in self.categories if c in pixel]
        self.image_categories = [c for c in self.categories if c not in pixel]
        self._by_number = {c.number: c for c in self.concepts}

    def _read_labels(self) -> list[Concept]:
        path = self.root / "label.csv"
        coverage = self._read_coverage()
        concepts = []
        for line, row in enumerate(_read_csv(path, ("number", "name", "category")), start=2):
            number = _int(row["number"], f"{path}:{line}")
            if number == 0:  # '-', unlabelled; some writers list it
                continue
            entries = _label_categories(row["category"] or "", f"{path}:{line}")
            known = [(name, count) for name, count in entries if name in self.categories]
            if not known:
                raise UserError(f"{path}:{line}: category {entries[0][0]!r} is not in category.csv; {HINT}")
            category = primary_category(known, {name: table.get(number, 0.0) for name, table in coverage.items()})
            concepts.append(Concept(number, row["name"], category))
        return sorted(concepts)

    def _read_coverage(self) -> dict[str, dict[int, float]]:
        """{category: {label number: coverage}} from every c_<category>.csv; empty unless each category has one
        (coverage from only some categories would favour those)."""
        paths = {name: self.root / f"c_{name}.csv" for name in self.categories}
        if not all(path.exists() for path in paths.values()):
            return {}
        coverage = {}
        for name, path in paths.items():
            rows = _read_csv(path, ("number", "coverage"))
            coverage[name] = {_int(row["number"], f"{path}:{line}"): _float(row["coverage"] or "", f"{path}:{line}")
                              for line, row in enumerate(rows, start=2)}
        return coverage

    def _read_index(self, split: str | None) -> tuple[list[tuple], set[str]]:
        """Rows (image, split, ih, iw, sh, sw, cells per category) and the categories that come as masks."""
        path = self.root / "index.csv"
        table = _read_csv(path, INDEX_COLUMNS + tuple(self.categories))
        rows, pixel, splits = [], set(), set()
        for line, row in enumerate(table, start=2):
            splits.add(row["split"])
            if split is not None and row["split"] != split:
                continue
            sizes = tuple(_int(row[c], f"{path}:{line}") for c in ("ih", "iw", "sh", "sw"))
            cells = tuple(row[c] or "" for c in self.categories)
            for category, cell in zip(self.categories, cells):
                if category not in pixel and cell and not all(e.strip().isdigit() for e in cell.split(";")):
                    pixel.add(category)
            rows.append((row["image"], row["split"], *sizes, cells))
        if not rows:
            found = ", ".join(sorted(splits)) or "none"
            raise UserError(f"no images of split {split!r} in {path} (splits there: {found})")
        return rows, pixel

    def __len__(self) -> int:
        return len(self._rows)

    def concept(self, number: int) -> Concept:
        return self._by_number[number]

    def image_path(self, i: int) -> Path:
        return self.root / "images" / self._rows[i][0]

    def image(self, i: int) -> np.ndarray:
        """RGB uint8 [ih, iw, 3]."""
        path = self.image_path(i)
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise UserError(f"Broden image {path} is missing or unreadable: the Broden folder is incomplete; {HINT}")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def labels(self, i: int) -> ImageLabels:
        _, _, _, _, sh, sw, cells = self._rows[i]
        pixel, image_level = [], []
        for cell in cells:
            for entry in filter(None, (e.strip() for e in cell.split(";"))):
                if entry.isdigit():
                    image_level.append(int(entry))
                else:
                    pixel.append(self._decode(self.root / "images" / entry))
        return ImageLabels(pixel, image_level, (sh, sw))

    @staticmethod
    def _decode(path: Path) -> np.ndarray:
        """Label numbers of a Broden mask: R + 256*G (cv2 reads BGR)."""
        data = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if data is None:
            raise UserError(f"Broden mask {path} is missing or unreadable: the Broden folder is incomplete; {HINT}")
        if data.ndim == 2:
            return data.astype(np.int32)
        return data[:, :, 2].astype(np.int32) + 256 * data[:, :, 1].astype(np.int32)


def fingerprint(root) -> str:
    """sha256 over index.csv, label.csv, category.csv and the c_<category>.csv files (they decide each label's
    primary category): identifies the concept data in provenance and cache keys."""
    root = Path(root).expanduser()
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES + tuple(sorted(path.name for path in root.glob("c_*.csv"))):
        path = root / name
        try:
            data = path.read_bytes()
        except OSError:
            raise UserError(f"Broden {path.stem} not found at {path}: {HINT}") from None
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
