"""Concept alignment of units (Network Dissection, Bau et al. 2017): one threshold per unit, its IoU with every concept.

For each unit u of a layer, over a concept data set in the Broden layout (compute.data.broden):

1. T_u is the top ``quantile`` (0.5%) of u's activations over every position of every concept image, computed exactly
   in bounded memory (compute.lib.quantiles.TopQuantile keeps only the tail).
2. On each image u's activation map is upsampled (bilinear) to the segmentation size and binarised: M_u = map > T_u.
3. For each concept c, IoU(u, c) = sum_images |M_u & L_c| / sum_images (|A_g| + |L_c| - |M_u & L_c|), where L_c
   is the set of pixels that carry c in any of the image's label maps (an image-level label, scene or texture, covers
   the whole image) and A_g is the part of M_u that counts towards the unions of c's category g on that image.
   A concept's category g is the primary category of its Broden label (compute.data.broden: a label such as fabric,
   ``material(36);object(3)``, can sit in another category's index.csv column). The union rule decides A_g:

   - ``image`` (the default, the published definition): A_g = M_u on images annotated in g, that is carrying at
     least one label whose primary category is g, whichever index.csv column holds it; else nothing. An image
     without part labels says nothing about parts.
   - ``pixel`` (NetDissect-Lite's tally, ``FeatureOperator.tally_job``): A_g = M_u on images where M_u touches a
     label of category g: some active pixel carries one in some label map, or the image has an image-level label of
     g (which covers every active pixel); else nothing. A unit active only on unlabelled pixels of an image adds
     nothing to that image's unions.

   Either way M_u counts whole when it counts. Under both rules an image where M_u & L_c is not empty counts M_u
   towards c's category, so every image's union is at least its intersection and IoU <= 1. (The rule before this
   fix took "annotated in g" from index.csv's column g being non-empty: on an image holding fabric only in its
   object column the intersection and label area of fabric were counted and the active area was not, so IoU
   could exceed 1.) A pixel counts once for c however many of the image's maps carry c; NetDissect-Lite counts it
   once per map. The rule a store used is the attribute ``union_rule`` of ``layers/<L>/dissection`` and of its
   ``iou`` (``--union-rule``; stores without it counted by index.csv column).

Concept images enter the network at its input size: each image is resized to the crop size (a no-op for
broden1_224 with 224-pixel models and for SynthScenes with the demo) and normalised with the model's mean and std,
but not centre-cropped, so the segmentation masks keep covering the whole image, as in NetDissect.

The tally is exact integer pixel counting: per batch, the binarised maps [B, units, pixels] times each image's
concept coverage [pixels, concepts present] (one matrix product), accumulated in float64.

Each pass reads the concept images once for every layer being dissected (``threshold_states``, ``tally_ious``):
decoding the images and their label maps, and the network's prefix, cost the same for one layer or five.

Under torchrun both passes share the concept images out between the ranks, whole batches each (so every image is
computed in the batch it has in one process). For the thresholds each rank keeps the exact bounded tail of its
images (TopQuantile.state) and the tails are merged; the tallies are sums of whole numbers. Either way the combined
result is the one-process result, value for value.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from functools import cached_property

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from compute.data.broden import BrodenDataset, ImageLabels
from compute.lib.quantiles import TopQuantile
from compute.lib.sequence import run_to

STAGE = "dissection"
UNION_RULES = ("image", "pixel")  # see the module docstring; the first is the default
CACHE_BYTES = 256 << 20  # decoded concept images kept between the two passes (ConceptSource), by default
PASSES = ("thresholds", "iou")  # each sharded under torchrun: <stage>/<pass>/shard-r-of-w


@dataclass(frozen=True)
class ConceptTable:
    """The concepts in store order (sorted by Broden label number) and the categories they belong to."""

    names: list[str]
    numbers: np.ndarray  # int64 [C] Broden label numbers
    categories: list[str]  # [C] each concept's (dominant) category
    category_names: list[str]  # [K] Broden's category order
    category_index: np.ndarray  # int64 [C] index into category_names

    @classmethod
    def from_broden(cls, broden: BrodenDataset) -> "ConceptTable":
        order = {name: k for k, name in enumerate(broden.categories)}
        return cls(names=[c.name for c in broden.concepts],
                   numbers=np.array([c.number for c in broden.concepts], np.int64),
                   categories=[c.category for c in broden.concepts],
                   category_names=list(broden.categories),
                   category_index=np.array([order[c.category] for c in broden.concepts], np.int64))

    def __len__(self) -> int:
        return len(self.names)

    def lookup(self, numbers: np.ndarray) -> np.ndarray:
        """Concept index of each Broden label number, -1 where the number is not a known concept (or 0)."""
        position = np.searchsorted(self.numbers, numbers)
        position = np.minimum(position, len(self.numbers) - 1)
        return np.where(self.numbers[position] == numbers, position, -1)


@dataclass
class EncodedLabels:
    """One image's annotations as a dense coverage matrix over the concepts it contains.

    coverage[p, j] is 1 where pixel p carries concept ``concepts[j]`` in any of the image's label maps, else 0; an
    image-level label is a column of ones (it covers the whole image). ``present`` marks the categories the image is
    annotated in: the primary categories of the concepts it carries, whichever index.csv column they came in.
    """

    shape: tuple[int, int]
    concepts: np.ndarray  # int64 [k]
    coverage: np.ndarray  # float32 [sh * sw, k]
    present: np.ndarray  # bool [categories]

    @cached_property
    def area(self) -> np.ndarray:
        """float32 [k]: pixels each concept covers (summed once per image, not once per layer dissected)."""
        return self.coverage.sum(0)


def encode_labels(labels: ImageLabels, table: ConceptTable) -> EncodedLabels:
    sh, sw = labels.shape
    pixels = sh * sw
    maps = [m if m.shape == (sh, sw) else cv2.resize(m, (sw, sh), interpolation=cv2.INTER_NEAREST)
            for m in labels.pixel]
    covered, concepts = np.zeros((pixels, 0), bool), np.zeros(0, np.int64)
    if maps:
        stacked = np.stack(maps).reshape(len(maps), pixels)
        numbers = np.flatnonzero(np.bincount(stacked.ravel()))  # label numbers are small: no sort needed
        slot = np.zeros(numbers[-1] + 1, np.int64)
        slot[numbers] = np.arange(len(numbers))
        flat = (slot[stacked] + len(numbers) * np.arange(pixels)[None, :]).ravel()
        counts = np.bincount(flat, minlength=pixels * len(numbers)).reshape(pixels, len(numbers))
        index = table.lookup(numbers)
        keep = index >= 0
        # a set per concept: two maps repeating a label at a pixel must not count it twice (IoU could pass 1)
        covered, concepts = counts[:, keep] > 0, index[keep]
    scalars = table.lookup(np.unique(np.asarray(labels.image_level, np.int64)))
    scalars = scalars[scalars >= 0]
    in_maps = ~np.isin(concepts, scalars)  # an image-level label covers the image whatever its maps say
    concepts = np.concatenate([concepts[in_maps], scalars]).astype(np.int64)
    coverage = np.concatenate([covered[:, in_maps], np.ones((pixels, len(scalars)), bool)], axis=1)
    present = np.zeros(len(table.category_names), bool)
    present[table.category_index[concepts]] = True
    return EncodedLabels((sh, sw), concepts, coverage.astype(np.float32), present)


class ConceptImages(torch.utils.data.Dataset):
    """Broden images as uint8 [3, size, size] (resized, not cropped), with encoded labels when a table is given."""

    def __init__(self, broden: BrodenDataset, size: int, table: ConceptTable | None = None,
                 cache: dict | None = None):
        self.broden, self.size, self.table, self.cache = broden, size, table, cache

    def __len__(self) -> int:
        return len(self.broden)

    def __getitem__(self, i: int):
        image = self.cache.get(i) if self.cache is not None else None
        if image is None:
            image = self._decoded(i)
            if self.cache is not None:
                self.cache[i] = image
        return image, (encode_labels(self.broden.labels(i), self.table) if self.table is not None else None)

    def _decoded(self, i: int) -> torch.Tensor:
        rgb = self.broden.image(i)
        if rgb.shape[:2] != (self.size, self.size):
            shrink = min(rgb.shape[:2]) > self.size
            rgb = cv2.resize(rgb, (self.size, self.size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def _collate(items):
    return torch.stack([image for image, _ in items]), [labels for _, labels in items]


@dataclass
class ConceptSource:
    """Where concept images come from and how they enter the network."""

    broden: BrodenDataset
    preprocess: object  # compute.models.registry.Preprocess
    device: torch.device
    batch_size: int = 64
    workers: int = 0
    # Decoded images kept from the first pass for the second, where the whole set fits in ``cache_bytes`` and no
    # worker processes load them (theirs would not outlive the pass): SynthScenes' 9,600 images, 118 MB, saved
    # 1.5 s of decoding; Broden's 63,305 at 224 px would be 9.5 GB and are decoded twice.
    cache_bytes: int = CACHE_BYTES
    _cache: dict = field(default_factory=dict, repr=False, init=False, compare=False)

    @property
    def batch_count(self) -> int:
        return (len(self.broden) + self.batch_size - 1) // self.batch_size

    def maps(self, sequence, steps: list[str], table: ConceptTable | None, desc: str, batches=None):
        """Yield ({step: activation maps [B, units, h, w] float}, encoded labels or Nones) over the concept set's
        batches (default: all of them). One forward pass per batch serves every step: the images are read, decoded
        and run through the network's prefix once however many layers are dissected."""
        fits = len(self.broden) * 3 * self.preprocess.crop ** 2 <= self.cache_bytes
        data = ConceptImages(self.broden, self.preprocess.crop, table,
                             self._cache if fits and self.workers == 0 else None)
        if batches is not None:  # whole batches: the selected images fall into the same batches as in a full pass
            start = np.asarray(batches, np.int64)[:, None] * self.batch_size
            images = (start + np.arange(self.batch_size)[None, :]).ravel()
            data = torch.utils.data.Subset(data, images[images < len(data)].tolist())
        loader = torch.utils.data.DataLoader(data, batch_size=self.batch_size, num_workers=self.workers,
                                             collate_fn=_collate)
        with tqdm(total=len(data), desc=desc, unit="img", leave=False) as bar:
            for images, labels in loader:
                outputs = run_to(sequence, self.preprocess.normalise(images, self.device), list(steps))
                bar.update(len(images))
                yield {step: outputs[step].float() for step in steps}, labels


