"""Validation sets given as a file list (``relative/path.jpg label`` per line), as Places365 publishes them.

SynthScenes writes its splits in the same format, so one loader serves the demo and Places365.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from compute.errors import UserError


def read_categories(path: Path) -> list[str]:
    """Places365 ``categories_places365.txt``: lines ``/a/airfield 0``; the class name drops the ``/a/`` prefix."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"class list {path} not found: put the categories file beside the images or pass --classes")
    names: dict[int, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split(" ")
        try:
            index = int(parts[-1])
        except ValueError:
            raise UserError(f"{path}:{number}: expected '<name> <index>', got {line!r}") from None
        name = parts[0]
        names[index] = name[3:] if name.startswith("/") and len(name) > 3 and name[2] == "/" else name
    if sorted(names) != list(range(len(names))):
        raise UserError(f"{path}: class indices are not 0..{len(names) - 1}")
    return [names[i] for i in range(len(names))]


def read_file_list(path: Path) -> tuple[list[str], np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"file list {path} not found: pass --data pointing at the validation folder")
    files, labels = [], []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            name, label = line.rsplit(" ", 1)
            labels.append(int(label))
        except ValueError:
            raise UserError(f"{path}:{number}: expected '<image> <label>', got {line!r}") from None
        files.append(name)
    return files, np.asarray(labels, dtype=np.int64)


def balanced_subset(labels: np.ndarray, per_class: int | None) -> np.ndarray:
    """Indices of the first ``per_class`` images of each class, in file order (all images when None)."""
    if not per_class:
        return np.arange(len(labels))
    keep = np.zeros(len(labels), dtype=bool)
    for cls in np.unique(labels):
        keep[np.flatnonzero(labels == cls)[:per_class]] = True
    return np.flatnonzero(keep)


class FileListDataset(torch.utils.data.Dataset):
    """Images named in a file list, relative to ``image_root``; yields (tensor, label, index)."""

    def __init__(self, image_root: Path, files: list[str], labels: np.ndarray, transform):
        self.image_root = Path(image_root)
        self.files = list(files)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def load_rgb(self, index: int) -> Image.Image:
        path = self.image_root / self.files[index]
        try:
            with Image.open(path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise UserError(f"image {path} not found: the file list and the image folder disagree") from None
        except (UnidentifiedImageError, OSError) as error:
            raise UserError(f"image {path} cannot be decoded ({error}): replace or remove it from the list") from None

    def __getitem__(self, index: int):
        return self.transform(self.load_rgb(index)), int(self.labels[index]), index
