"""Validation images decoded once per run into a uint8 array (in memory or a memory-mapped file).

Every stage streams the same images several times (activations, ablation, top images...); decoding JPEGs each time
would starve a GPU. Images are resized and centre-cropped once, kept as uint8 (a quarter of float32), and normalised
on the device batch by batch.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from compute.data.filelist import FileListDataset

IN_MEMORY_LIMIT = 2 << 30


class _Cropped(torch.utils.data.Dataset):
    def __init__(self, dataset: FileListDataset, preprocess):
        from torchvision import transforms

        self.dataset = dataset
        self.transform = transforms.Compose([
            transforms.Resize(preprocess.resize), transforms.CenterCrop(preprocess.crop), transforms.PILToTensor()])

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        return self.transform(self.dataset.load_rgb(index)), index


class ImageCache:
    """uint8 [N, 3, S, S] images plus labels; ``batches()`` yields normalised float tensors on a device."""

    def __init__(self, dataset: FileListDataset, preprocess, cache_file: Path | None = None, workers: int = 0):
        self.labels = torch.as_tensor(dataset.labels)
        self.preprocess = preprocess
        shape = (len(dataset), 3, preprocess.crop, preprocess.crop)
        nbytes = int(np.prod(shape))
        if cache_file is not None and nbytes > IN_MEMORY_LIMIT:
            self.images = self._memmap(dataset, shape, Path(cache_file), workers)
        else:
            self.images = np.empty(shape, dtype=np.uint8)
            self._fill(dataset, self.images, workers)

    def _memmap(self, dataset, shape, path: Path, workers: int) -> np.memmap:
        done = path.with_name(path.name + ".done")
        if path.exists() and done.exists():
            return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)
        path.parent.mkdir(parents=True, exist_ok=True)
        images = np.memmap(path, dtype=np.uint8, mode="w+", shape=shape)
        self._fill(dataset, images, workers)
        images.flush()
        done.touch()
        return np.memmap(path, dtype=np.uint8, mode="r", shape=shape)

    def _fill(self, dataset, target: np.ndarray, workers: int) -> None:
        loader = torch.utils.data.DataLoader(_Cropped(dataset, self.preprocess), batch_size=64, num_workers=workers)
        for images, indices in tqdm(loader, desc="decoding validation images", unit="batch", leave=False,
                                    disable=len(dataset) < 2000):
            target[indices.numpy()] = images.numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def normalise(self, images_u8: torch.Tensor, device) -> torch.Tensor:
        return self.preprocess.normalise(images_u8, device)

    def batches(self, batch_size: int, device, indices: np.ndarray | None = None):
        """Yield (normalised images, labels, indices) on ``device``, in index order."""
        order = np.arange(len(self)) if indices is None else np.asarray(indices)
        pin = torch.device(device).type == "cuda"
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            images = torch.from_numpy(np.ascontiguousarray(self.images[chosen]))
            if pin:
                images = images.pin_memory()
            yield self.normalise(images, device), self.labels[chosen].to(device), torch.as_tensor(chosen)


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