def threshold_states(sequence, steps: list[str], source: ConceptSource, quantile: float,
                     batches=None) -> dict[str, dict]:
    """Per step, the bounded tail per unit of these batches' activations (TopQuantile.state), to merge into the
    thresholds; one pass over the images for all the steps."""
    sketches: dict[str, TopQuantile] = {}
    for maps, _ in source.maps(sequence, steps, None, desc=f"thresholds {', '.join(steps)}", batches=batches):
        for step, acts in maps.items():
            b, units, h, w = acts.shape
            if step not in sketches:
                sketches[step] = TopQuantile(units, len(source.broden) * h * w, quantile, acts.device)
            sketches[step].update(acts.transpose(0, 1).reshape(units, b * h * w))
    return {step: {"total": np.array(sketches[step].total), **sketches[step].state()} if step in sketches
            else {"seen": np.array(0)} for step in steps}


def threshold_state(sequence, step: str, source: ConceptSource, quantile: float, batches=None) -> dict:
    """``threshold_states`` of one step."""
    return threshold_states(sequence, [step], source, quantile, batches)[step]


def merge_thresholds(states: list[dict], quantile: float) -> np.ndarray:
    """T_u from the tails of parts of the concept set that together cover it (parts without images add nothing)."""
    states = [state for state in states if int(state["seen"])]
    sketch = TopQuantile(states[0]["top"].shape[0], int(states[0]["total"]), quantile)
    for state in states:
        sketch.merge(state["top"], int(state["seen"]))
    return sketch.result()


