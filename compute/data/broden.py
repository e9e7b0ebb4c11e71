"""Reader for concept data in the Broden layout (Bau et al. 2017): the real Broden and SynthScenes alike.

Layout (see broden1_224/README.txt):
- ``index.csv``: ``image,split,ih,iw,sh,sw,<category>...``. A category cell holds ``;``-separated entries, dominant
  first: an integer is an image-level label (it covers the whole image), anything else is a PNG (relative to
  ``images/``) whose per-pixel label number is R + 256*G. Segmentations are ``sh x sw`` (half the image size in
  broden1_224).
- ``label.csv``: ``number,name,category,frequency,coverage,syns``; the category cell lists ``name(count)`` entries,
  dominant first (``material(36);object(3)``). Label 0 means unlabelled.
- ``category.csv``: ``name,first,last,count,frequency``, one row per category, in Broden's order.

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
FINGERPRINT_FILES = ("index.csv", "label.csv", "category.csv")
_CATEGORY_ENTRY = re.compile(r"^\s*([^()]+?)\s*\((\d+)\)\s*$")


class Concept(NamedTuple):
    number: int
    name: str
    category: str  # the dominant one, listed first in label.csv


@dataclass
class ImageLabels:
    """The annotations of one image.

    pixel: one decoded label map (int32 [sh, sw]) per mask file, whatever its category.
    image_level: label numbers that apply to the whole image (scene, texture).
    categories_present: categories with any annotation for this image; Network Dissection counts a unit's active
        area for a concept's IoU only over images annotated in that concept's category.
    shape: (sh, sw), the segmentation size the image-level labels cover.
    """

    pixel: list[np.ndarray]
    image_level: list[int]
    categories_present: set[str]
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


def _label_categories(cell: str, where: str) -> list[str]:
    """``object(123);part(4)`` -> ['object', 'part']."""
    names = []
    for entry in cell.split(";"):
        match = _CATEGORY_ENTRY.match(entry)
        if not match:
            raise UserError(f"{where}: malformed category cell {cell!r} (expected like 'object(123)'); {HINT}")
        names.append(match.group(1))
    return names


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
        concepts = []
        for line, row in enumerate(_read_csv(path, ("number", "name", "category")), start=2):
            number = _int(row["number"], f"{path}:{line}")
            if number == 0:  # '-', unlabelled; some writers list it
                continue
            category = _label_categories(row["category"] or "", f"{path}:{line}")[0]
            if category not in self.categories:
                raise UserError(f"{path}:{line}: category {category!r} is not in category.csv; {HINT}")
            concepts.append(Concept(number, row["name"], category))
        return sorted(concepts)

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
        pixel, image_level, present = [], [], set()
        for category, cell in zip(self.categories, cells):
            for entry in filter(None, (e.strip() for e in cell.split(";"))):
                present.add(category)
                if entry.isdigit():
                    image_level.append(int(entry))
                else:
                    pixel.append(self._decode(self.root / "images" / entry))
        return ImageLabels(pixel, image_level, present, (sh, sw))

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
    """sha256 over index.csv, label.csv and category.csv: identifies the concept data in provenance and cache keys."""
    digest = hashlib.sha256()
    for name in FINGERPRINT_FILES:
        path = Path(root).expanduser() / name
        try:
            data = path.read_bytes()
        except OSError:
            raise UserError(f"Broden {path.stem} not found at {path}: {HINT}") from None
        digest.update(f"{name}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()
