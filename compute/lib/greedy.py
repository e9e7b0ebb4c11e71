"""Greedy unit ablation (the paper's Fig. 4), its random-order baseline, and an honest held-out score.

**Greedy for a class c** (or a group of classes): starting from nothing, repeatedly add the unit whose ablation,
together with the units already chosen, lowers the objective most, for S steps. The objective is the class accuracy
of c; for a group it is the mean of the group's class accuracies. Class accuracy moves in coarse steps (1/50 on the
demo), so many candidates tie: ties are broken by the lowest mean predicted probability of the true class
(``Outcome.true_prob``, averaged per class, then over the group), and remaining ties by the lowest unit index. The
choice is therefore deterministic.

**Random-order baseline**: the same curve for the first S units of a random permutation of the layer's units; seed r
of class k draws its permutation from ``numpy.random.default_rng((r, k))``, so every curve is reproducible alone.

**Honest split**: a greedy order chosen on the same images it is scored on flatters itself (it fits those images'
noise). The stage also chooses an order on the even positions of the class's validation images and scores it on the
odd positions. The in-sample curve is the paper's number; the held-out curve is what the order does on fresh images.

Why it is fast: ablating ``chosen + {u}`` from activations A is ablating ``{u}`` from A with the chosen units already
zeroed. So each greedy step runs the engine's single-unit path on the edited activations, with the previous step's
outcome as the baseline: rows where u is zero on an image keep that prediction without running anything. A step
first asks for predictions alone, so that rows the engine certifies unchanged skip the tail, and computes the
tie-breaking probabilities for the candidates tied at the lowest objective only. Replaying known orders (random
baseline, held-out score, overall accuracy) is one engine call whose masks are the orders' prefixes: the engine
sums each order's single-unit updates along it (a chain), and rows whose ablated units are all zero on the image
are skipped.

Which images each step changes: the overall pass predicts every image at every step of every class's order
(``ablation_paths``), so the images whose prediction changed between step s - 1 and s come with it; they are kept as a
flip table ``layers/<L>/greedy/flips`` (``compute.flips``).

The functions below are plain (engine, activations, labels) in, numbers out: the pipeline stage ``greedy/<layer>``
and the app's live greedy (compute/live_session.py) both use them. Under torchrun the stage shares the classes out
between the ranks: each class's curves depend on that class alone, and the overall counts of a class's order are
whole numbers, so the combined stage is the one-process one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from compute.lib.engine import AblationEngine, Outcome, correct_counts
from compute.errors import UserError

TIE_BREAK = "lowest class accuracy, then lowest mean true-class probability, then lowest unit index"
SPLIT = "order chosen on even positions of the class's images, scored on odd positions"


# -- objective --------------------------------------------------------------------------------------------------
def group_onehot(labels: torch.Tensor, group) -> torch.Tensor:
    """[B, G] float64 indicator of each image's class among the group's classes (0 rows for other classes)."""
    group = torch.as_tensor(list(group), dtype=torch.long, device=labels.device)
    return (labels.view(-1, 1) == group.view(1, -1)).double()


def objective(pred: torch.Tensor, labels: torch.Tensor, onehot: torch.Tensor) -> np.ndarray:
    """Mean class accuracy of the group per ablation [S], from predictions [S, B].

    Correct counts are exact integers, so candidates with the same counts get bit-identical scores and tie.
    """
    return (((pred == labels).double() @ onehot) / onehot.sum(0).clamp_min(1)).mean(1).cpu().numpy()


def score(outcome: Outcome, labels: torch.Tensor, onehot: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Objective and tie-breaker per ablation [S]: mean class accuracy and mean true-class probability of the group."""
    probability = (outcome.true_prob.double() @ onehot) / onehot.sum(0).clamp_min(1)
    return objective(outcome.pred, labels, onehot), probability.mean(1).cpu().numpy()


def pick(scores: np.ndarray, probs: np.ndarray, units: np.ndarray) -> int:
    """Position of the best candidate: lowest score, then lowest probability, then lowest unit index.

    Scores are rounded to 1e-12 so that equal group means reached through different per-class counts tie too.
    """
    return int(np.lexsort((units, probs, np.round(scores, 12)))[0])


# -- greedy ------------------------------------------------------------------------------------------------------
@dataclass
class GreedyState:
    """A greedy run in progress: advance it one unit at a time (the app keeps it between reruns)."""

    acts: torch.Tensor  # [B, C, H, W], the chosen units zeroed
    labels: torch.Tensor  # [B]
    onehot: torch.Tensor  # [B, G]
    base: Outcome  # predictions with the chosen units ablated
    chosen: list[int] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)  # objective after 0, 1, ... units
    probs: list[float] = field(default_factory=list)
    # Whether the engine's certificates skip any rows here (``advance``); set False once a step shows they do not.
    certifies: bool = True

    @property
    def units(self) -> int:
        return int(self.acts.shape[1])