def concept_thresholds(sequence, step: str, source: ConceptSource, quantile: float) -> np.ndarray:
    """T_u per unit: numpy.quantile over all positions of all concept images at 1 - quantile (exact, see quantiles)."""
    return merge_thresholds([threshold_state(sequence, step, source, quantile)], quantile)


class IoUTally:
    """Running sums over images: |M_u & L_c|, |L_c|, and per category the active area |A_g| that the union rule
    counts (module docstring)."""

    def __init__(self, units: int, table: ConceptTable, device=None, union_rule: str = UNION_RULES[0]):
        if union_rule not in UNION_RULES:
            raise ValueError(f"union rule {union_rule!r} is not one of {', '.join(UNION_RULES)}")
        self.table, self.union_rule = table, union_rule
        self.intersection = torch.zeros(units, len(table), dtype=torch.float64, device=device)
        self.label_area = np.zeros(len(table), np.float64)
        self.active_area = torch.zeros(units, len(table.category_names), dtype=torch.float64, device=device)
        self.images = 0

    def update(self, acts: torch.Tensor, thresholds: torch.Tensor, labels: list[EncodedLabels]) -> None:
        """Tally a batch of maps ``acts`` [B, units, h, w] whose images share one segmentation size.

        Only (image, unit) pairs whose map exceeds the threshold somewhere are upsampled: a bilinear upsampling never
        exceeds its input's maximum, so the others have no active pixel, and at the top 0.5% they are most pairs.
        """
        device = acts.device
        shape = labels[0].shape
        hit = acts.amax((2, 3)) > thresholds[None, :]
        image, unit = hit.nonzero(as_tuple=True)  # sorted by image
        upsampled = F.interpolate(acts[image, unit][:, None], size=shape, mode="bilinear", align_corners=False)
        active = (upsampled[:, 0] > thresholds[unit][:, None, None]).flatten(1).float()  # [pairs, pixels]
        area = active.sum(1).double()
        if self.union_rule == "image":
            present = torch.from_numpy(np.stack([item.present for item in labels])).to(device, torch.float64)
            self.active_area.index_put_((unit,), area[:, None] * present[image], accumulate=True)
        per_image = hit.sum(1).tolist()
        for item, rows, units, areas in zip(labels, active.split(per_image), unit.split(per_image),
                                            area.split(per_image)):
            self.label_area += np.bincount(item.concepts, weights=item.area, minlength=len(self.table))
            if len(units) and len(item.concepts):
                overlap = rows @ torch.from_numpy(item.coverage).to(device)  # exact pixel counts (< 2^24)
                concepts = torch.from_numpy(item.concepts).to(device)
                self.intersection.index_put_((units[:, None], concepts[None, :]), overlap.double(), accumulate=True)
                if self.union_rule == "pixel":
                    touched = self._touched(overlap, item)
                    self.active_area.index_put_((units,), areas[:, None] * touched, accumulate=True)
        self.images += len(labels)

    def _touched(self, overlap: torch.Tensor, item: EncodedLabels) -> torch.Tensor:
        """[pairs, categories] 1 where the unit's active pixels meet some concept of the category, else 0."""
        category = torch.from_numpy(self.table.category_index[item.concepts]).to(overlap.device)
        met = torch.zeros(overlap.shape[0], len(self.table.category_names), dtype=torch.float64,
                          device=overlap.device)
        met.index_add_(1, category, (overlap > 0).double())
        return (met > 0).double()

    def state(self) -> dict:
        """The running sums as numpy arrays: whole numbers, so tallies of parts add up exactly (``merge``)."""
        return {"intersection": self.intersection.cpu().numpy(), "label_area": self.label_area,
                "active_area": self.active_area.cpu().numpy(), "images": np.array(self.images)}

    def merge(self, state: dict) -> None:
        """Add the tally of another part of the concept set."""
        self.intersection += torch.from_numpy(state["intersection"]).to(self.intersection.device)
        self.label_area += state["label_area"]
        self.active_area += torch.from_numpy(state["active_area"]).to(self.active_area.device)
        self.images += int(state["images"])

    def iou(self) -> np.ndarray:
        """IoU [units, concepts] (0 where the union is empty)."""
        intersection = self.intersection.cpu().numpy()
        active = self.active_area.cpu().numpy()[:, self.table.category_index]
        union = active + self.label_area[None, :] - intersection
        return np.divide(intersection, union, out=np.zeros_like(intersection), where=union > 0)


