"""Live ablation from a store alone: the layer's stored activations and tail weights, rebuilt into an engine.

compute/stages/live.py keeps, for the live layers, every validation image's activations ``layers/<L>/live/acts`` [N, C, H, W]
and the tail's weights ``layers/<L>/live/tail/*``. With the architecture from the model registry (by the store's
``model`` attribute) that is all a greedy run or a hand-picked ablation needs: no images, no checkpoint. The whole
activation array is held in memory when it fits the live-memory budget (39 MB for the demo's conv5; default budget
2 GB, ``$UNIT_ABLATION_LIVE_MEMORY`` in GB). A larger layer (AlexNet conv5 on 36,500 Places365 images is 6.3 GB) is
read from the store as needed instead: a greedy run reads its classes' images, and the accuracy of a finished path
streams every image in blocks.

Live work runs on one torch thread by default: each engine call is small (a class's images times the candidate
units), and on the shared 2-core CPU two OpenMP threads took 6x the wall time of one for 20 greedy steps (26 s
against 4 s, machine load ~20); in the app several users' live runs may also share the server's cores.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compute.lib import greedy
from compute.lib.engine import AblationEngine, Outcome, correct_counts
from compute.errors import UserError
from compute.stages.live import load_tail
from compute.models import get_spec
from store import StoreError, StoreReader
from store.schema import layer_path


LIVE_MEMORY_ENV = "UNIT_ABLATION_LIVE_MEMORY"
BLOCK_BYTES = 256 << 20  # activations read per block when streaming every image


def live_memory_budget() -> int:
    """Bytes of activations a session may hold in memory (``$UNIT_ABLATION_LIVE_MEMORY`` GB, default 2)."""
    return int(float(os.environ.get(LIVE_MEMORY_ENV, "2")) * (1 << 30))


class StoredActivations:
    """A live layer's activations [N, C, H, W]: held in memory when they fit ``budget`` bytes, else read from the store
    when asked, some images at a time or every image in blocks of about ``block_bytes``."""

    def __init__(self, reader: StoreReader, path: str, budget: int, block_bytes: int = BLOCK_BYTES):
        self.reader, self.path = reader, path
        self.shape = reader.shape(path)
        image_bytes = int(np.prod(self.shape[1:])) * 4
        self.nbytes = image_bytes * self.shape[0]
        self.block = max(1, block_bytes // image_bytes)
        self.held = self._read(()) if self.nbytes <= budget else None

    def _read(self, selection) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.reader.read(self.path, selection)))

    def take(self, indices) -> torch.Tensor:
        """The activations of images ``indices`` (increasing), in that order."""
        if self.held is not None:
            return self.held[torch.as_tensor(indices, dtype=torch.long)]
        return self._read([int(i) for i in indices])

    def blocks(self):
        """(slice of images, their activations) covering every image in order."""
        if self.held is not None:
            yield slice(0, self.shape[0]), self.held
            return
        for start in range(0, self.shape[0], self.block):
            part = slice(start, min(start + self.block, self.shape[0]))
            yield part, self._read(part)


@dataclass
class LiveSession:
    """One layer of one store, ready for live ablations."""

    layer: str
    acts: StoredActivations
    labels: torch.Tensor  # [N]
    class_names: list[str]
    engine: AblationEngine
    threads: int = 1  # torch threads for live work (see the module docstring)

    @property
    def units(self) -> int:
        return int(self.acts.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @contextmanager
    def _threads(self):
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            yield
        finally:
            torch.set_num_threads(previous)

    def baseline(self) -> Outcome:
        with self._threads():
            parts = [self.engine.baseline(acts, self.labels[part]) for part, acts in self.acts.blocks()]
        return Outcome(torch.cat([o.pred for o in parts], -1), torch.cat([o.true_prob for o in parts], -1))

    def images_of(self, group) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels.numpy(), list(group)))

    def start_greedy(self, group) -> greedy.GreedyState:
        """A greedy run whose objective is the mean class accuracy of ``group``, on those classes' images."""
        chosen = self.images_of(group)
        with self._threads():
            return greedy.start(self.engine, self.acts.take(chosen), self.labels[torch.as_tensor(chosen)], group)

    def advance(self, state: greedy.GreedyState) -> int:
        with self._threads():
            return greedy.advance(self.engine, state)

    def path_predictions(self, order) -> torch.Tensor:
        """Every image's predicted class [S+1, N] as ``order``'s units go one by one (row 0: nothing ablated, row s:
        the first s units): the images a step breaks are those whose row s differs from row s - 1."""
        with self._threads():
            return torch.cat([greedy.ablation_paths(self.engine, acts, self.labels[part], [list(order)])[0].cpu()
                              for part, acts in self.acts.blocks()], -1)

    def predictions(self, units) -> tuple[torch.Tensor, torch.Tensor]:
        """Every image's predicted class [N] before and after ablating the set ``units`` together."""
        mask = torch.zeros(1, self.units, dtype=torch.bool)
        mask[0, torch.as_tensor(list(units), dtype=torch.long)] = True
        before, after = [], []
        with self._threads():
            for part, acts in self.acts.blocks():
                base = self.engine.baseline(acts, self.labels[part])
                before.append(base.pred.cpu())
                after.append(self.engine.evaluate_units(acts, self.labels[part], mask, base,
                                                        probabilities=False).pred[0].cpu())
        return torch.cat(before), torch.cat(after)

    def path_outcome(self, order) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
        """Class accuracy [S+1, K], overall accuracy [S+1] and the predictions [S+1, N] (``path_predictions``) of all
        images as ``order``'s units go one by one."""
        paths = self.path_predictions(order)
        counts = correct_counts(paths, self.labels, self.num_classes)  # integer counts, exact
        per_class = np.maximum(np.bincount(self.labels.numpy(), minlength=self.num_classes), 1)
        return counts / per_class, counts.sum(1) / len(self.labels), paths

    def path_accuracy(self, order) -> tuple[np.ndarray, np.ndarray]:
        """Class accuracy [S+1, K] and overall accuracy [S+1] of all images as ``order``'s units go one by one."""
        return self.path_outcome(order)[:2]


