"""Reduced precision with a proof (compute.lib.reduced): the bfloat16 product's error bound holds, rows decided in
bfloat16 equal the definition (the unit zeroed, the whole network run, ``ties.predict``), ties never are."""

import pytest
import torch
from torch import nn

from compute.lib import reduced as reduced_module
from compute.lib.engine import AblationEngine, single_unit_masks
from compute.lib.reduced import ReducedStep
from compute.lib.sequence import run_to, tail_of
from tests.test_certified import assert_directions_equal_projection, trained_like, zeroed_predictions
from tests.test_engine import random_rotation


def exact_and_reduced(step: ReducedStep, change: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W d in float64 (no bias) and the bfloat16 product of the rounded change, as float64."""
    weight = step.step.weight.detach().double()
    if isinstance(step.step, nn.Linear):
        exact = change.double() @ weight.T
    else:
        exact = nn.functional.conv2d(change.double(), weight, None, step.step.stride, step.step.padding)
    return exact, step._product(change.to(torch.bfloat16)).double()


@pytest.mark.parametrize("kind", ["conv", "linear"])
def test_error_bound_holds(kind):
    """||bf16 product - W d|| <= coefficient * ||d|| on every row: dense, sparse, wide-ranging and tiny changes, weights
    spanning four orders of magnitude; and some row uses a fair share of its bound (the check is not vacuous)."""
    generator = torch.Generator().manual_seed(0)
    if kind == "conv":
        first, after = torch.rand(1, 24, 8, 8), nn.Sequential(nn.Conv2d(24, 32, 3, padding=1), nn.ReLU(),
                                                               nn.Flatten(), nn.Linear(32 * 64, 5))
    else:
        first, after = torch.rand(1, 300), nn.Sequential(nn.Linear(300, 64), nn.ReLU(), nn.Linear(64, 5))
    with torch.no_grad():
        weight = after[0].weight
        weight.copy_(torch.randn(weight.shape, generator=generator)
                     * 10.0 ** torch.randint(-2, 2, weight.shape, generator=generator))
    step = ReducedStep.of(after, first)
    rows = torch.randn(64, *first.shape[1:], generator=generator)
    rows[16:32] *= torch.rand(rows[16:32].shape, generator=generator) < 0.05  # sparse, like one unit's change
    rows[32:48] *= 10.0 ** torch.randint(-6, 6, rows[32:48].shape, generator=generator)  # wide-ranging
    rows[48:] *= 1e-30  # near the denormals
    exact, computed = exact_and_reduced(step, rows)
    error = (computed - exact).flatten(1).norm(dim=1)
    bound = step.coefficient * rows.double().flatten(1).norm(dim=1) + reduced_module._DENORMALS
    assert (error <= bound).all()
    assert float((error / bound).max()) > 0.02


@pytest.mark.parametrize("step", ["relu3", "relu4", "relu5"])
def test_reduced_rows_equal_naive(step):
    """Every unit of each layer (conv3 rows: conv5 in bfloat16; conv4 rows: fc6; conv5 rows: fc7), reduced
    precision forced on: the predictions are the definition's, and rows were decided in bfloat16."""
    model, images = trained_like()
    acts = run_to(model, images, [step])[step]
    labels = tail_of(model, step)(acts).argmax(1)
    engine = AblationEngine(tail_of(model, step), reduced_precision=True)
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]), probabilities=False)
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, step, unit, images)), f"unit {unit}"
    assert engine.rows_reduced > 0


def test_reduced_directions_equal_projection():
    """Directions at relu5 (a max pool follows: whole rows, fc6 in bfloat16) equal the projection run plainly."""
    model, images = trained_like()
    tail = tail_of(model, "relu5")
    acts = run_to(model, images, ["relu5"])["relu5"]
    labels = tail(acts).argmax(1)
    engine = AblationEngine(tail, reduced_precision=True)
    assert_directions_equal_projection(engine, tail, acts, labels, random_rotation(acts.shape[1], 2), every=3)
    assert engine.rows_reduced > 0


def test_ties_are_never_decided_in_bfloat16():
    """Classes 0 and 1 with equal rows in the last layer tie on every image: no row predicted either is proven in
    bfloat16 (its margin is 0), and the engine gives the lower index, as the reference does."""
    model, images = trained_like()
    with torch.no_grad():
        model.fc8.weight[1] = model.fc8.weight[0]
        model.fc8.bias[1] = model.fc8.bias[0]
    acts = run_to(model, images, ["relu3"])["relu3"]
    tail = tail_of(model, "relu3")
    labels = tail(acts).argmax(1)
    engine = AblationEngine(tail, reduced_precision=True)
    seen = []
    original = ReducedStep.bind

    def spying_bind(self, first, margin_tol):
        decide = original(self, first, margin_tol)

        def spy(images, state, sizes=None, change=None):
            pred, proven = decide(images, state, sizes, change)
            seen.append((pred, proven))
            return pred, proven
        return spy

    ReducedStep.bind = spying_bind
    try:
        outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]), probabilities=False)
    finally:
        ReducedStep.bind = original
    pred = torch.cat([p for p, _ in seen])
    proven = torch.cat([q for _, q in seen])
    assert (pred <= 1).any() and not proven[pred <= 1].any()
    assert proven.any()
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, "relu3", unit, images)), f"unit {unit}"
    assert (outcome.pred != 1).all()  # tied with 0, so never chosen