def _groups_by_shape(labels: list[EncodedLabels]) -> dict[tuple[int, int], list[int]]:
    groups = defaultdict(list)
    for i, item in enumerate(labels):
        groups[item.shape].append(i)
    return groups


def tally_ious(sequence, thresholds: dict[str, np.ndarray], source: ConceptSource, table: ConceptTable,
               batches=None, union_rule: str = UNION_RULES[0]) -> dict[str, IoUTally]:
    """Per step (the keys of ``thresholds``), binarise each upsampled map at its unit's threshold and count overlaps
    with every concept (over the given batches, default all); one pass over the images for all the steps."""
    tallies = {step: IoUTally(len(limit), table, source.device, union_rule) for step, limit in thresholds.items()}
    limits = {step: torch.as_tensor(limit, dtype=torch.float32, device=source.device)
              for step, limit in thresholds.items()}
    for maps, labels in source.maps(sequence, list(thresholds), table, desc=f"IoU {', '.join(thresholds)}",
                                    batches=batches):
        groups = [(members, [labels[i] for i in members]) for members in _groups_by_shape(labels).values()]
        for step, acts in maps.items():
            for members, group in groups:
                tallies[step].update(acts[members], limits[step], group)
    return tallies


def tally_iou(sequence, step: str, source: ConceptSource, table: ConceptTable, thresholds: np.ndarray,
              batches=None, union_rule: str = UNION_RULES[0]) -> IoUTally:
    """``tally_ious`` of one step."""
    return tally_ious(sequence, {step: thresholds}, source, table, batches, union_rule)[step]