def live_layers(reader: StoreReader) -> list[str]:
    return [layer for layer in reader.layers if reader.has(layer_path(layer, "live", "acts"))]


def tail_state(reader: StoreReader, layer: str) -> dict[str, np.ndarray]:
    prefix = layer_path(layer, "live", "tail") + "/"
    names = sorted(path[len(prefix):] for path in reader.contents if path.startswith(prefix))  # "fc6.weight", ...
    return {name: reader.read(prefix + name) for name in names}


def load_session(path, layer: str, max_memory: int = 1 << 30, hold: int | None = None,
                 block_bytes: int = BLOCK_BYTES) -> LiveSession:
    """Rebuild the live session of ``layer`` from the store at ``path`` (StoreError when it holds no live data).
    Activations up to ``hold`` bytes (default: the live-memory budget) are held in memory, larger ones streamed."""
    reader = StoreReader(Path(path))
    reader.require(layer, "live")
    try:
        spec = get_spec(str(reader.attrs.get("model", "")))
    except UserError as error:
        raise StoreError(f"{reader.path.name} was made with a model this tool does not know ({error})") from None
    info = reader.read_attrs(layer_path(layer, "live"))
    num_classes = int(info.get("num_classes", len(reader.classes)))
    tail = load_tail(spec, num_classes, layer, tail_state(reader, layer))
    acts = StoredActivations(reader, layer_path(layer, "live", "acts"), live_memory_budget() if hold is None else hold,
                             block_bytes)
    labels = torch.from_numpy(reader.read("images/labels").astype(np.int64))
    return LiveSession(layer, acts, labels, list(reader.classes), AblationEngine(tail, max_memory=max_memory))
