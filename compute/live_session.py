"""Live ablation from a store alone: the layer's stored activations and tail weights, rebuilt into an engine.

compute/live.py keeps, for the live layers, every validation image's activations ``layers/<L>/live/acts`` [N, C, H, W]
and the tail's weights ``layers/<L>/live/tail/*``. With the architecture from the model registry (by the store's
``model`` attribute) that is all a greedy run or a hand-picked ablation needs: no images, no checkpoint. The whole
activation array is held in memory (39 MB for the demo's conv5).

Live work runs on one torch thread by default: each engine call is small (a class's images times the candidate
units), and on the shared 2-core CPU two OpenMP threads took 6x the wall time of one for 20 greedy steps (26 s
against 4 s, machine load ~20); in the app several users' live runs may also share the server's cores.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from compute import greedy
from compute.engine import AblationEngine, Outcome
from compute.errors import UserError
from compute.live import load_tail
from compute.models import get_spec
from store import StoreError, StoreReader


@dataclass
class LiveSession:
    """One layer of one store, ready for live ablations."""

    layer: str
    acts: torch.Tensor  # [N, C, H, W]
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
            return self.engine.baseline(self.acts, self.labels)

    def images_of(self, group) -> np.ndarray:
        return np.flatnonzero(np.isin(self.labels.numpy(), list(group)))

    def start_greedy(self, group) -> greedy.GreedyState:
        """A greedy run whose objective is the mean class accuracy of ``group``, on those classes' images."""
        chosen = torch.as_tensor(self.images_of(group))
        with self._threads():
            return greedy.start(self.engine, self.acts[chosen], self.labels[chosen], group)

    def advance(self, state: greedy.GreedyState) -> int:
        with self._threads():
            return greedy.advance(self.engine, state)

    def path_accuracy(self, order) -> tuple[np.ndarray, np.ndarray]:
        """Class accuracy [S+1, K] and overall accuracy [S+1] of all images as ``order``'s units go one by one."""
        with self._threads():
            paths = greedy.ablation_paths(self.engine, self.acts, self.labels, [list(order)])[0]
        counts = greedy.correct_counts(paths, self.labels, self.num_classes)
        per_class = np.maximum(np.bincount(self.labels.numpy(), minlength=self.num_classes), 1)
        return counts / per_class, counts.sum(1) / len(self.labels)


def live_layers(reader: StoreReader) -> list[str]:
    return [layer for layer in reader.layers if reader.has(f"layers/{layer}/live/acts")]


def tail_state(reader: StoreReader, layer: str) -> dict[str, np.ndarray]:
    prefix = f"layers/{layer}/live/tail/"
    names = sorted(path[len(prefix):] for path in reader.contents if path.startswith(prefix))  # "fc6.weight", ...
    return {name: reader.read(prefix + name) for name in names}


def load_session(path, layer: str, max_memory: int = 1 << 30) -> LiveSession:
    """Rebuild the live session of ``layer`` from the store at ``path`` (StoreError when it holds no live data)."""
    reader = StoreReader(Path(path))
    reader.require(layer, "live")
    try:
        spec = get_spec(str(reader.attrs.get("model", "")))
    except UserError as error:
        raise StoreError(f"{reader.path.name} was made with a model this tool does not know ({error})") from None
    info = reader.read_attrs(f"layers/{layer}/live")
    num_classes = int(info.get("num_classes", len(reader.classes)))
    tail = load_tail(spec, num_classes, layer, tail_state(reader, layer))
    acts = torch.from_numpy(np.ascontiguousarray(reader.read(f"layers/{layer}/live/acts")))
    labels = torch.from_numpy(reader.read("images/labels").astype(np.int64))
    return LiveSession(layer, acts, labels, list(reader.classes), AblationEngine(tail, max_memory=max_memory))
