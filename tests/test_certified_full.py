"""Certified full rows: where no shortcut applies (a max pool right after the layer, for directions; or shortcuts off),
the whole tail's certificate settles rows from the ablation's size alone, before their edited activation is formed
(``compute.lib.certificates.Certificate.settled``). Whatever is settled, every prediction must equal
``compute.lib.ties.predict`` of the tail on the edited activation.
"""

import pytest
import torch
from torch import nn

from compute.lib import ties
from compute.lib.engine import AblationEngine, _direction_change, single_unit_masks
from compute.lib.sequence import run_to, tail_of
from tests.test_certified import random_demo, trained_demo, trained_like, zeroed_predictions
from tests.test_engine import random_rotation


def pooled_tail(bias: float):
    """2x2 max pool -> Flatten -> Linear (identity) -> ReLU -> head z = (h_0 + bias, 0): a max pool first, so
    directions have no shortcut; the Lipschitz product is 1 and ||w_0 - w_1|| = 1, and removing unit 0 (a single
    positive value x) moves the margin x + bias by exactly x: the bound is attained."""
    tail = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        tail[2].weight.copy_(torch.eye(2))
        tail[2].bias.zero_()
        tail[4].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
        tail[4].bias.copy_(torch.tensor([bias, 0.0]))
    return tail.eval()


def edited_by_direction(acts, q, j):
    qj = q[:, j]
    return acts - qj[None, :, None, None] * torch.einsum("bchw,c->bhw", acts, qj)[:, None]


def quiet_rotation(acts: torch.Tensor) -> torch.Tensor:
    """An orthogonal basis of the channel space from the activations' second moments, loudest first: removing the
    last directions changes almost nothing (certified), removing the first changes the most (computed)."""
    flat = acts.double().transpose(0, 1).flatten(1)
    return torch.linalg.eigh(flat @ flat.T)[1].flip(1).float()


@pytest.mark.parametrize("bias, flips", [(0.01, False), (-0.01, True)])
@pytest.mark.parametrize("kind", ["units", "directions"])
def test_rows_at_the_bound(bias, flips, kind):
    """Unit 0 holds x at one position, x from 0.1 to 20; removing it moves the margin x + bias by exactly x, the bound.
    Bias +0.01: class 0 stays, with margin 0.01; the bound proves it only while x is small against the band
    (margin_tol times the largest logit), larger x run the tail. Bias -0.01: the image flips to class 1, and no row
    may be certified."""
    x = torch.logspace(-1, 1.3, 40)
    acts = torch.zeros(len(x), 2, 2, 2)
    acts[:, 0, 1, 0] = x
    acts[:, 1, 0, 1] = 0.5
    tail = pooled_tail(bias)
    labels = torch.zeros(len(x), dtype=torch.long)
    engine = AblationEngine(tail, use_shortcuts=kind == "directions")
    if kind == "units":
        outcome = engine.evaluate_units(acts, labels, single_unit_masks(2)[:1], probabilities=False)
        edited = acts * torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)
    else:
        q = torch.eye(2)  # the directions are the units, through the direction path (no shortcut after a max pool)
        outcome = engine.evaluate_directions(acts, labels, q, torch.arange(1), probabilities=False)
        edited = edited_by_direction(acts, q, 0)
    assert torch.equal(outcome.pred[0], ties.predict(tail, edited))
    assert (outcome.pred[0] == int(flips)).all()
    assert engine.rows_certified + engine.rows_computed == len(x)
    if flips:
        assert engine.rows_certified == 0
    else:
        assert 0 < engine.rows_certified < len(x)


@pytest.mark.parametrize("kind", ["units", "directions"])
def test_a_change_the_max_pool_hides(kind):
    """Unit 1 holds 0 and -100 three times in its window: removing it moves the activation by 173, far beyond any
    image's radius, yet the max pool's output does not move. Such rows are certified after the pool, unit 0's
    (x = 50, which flips the image: logits (50 - 1, 0) become (-1, 0)) run the tail."""
    acts = torch.zeros(3, 2, 2, 2)
    acts[:, 0, 0, 0] = 50.0
    acts[:, 1] = torch.tensor([[0.0, -100.0], [-100.0, -100.0]])
    tail = pooled_tail(-1.0)
    labels = torch.zeros(3, dtype=torch.long)
    engine = AblationEngine(tail, use_shortcuts=kind == "directions")
    q = torch.eye(2)
    if kind == "units":
        outcome = engine.evaluate_units(acts, labels, single_unit_masks(2), probabilities=False)
    else:
        outcome = engine.evaluate_directions(acts, labels, q, torch.arange(2), probabilities=False)
    assert outcome.pred.tolist() == [[1, 1, 1], [0, 0, 0]]
    for j in range(2):
        assert torch.equal(outcome.pred[j], ties.predict(tail, edited_by_direction(acts, q, j)))
    assert (engine.rows_certified, engine.rows_computed) == (3, 3)