def start(engine: AblationEngine, acts: torch.Tensor, labels: torch.Tensor, group) -> GreedyState:
    """A greedy run over these images (those of the group's classes) with nothing ablated yet."""
    acts = acts.to(engine.device).clone()
    labels = labels.to(engine.device)
    base = engine.baseline(acts, labels)
    onehot = group_onehot(labels, group)
    first, prob = score(Outcome(base.pred[None], base.true_prob[None]), labels, onehot)
    return GreedyState(acts, labels, onehot, base, [], [float(first[0])], [float(prob[0])])


@torch.no_grad()
def advance(engine: AblationEngine, state: GreedyState) -> int:
    """Add the next greedy unit to ``state`` and return it."""
    taken = np.zeros(state.units, bool)
    taken[state.chosen] = True
    candidates = np.flatnonzero(~taken)
    if not len(candidates):
        raise ValueError("every unit of the layer is already ablated")
    masks = torch.zeros(len(candidates), state.units, dtype=torch.bool, device=state.acts.device)
    masks[torch.arange(len(candidates)), torch.as_tensor(candidates)] = True
    tied = np.arange(len(candidates))
    if state.certifies and state.scores[-1] > 0:
        # The objective needs predictions alone, which lets the engine skip the tail on rows it certifies unchanged;
        # the tie-breaking probabilities are then computed for the candidates that tie at the lowest objective only
        # (often one). The choice is the one ``pick`` makes on every candidate's full outcome: the others lose on
        # the objective. Not worth it where nothing is certified (random weights) or where every candidate ties
        # (an objective at 0 cannot fall further).
        low = np.round(objective(engine.evaluate_units(state.acts, state.labels, masks, state.base,
                                                       probabilities=False).pred, state.labels, state.onehot), 12)
        state.certifies = engine.rows_certified > 0
        tied = np.flatnonzero(low == low.min())
        masks = masks[torch.as_tensor(tied, device=masks.device)]
    outcome = engine.evaluate_units(state.acts, state.labels, masks, state.base)
    scores, probs = score(outcome, state.labels, state.onehot)
    best = pick(scores, probs, candidates[tied])
    unit = int(candidates[tied[best]])
    state.acts[:, unit] = 0
    state.base = Outcome(outcome.pred[best], outcome.true_prob[best])
    state.chosen.append(unit)
    state.scores.append(float(scores[best]))
    state.probs.append(float(probs[best]))
    return unit


def greedy(engine: AblationEngine, acts: torch.Tensor, labels: torch.Tensor, group, steps: int) -> GreedyState:
    """The whole greedy run: ``steps`` units, chosen on these images."""
    state = start(engine, acts, labels, group)
    for _ in range(steps):
        advance(engine, state)
    return state


# -- replaying orders ---------------------------------------------------------------------------------------------
def prefix_masks(orders: np.ndarray, units: int) -> torch.Tensor:
    """[R, S+1, C] masks: row s of order r ablates that order's first s units (row 0 ablates nothing)."""
    orders = torch.as_tensor(np.atleast_2d(np.asarray(orders, np.int64)))
    masks = torch.zeros(orders.shape[0], orders.shape[1] + 1, units, dtype=torch.bool)
    masks[:, 1:] = torch.nn.functional.one_hot(orders, units).cumsum(1) > 0
    return masks


@torch.no_grad()
def ablation_paths(engine: AblationEngine, acts: torch.Tensor, labels: torch.Tensor, orders) -> torch.Tensor:
    """Predictions [R, S+1, B] with the first 0, 1, ..., S units of each of the R orders ablated: one engine call."""
    masks = prefix_masks(orders, acts.shape[1])
    if not masks.shape[0]:
        return torch.zeros(masks.shape[:2] + (len(labels),), dtype=torch.long)
    outcome = engine.evaluate_units(acts, labels, masks.flatten(0, 1), probabilities=False)
    return outcome.pred.reshape(masks.shape[0], masks.shape[1], -1)


def random_orders(units: int, steps: int, seeds: int, class_index: int) -> np.ndarray:
    """[R, S] unit orders of the random baseline; seed r of class k uses default_rng((r, k))."""
    rows = [np.random.default_rng((r, int(class_index))).permutation(units)[:steps] for r in range(seeds)]
    return np.array(rows, np.int64).reshape(seeds, steps)


def class_accuracy_paths(engine, acts, labels, orders, class_index: int, num_classes: int) -> np.ndarray:
    """Accuracy of one class after each step of each order, on these images: [R, S+1]."""
    counts = correct_counts(ablation_paths(engine, acts, labels, orders), labels, num_classes)[..., class_index]
    return counts / max(1, int((labels == class_index).sum()))


# -- choosing classes --------------------------------------------------------------------------------------------
def resolve_classes(requested, class_names: list[str]) -> np.ndarray:
    """Class indices from names or index strings (None or empty: all classes), in ascending order."""
    if not requested:
        return np.arange(len(class_names))
    lookup = {name: i for i, name in enumerate(class_names)}
    chosen = set()
    for item in requested:
        text = str(item).strip()
        if text in lookup:
            chosen.add(lookup[text])
        elif text.isdigit() and int(text) < len(class_names):
            chosen.add(int(text))
        else:
            raise UserError(f"unknown class '{text}' in --greedy-classes: use class names (e.g. {class_names[0]}) "
                            f"or indices 0..{len(class_names) - 1}")
    return np.array(sorted(chosen), np.int64)