def merge_tallies(states: list[dict], table: ConceptTable, union_rule: str = UNION_RULES[0]) -> IoUTally:
    """The tally of the whole from those of its parts (all counted under ``union_rule``)."""
    tally = IoUTally(states[0]["intersection"].shape[0], table, union_rule=union_rule)
    for state in states:
        tally.merge(state)
    return tally


@dataclass
class Dissection:
    thresholds: np.ndarray  # float64 [units]
    iou: np.ndarray  # float64 [units, concepts]
    table: ConceptTable
    images: int
    union_rule: str


def dissect(sequence, step: str, source: ConceptSource, quantile: float = 0.005,
            union_rule: str = UNION_RULES[0]) -> Dissection:
    """Both passes over the concept set: thresholds first, then the IoU tally at those thresholds."""
    table = ConceptTable.from_broden(source.broden)
    thresholds = concept_thresholds(sequence, step, source, quantile)
    tally = tally_iou(sequence, step, source, table, thresholds, union_rule=union_rule)
    return Dissection(thresholds, tally.iou(), table, tally.images, union_rule)


def best_concepts(iou: np.ndarray, category_index: np.ndarray, categories: int) -> dict[str, np.ndarray]:
    """The best concept of each unit overall and within each category (index -1, IoU 0 for an empty category)."""
    rows = np.arange(iou.shape[0])
    best = iou.argmax(1)
    by_category = np.full((iou.shape[0], categories), -1, np.int64)
    by_category_iou = np.zeros((iou.shape[0], categories), np.float32)
    for k in range(categories):
        columns = np.flatnonzero(category_index == k)
        if columns.size:
            chosen = columns[iou[:, columns].argmax(1)]
            by_category[:, k] = chosen
            by_category_iou[:, k] = iou[rows, chosen]
    return {"best_concept": best.astype(np.int64), "best_iou": iou[rows, best].astype(np.float32),
            "best_by_category": by_category, "best_by_category_iou": by_category_iou}