def test_automatic_choice(monkeypatch):
    """Automatic mode: not where bfloat16 is not faster; a step with little work per row (the demo's fc7, 65 k
    multiply-adds) is never timed faster."""
    model, images = trained_like()
    acts = run_to(model, images, ["relu3"])["relu3"]
    labels = tail_of(model, "relu3")(acts).argmax(1)
    masks = single_unit_masks(acts.shape[1])
    monkeypatch.setattr(ReducedStep, "faster", lambda self, example: False)
    engine = AblationEngine(tail_of(model, "relu3"))
    engine.evaluate_units(acts, labels, masks, probabilities=False)
    assert engine.rows_reduced == 0
    monkeypatch.setattr(ReducedStep, "faster", lambda self, example: True)
    engine.evaluate_units(acts, labels, masks, probabilities=False)
    assert engine.rows_reduced > 0
    monkeypatch.undo()
    fc7 = nn.Sequential(*list(tail_of(model, "relu5").children())[-4:])  # drop7, fc7, relu7, fc8
    assert isinstance(fc7[1], nn.Linear) and not ReducedStep.of(fc7, torch.rand(1, 256)).faster(torch.rand(1, 256))


def test_automatic_mode_pauses_and_probes(monkeypatch):
    """Automatic mode: after a piece that proves fewer than half its rows, reduced precision pauses; a probe tries it
    again after ``_PROBE_EVERY`` pieces, after twice as many once a probe fails (up to ``_PROBE_EVERY_MOST``), across
    calls; a probe that proves enough ends the pause. The rows left run in float32, and every prediction is the
    definition's."""
    from compute.lib import engine as engine_module

    model, images = trained_like()
    acts = run_to(model, images, ["relu3"])["relu3"]
    labels = tail_of(model, "relu3")(acts).argmax(1)
    monkeypatch.setattr(ReducedStep, "faster", lambda self, example: True)
    monkeypatch.setattr(engine_module, "_REDUCED_PIECE", 20)
    row_bytes = model.conv4.out_channels * 8 * 8 * 4  # a conv3 row's state: relu4's output
    monkeypatch.setattr(engine_module, "_PIECE_BYTES", 20 * row_bytes)  # paused pieces of 20 rows too
    proving = {"on": False}
    original = ReducedStep.bind

    def proving_when_asked(self, first, margin_tol):
        decide = original(self, first, margin_tol)

        def maybe_none_proven(images, state, sizes=None, change=None):
            pred, proven = decide(images, state, sizes, change)
            return pred, (proven if proving["on"] else torch.zeros_like(proven))
        return maybe_none_proven

    monkeypatch.setattr(ReducedStep, "bind", proving_when_asked)
    engine = AblationEngine(tail_of(model, "relu3"))
    paces, events = [], []  # each piece's pace; and each pace and each share proved, in order
    pace, count = engine._reduce_next, engine._count_reduced

    def paced(key):
        paces.append(pace(key))
        events.append(("pace", paces[-1]))
        return paces[-1]

    def counted(key, pred, proven):
        events.append(("share", float(proven.float().mean())))
        return count(key, pred, proven)

    monkeypatch.setattr(engine, "_reduce_next", paced)
    monkeypatch.setattr(engine, "_count_reduced", counted)
    masks = single_unit_masks(acts.shape[1])
    outcome = engine.evaluate_units(acts, labels, masks, probabilities=False)
    probes, gap = [0], engine_module._PROBE_EVERY  # the first piece, then the probes
    while probes[-1] < 10 * len(paces):
        probes.append(probes[-1] + gap)
        gap = min(2 * gap, engine_module._PROBE_EVERY_MOST)
    assert len(paces) > 3 * engine_module._PROBE_EVERY and engine.rows_reduced == 0
    assert paces == [at in probes for at in range(len(paces))]
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, "relu3", unit, images)), f"unit {unit}"

    proving["on"], first_call, first_event = True, len(paces), len(events)
    outcome = engine.evaluate_units(acts, labels, masks, probabilities=False)
    probe = first_call + paces[first_call:].index(True)
    assert probe in probes and paces[:probe] == [at in probes for at in range(probe)]  # the pause went on, to a probe
    assert engine.rows_reduced > 0
    later = events[first_event:]
    for at, (kind, value) in enumerate(later[:-1]):
        if kind == "share":  # the next piece runs the step if this one proved at least half, else it pauses
            assert later[at + 1] == ("pace", value >= engine_module._LEAST_PROVEN_SHARE)
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, "relu3", unit, images)), f"unit {unit}"