def test_direction_change_bounds_the_float32_edit():
    """The bound on ||a' - a|| holds for the edit as float32 computes it, also where the image's activation is large
    and the coefficients tiny (the rounding of the difference then dominates the change)."""
    generator = torch.Generator().manual_seed(5)
    acts = torch.rand(6, 16, 5, 5, generator=generator) * torch.logspace(-3, 4, 6).view(-1, 1, 1, 1)
    q = random_rotation(16, 3)
    q[:, :4] = quiet_rotation(acts)[:, -4:]  # the quietest directions of these activations
    q[:, :4] = torch.linalg.qr(q.double())[0][:, :4].float()
    coeff = torch.einsum("bchw,cs->bshw", acts, q)
    bound = _direction_change(acts, q, coeff)  # [S, B]
    for j in range(16):
        edited = acts - torch.einsum("c,bhw->bchw", q[:, j], coeff[:, j])
        actual = (edited.double() - acts.double()).flatten(1).norm(dim=1)
        assert (actual <= bound[j]).all(), f"direction {j}"
        assert (bound[j] <= actual * (1 + 1e-4) + 2 ** -23 * acts.double().flatten(1).norm(dim=1)).all()


def naive_directions(tail, acts, q):
    return torch.stack([ties.predict(tail, edited_by_direction(acts, q, j)) for j in range(q.shape[1])])


@pytest.mark.parametrize("make", [trained_like, random_demo, trained_demo])
@pytest.mark.parametrize("step", ["relu3", "relu5"])
def test_full_rows_equal_naive(make, step, request):
    """Units with shortcuts off, directions (a random and a quiet rotation) at relu5 (max pool next: full rows) and
    at relu3 with shortcuts off: every prediction equals the naive one."""
    model, images = make(request.getfixturevalue("tiny_run")) if make is trained_demo else make()
    acts = run_to(model, images, [step])[step]
    tail = tail_of(model, step)
    labels = tail(acts).argmax(1)
    engine = AblationEngine(tail, max_memory=300_000, use_shortcuts=False)
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]), probabilities=False)
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, step, unit, images)), f"unit {unit}"
    certified = engine.rows_certified
    engine = AblationEngine(tail, max_memory=300_000, use_shortcuts=step != "relu3")
    assert engine.entry is None or not engine.pool_is_linear  # directions run the whole tail
    for q in (random_rotation(acts.shape[1], 4), quiet_rotation(acts)):
        outcome = engine.evaluate_directions(acts, labels, q, torch.arange(acts.shape[1]), probabilities=False)
        assert torch.equal(outcome.pred, naive_directions(tail, acts, q))
        certified += engine.rows_certified
    if make is trained_like:
        assert certified > 0


def test_trained_demo_conv5_directions_certified(tiny_run):
    """On the trained demo's conv5, a max pool follows: some direction rows are certified without running the tail,
    the others computed, and the predictions are the naive ones."""
    model, images = trained_demo(tiny_run)
    acts = run_to(model, images, ["relu5"])["relu5"]
    tail = tail_of(model, "relu5")
    labels = tail(acts).argmax(1)
    engine = AblationEngine(tail)
    q = quiet_rotation(acts)
    outcome = engine.evaluate_directions(acts, labels, q, torch.arange(acts.shape[1]), probabilities=False)
    assert torch.equal(outcome.pred, naive_directions(tail, acts, q))
    assert engine.rows_certified > 0 and engine.rows_computed > 0
    changed = int(torch.einsum("bchw,cs->bshw", acts, q).flatten(2).ne(0).any(-1).sum())
    assert engine.rows_certified + engine.rows_computed == changed
