"""What every stage of a run needs: the model as a sequence, the decoded images, the device, the store writer."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from compute.run.distributed import Dist
from compute.lib.engine import AblationEngine
from compute.run.imagecache import ImageCache
from compute.lib.pooling import with_sliced_pools
from compute.lib.sequence import run_to, tail_of


@dataclass
class RunContext:
    spec: object
    model: torch.nn.Module
    images: ImageCache
    class_names: list[str]
    layers: list[str]
    device: torch.device
    writer: object
    config: dict
    data_dir: Path
    batch_size: int = 64
    max_memory: int = 1 << 30
    options: dict = field(default_factory=dict)  # option dataclass -> its values for this run (compute.run.options)
    concepts: Path | None = None                 # the Broden-layout concept data set, if the run has one
    files: list = field(default_factory=list)    # the validation images' files, in label order
    sharded: frozenset = frozenset()             # sections declared sharded in the stage table
    dist: Dist = field(default_factory=Dist)
    # Layers whose activations on every validation image later stages stream again (greedy, rotation, live): the
    # first full pass over them keeps them, where they fit in a quarter of max_memory, and those stages read them
    # instead of rerunning the prefix (the demo's conv5: 157 MB, four passes). Set by the run (compute.all).
    keep: frozenset = frozenset()

    def __post_init__(self):
        # Sliced pools give the stock pools' outputs, faster on the CPU (compute.lib.pooling); this model is not trained.
        self.sequence = with_sliced_pools(self.spec.to_sequence(self.model).to(self.device).eval())
        self._shapes: dict[str, tuple] = {}  # one image's activation shape per layer
        self._kept: dict[str, torch.Tensor] = {}

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels.numpy()

    def option(self, kind: type):
        """This run's values of an option dataclass (its defaults where the run gave none)."""
        return self.options.get(kind) or kind()

    def step(self, layer: str) -> str:
        return self.spec.layers[layer]

    def activations(self, layers: list[str], indices=None, run_all: bool = False, desc: str | None = None):
        """Yield ({layer: acts}, labels, indices) batch by batch; the prefix runs once per batch for all layers, or
        not at all where every layer's activations are kept (``keep``)."""
        from tqdm import tqdm

        steps = {self.step(layer): layer for layer in layers}
        total = len(self.images) if indices is None else len(indices)
        kept = not run_all and layers and all(layer in self._kept for layer in layers)
        batches = (self._kept_batches(layers, indices) if kept
                   else self.images.batches(self.batch_size, self.device, indices))
        keeping = {} if kept or indices is not None else {layer: None for layer in layers
                                                          if layer in self.keep and layer not in self._kept}
        with tqdm(total=total, desc=desc, unit="img", leave=False, disable=desc is None) as bar:
            for images, labels, idx in batches:
                if kept:
                    acts = images
                else:
                    outputs = run_to(self.sequence, images, list(steps), run_all=run_all)
                    acts = {steps[s]: outputs[s] for s in steps}
                    if run_all:
                        acts["logits"] = outputs["logits"]
                    self._keep(keeping, acts, idx)
                bar.update(len(idx))
                yield acts, labels, idx
        self._kept.update({layer: held for layer, held in keeping.items() if held is not None})

    def _keep(self, keeping: dict, acts: dict, idx: torch.Tensor) -> None:
        """Copy a full pass's batch of the layers being kept into their [N, ...] tensors (made on the first batch,
        where the kept layers' total stays within a quarter of max_memory)."""
        for layer in keeping:
            batch = acts[layer]
            if keeping[layer] is None:
                size = len(self.images) * batch[0].numel() * batch.element_size()
                if not self._fits_kept(self.kept_bytes(), size):
                    continue
                keeping[layer] = batch.new_empty((len(self.images), *batch.shape[1:]))
            keeping[layer][idx.to(batch.device)] = batch

    def _kept_batches(self, layers: list[str], indices):
        """Batches as ``ImageCache.batches`` yields them, with the kept activations in place of the images."""
        order = np.arange(len(self.images)) if indices is None else np.asarray(indices)
        for start in range(0, len(order), self.batch_size):
            chosen = torch.as_tensor(order[start:start + self.batch_size])
            yield ({layer: self._kept[layer][chosen.to(self._kept[layer].device)] for layer in layers},
                   self.images.labels[chosen].to(self.device), chosen)

    def engine(self, layer: str, holding: int = 0) -> AblationEngine:
        """The layer's ablation engine, with what is left of max_memory after the kept activations (those held and
        those a full pass will keep) and the ``holding`` bytes its caller holds beside it: a stage's tensors together
        stay within --max-memory. At least an eighth of it, so that a tight budget slows a stage rather than
        stopping it."""
        budget = max(self.max_memory - self.kept_bytes(planned=True) - holding, self.max_memory // 8)
        return AblationEngine(tail_of(self.sequence, self.step(layer)), max_memory=budget)

    def kept_bytes(self, planned: bool = False) -> int:
        """Bytes of the kept activations; with ``planned``, also those of the layers a full pass will keep."""
        held = sum(tensor.numel() * tensor.element_size() for tensor in self._kept.values())
        if planned:
            for layer in sorted(self.keep - set(self._kept)):
                size = len(self.images) * self._image_bytes(layer)
                held += size if self._fits_kept(held, size) else 0
        return held

    def _fits_kept(self, held: int, size: int) -> bool:
        """Whether a layer's ``size`` bytes of activations may be kept beside ``held``: a quarter of max_memory."""
        return held + size <= self.max_memory // 4

    def units(self, layer: str) -> int:
        """Channels of the layer's output (a layer need not have a conv of its own: a DenseNet block, a ReLU)."""
        return int(self._shape(layer)[0])

    def _image_bytes(self, layer: str) -> int:
        """Bytes of one image's activations of the layer (float32)."""
        return int(np.prod(self._shape(layer))) * 4

    @torch.no_grad()
    def _shape(self, layer: str) -> tuple:
        """One image's activation shape at the layer, from one image run once."""
        if layer not in self._shapes:
            images, _, _ = next(self.images.batches(1, self.device))
            step = self.step(layer)
            self._shapes[layer] = tuple(run_to(self.sequence, images, [step])[step].shape[1:])
        return self._shapes[layer]

    def run_sharded(self, stage: str, items: int, compute, combine, everywhere: bool = False):
        """Split ``items`` over the ranks; return ``combine([(indices, arrays), ...])`` on rank 0, None elsewhere.

        ``compute(indices) -> dict of numpy arrays`` does this rank's share. With several ranks each share is kept as
        a part of the run (``<stage>/shard-r-of-w``), so a rerun after a failure recomputes only missing shares.
        ``everywhere``: every rank combines the shares and gets the result (a pass whose result the next pass needs).
        """
        if stage.split("/")[0] not in self.sharded:
            raise RuntimeError(f"stage {stage} shares its work out between ranks but is not declared sharded in "
                               f"compute.run.pipeline: declare it, or the other ranks never run it")
        if not self.dist.active:
            everything = np.arange(items)
            return combine([(everything, compute(everything))])
        from store.writer import write_array

        mine = self.shard_stage(stage, self.dist.rank)
        if self.writer.done(mine):
            print(f"rank {self.dist.rank}: reusing its finished share of {stage}", file=sys.stderr)
        else:
            indices = self.dist.shard(items)
            arrays = compute(indices)
            with self.writer.stage(mine) as h5:
                write_array(h5, "shard/indices", indices)
                for name, value in arrays.items():
                    write_array(h5, f"shard/{name}", value)
        self.dist.barrier()
        if not (self.dist.is_main or everywhere):
            return None
        shares = []
        for rank in range(self.dist.world):
            arrays = self.writer.read_part_group(self.shard_stage(stage, rank), "shard")
            shares.append((arrays.pop("indices"), arrays))
        return combine(shares)

    @staticmethod
    def in_item_order(shares: list, names) -> dict:
        """The per-item arrays ``names`` of every share (items along axis 0), concatenated back in item order."""
        order = np.argsort(np.concatenate([indices for indices, _ in shares]), kind="stable")
        return {name: np.concatenate([arrays[name] for _, arrays in shares])[order] for name in names}

    @staticmethod
    def by_layer(results: dict[str, dict]) -> dict:
        """A joint pass's arrays per layer as one share's flat arrays, named ``<layer>/<name>``."""
        return {f"{layer}/{name}": value for layer, arrays in results.items() for name, value in arrays.items()}

    @staticmethod
    def of_layer(arrays: dict, layer: str) -> dict:
        """One layer's arrays out of a share's ``by_layer`` arrays."""
        prefix = f"{layer}/"
        return {name[len(prefix):]: value for name, value in arrays.items() if name.startswith(prefix)}

    def shard_stage(self, stage: str, rank: int) -> str:
        return f"{stage}/shard-{rank}-of-{self.dist.world}"

    def drop_shards(self, stage: str) -> None:
        """Once rank 0 has written the combined stage, the shares are no longer needed (nor wanted in the store)."""
        for rank in range(self.dist.world if self.dist.active else 0):
            self.writer.discard(self.shard_stage(stage, rank))
