"""Certified skipping: the bound against its formula, rows certified and not, and predictions equal to the naive ones.

A row is certified when its baseline margins exceed a proven bound on how far the ablation moves them
(``compute.lib.certificates.Certificate``); the tail then does not run for it. Whatever is certified, every
prediction must equal ``compute.lib.ties.predict`` of the whole network with the unit zeroed.
"""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from compute.lib import ties
from compute.lib.certificates import Certificate, channel_norms, conv_norm, lipschitz_bound, windows_per_input
from compute.lib.engine import AblationEngine, single_unit_masks
from compute.models.demo import build_demo
from compute.lib.sequence import run_to, tail_of
from tests.test_engine import lively, random_rotation


def linear_tail(head_bias=(10.0, 0.0)):
    """Flatten -> Linear (the entry) -> ReLU -> Linear -> ReLU -> Linear (the head), all weights the 2x2 identity;
    the ReLUs work in place, as AlexNet's do."""
    tail = nn.Sequential(nn.Flatten(), nn.Linear(2, 2), nn.ReLU(inplace=True), nn.Linear(2, 2), nn.ReLU(inplace=True),
                         nn.Linear(2, 2))
    with torch.no_grad():
        for layer in (tail[1], tail[3], tail[5]):
            layer.weight.copy_(torch.eye(2))
            layer.bias.zero_()
        tail[5].bias.copy_(torch.tensor(head_bias))
    return tail.eval()


def test_radius_is_the_formula():
    """Image [1, 1]: logits [11, 1], top 0, margin 10, ||w_0 - w_1|| = sqrt 2, largest |logit| 11, row norms 1."""
    tail = linear_tail()
    certificate = Certificate.of(tail[2:], torch.ones(1, 2))
    assert certificate.lipschitz == pytest.approx(1.0, rel=1e-5) and certificate.lipschitz >= 1.0
    tol = 1e-3
    radius = certificate.radius(torch.tensor([[11.0, 1.0]]), torch.tensor([0]), tol)
    expected = min((10 - tol * 11) / (math.sqrt(2) + tol), (10 - tol) / math.sqrt(2))
    assert float(radius) == pytest.approx(expected, rel=1e-5)
    # A baseline decided otherwise (a near-tie settled for another class) gets no radius.
    assert float(certificate.radius(torch.tensor([[11.0, 1.0]]), torch.tensor([1]), tol)) == -math.inf


def test_radius_is_the_largest_safe_change():
    """On random heads, the radius is where the bound's condition stops holding for some class."""
    torch.manual_seed(0)
    head = nn.Linear(7, 5)
    generator = torch.Generator().manual_seed(0)
    certificate = Certificate(nn.Sequential(), nn.Sequential(head), 1.7, head)
    logits = torch.randn(32, 5, generator=generator) * 4
    base = logits.argmax(1)
    radius = certificate.radius(logits, base, 1e-3).double()
    weight = head.weight.detach().double()
    distances, rows = torch.cdist(weight, weight), weight.norm(dim=1).max()
    z = logits.double()

    def holds(t):  # every class j: margin less the bound stays above the near-tie band
        margin = z.max(1, keepdim=True).values - z
        band = 1e-3 * torch.clamp(z.abs().max(1, keepdim=True).values + rows * t[:, None], min=1)
        ok = (margin - distances[base] * t[:, None] > band) | (torch.arange(5) == base[:, None])
        return ok.all(1)

    inside, outside = radius.clamp_min(0) * 1.7 * (1 - 1e-4), radius.clamp_min(0) * 1.7 * (1 + 1e-4)
    assert holds(inside)[radius > 0].all()
    assert not holds(outside)[radius > 0].any()
    assert not holds(torch.zeros(32, dtype=torch.float64))[radius <= 0].any()


def test_one_row_certified_one_not():
    """Image 0 (logits [11, 1]) keeps class 0 for either unit ablated: certified. Image 1 (logits [11, 12], margin
    1 < sqrt 2): computed; ablating unit 1 flips it to class 0."""
    acts = torch.tensor([[1.0, 1.0], [1.0, 12.0]]).view(2, 2, 1, 1)
    labels = torch.tensor([0, 1])
    engine = AblationEngine(linear_tail())
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(2), probabilities=False)
    assert outcome.pred.tolist() == [[0, 1], [0, 0]]
    assert outcome.true_prob is None
    assert (engine.rows_certified, engine.rows_computed) == (2, 2)
    with_probabilities = engine.evaluate_units(acts, labels, single_unit_masks(2))
    assert torch.equal(with_probabilities.pred, outcome.pred)
    assert (engine.rows_certified, engine.rows_computed) == (0, 4)  # probabilities need the tail on every row


def test_bound_holds_on_a_conv_tail():
    """Tail relu -> conv -> relu -> 3x3/2 max pool -> flatten -> linear -> relu -> linear: for random and
    gradient-aligned changes d of the first activation, every logit difference moves by at most the bound."""
    torch.manual_seed(1)
    rest = lively(nn.Sequential(nn.ReLU(), nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(3, 2),
                                nn.Flatten(), nn.Linear(8 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5)))
    base = torch.randn(20, 6, 7, 7)
    certificate = Certificate.of(rest, base[:1])
    assert certificate.lipschitz >= conv_norm(rest[1], (7, 7)) * 2 * torch.linalg.matrix_norm(
        rest[5].weight.double(), 2).item() * (1 - 1e-9)  # conv, the overlapping pool's sqrt(4), the linear
    first = certificate.lead(base)
    logits = certificate.after(first)
    top = logits.argmax(1)

    def gaps(z):
        return z.gather(1, top[:, None]) - z

    probe = first.clone().requires_grad_(True)
    gaps(certificate.after(probe)).sum().backward()  # the direction that moves the margins most, locally
    worst = 0.0
    for scale in (1e-3, 1e-1, 1.0, 10.0):
        for change in (torch.randn_like(first), probe.grad):
            change = change * scale / change.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
            with torch.no_grad():
                shift = (gaps(certificate.after(first + change)) - gaps(logits)).abs().double()
            bound = certificate.distances[top] * certificate.lipschitz * scale
            assert (shift <= bound * (1 + 1e-5) + 1e-5).all()
            worst = max(worst, float((shift / bound.clamp_min(1e-12)).max()))
    assert worst > 0.01  # the check is not vacuous: some change moves a margin by a fair share of its bound


def test_the_lead_takes_a_pool():
    """Rest relu -> 3x3/2 max pool -> flatten -> linear -> relu -> linear: the lead is the relu and the pool (the change
    is measured on the pool's output, exactly), so the overlapping pool's factor sqrt 4 is not in the product; every
    margin moves by at most the bound on the change of the pooled activation."""
    torch.manual_seed(4)
    rest = lively(nn.Sequential(nn.ReLU(), nn.MaxPool2d(3, 2), nn.Flatten(), nn.Linear(6 * 3 * 3, 16), nn.ReLU(),
                                nn.Linear(16, 5)))
    base = torch.randn(20, 6, 7, 7)
    certificate = Certificate.of(rest, base[:1])
    assert [type(step) for step in certificate.lead] == [nn.ReLU, nn.MaxPool2d]
    assert certificate.lipschitz == pytest.approx(torch.linalg.matrix_norm(rest[3].weight.double(), 2).item(), rel=1e-5)
    first = certificate.lead(base)
    logits = certificate.after(first)
    top = logits.argmax(1)
    for scale in (1e-2, 1.0, 10.0):
        changed = certificate.lead(base + scale * torch.randn_like(base))
        moved = (changed - first).flatten(1).norm(dim=1).double()
        shift = ((certificate.after(changed) - logits) - (certificate.after(changed) - logits).gather(1, top[:, None]))
        bound = certificate.distances[top] * certificate.lipschitz * moved[:, None]
        assert (shift.abs().double() <= bound * (1 + 1e-5) + 1e-5).all()


@pytest.mark.parametrize("stride, dilation, padding", [(1, 1, 1), (2, 1, 1), (1, 2, 2), (1, 1, 0)])
def test_conv_norm_bounds_the_exact_operator_norm(stride, dilation, padding):
    """The Fourier bound against the exact norm of the convolution's matrix (and above power iteration's estimate,
    which can only approach the norm from below)."""
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 4, 3, stride=stride, padding=padding, dilation=dilation).double()
    size = (6, 5)
    basis = torch.eye(3 * size[0] * size[1], dtype=torch.float64).view(-1, 3, *size)
    matrix = (conv(basis) - conv.bias.view(1, -1, 1, 1)).flatten(1)
    exact = torch.linalg.matrix_norm(matrix, 2).item()
    bound = conv_norm(conv, size)
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    for _ in range(50):  # power iteration on the operator
        y = torch.nn.grad.conv2d_input(x.shape, conv.weight, nn.functional.conv2d(x, conv.weight, None, stride,
                                       padding, dilation), stride, padding, dilation)
        x = y / y.norm()
    estimate = nn.functional.conv2d(x, conv.weight, None, stride, padding, dilation).norm().item()
    assert estimate <= exact * (1 + 1e-9) <= bound
    assert bound < 2.5 * exact


def test_channel_norms_bound_each_channels_map():
    """Per input channel, the norm of the entry restricted to it: a Linear's block of columns exactly (its largest
    singular value), a convolution's at or above the exact norm of its one-input-channel matrix, within 2.5 times."""
    torch.manual_seed(5)
    linear = nn.Linear(4 * 6, 7).double()
    table = linear.weight.view(7, 4, 6).permute(1, 2, 0)  # [channel, positions, out], as the engine orders it
    exact = torch.stack([torch.linalg.matrix_norm(table[c], 2) for c in range(4)])
    norms = channel_norms(linear, table)
    assert torch.allclose(norms, exact, rtol=1e-5) and (norms >= exact).all()
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    size = (5, 6)
    norms = channel_norms(conv, conv.weight.transpose(0, 1), size)
    for c in range(3):
        single = nn.Conv2d(1, 4, 3, padding=1, bias=False).double()
        single.weight.data = conv.weight[:, c:c + 1].detach()
        basis = torch.eye(size[0] * size[1], dtype=torch.float64).view(-1, 1, *size)
        exact = torch.linalg.matrix_norm(single(basis).flatten(1), 2).item()
        assert exact * (1 - 1e-9) <= float(norms[c]) < 2.5 * exact
        assert float(norms[c]) == pytest.approx(conv_norm(single, size), rel=1e-9)


@pytest.mark.parametrize("step", ["relu3", "relu5"])
def test_rows_settled_before_entering_equal_naive(step, monkeypatch):
    """Rows whose removed channels' norms bound the change inside the radius are certified without being entered
    (``_settled_by_size``): some are, and every prediction is still the definition's."""
    model, images = trained_like()
    acts = run_to(model, images, [step])[step]
    labels = tail_of(model, step)(acts).argmax(1)
    engine = AblationEngine(tail_of(model, step), reduced_precision=False)
    seen = []
    original = AblationEngine._settled_by_size
    monkeypatch.setattr(AblationEngine, "_settled_by_size",
                        lambda self, *args: seen.append(original(self, *args)) or seen[-1])
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]), probabilities=False)
    assert seen and int(seen[-1].sum()) > 0
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, step, unit, images)), f"unit {unit}"


@pytest.mark.parametrize("pool, size, windows", [
    (nn.MaxPool2d(3, 2), 13, 4), (nn.MaxPool2d(2), 8, 1), (nn.AdaptiveAvgPool2d(6), 6, 1),
    (nn.AdaptiveAvgPool2d(4), 6, 4), (nn.AvgPool2d(3, 1, 1), 5, 9)])
def test_pool_windows(pool, size, windows):
    x = torch.randn(1, 2, size, size)
    assert windows_per_input(pool, x.shape[-2:], pool(x).shape[-2:]) == windows
    assert lipschitz_bound(pool, x) == pytest.approx(math.sqrt(windows))


def test_no_certificate_without_a_linear_head():
    assert Certificate.of(nn.Sequential(nn.ReLU(), nn.Linear(3, 3), nn.Softmax(1)), torch.ones(1, 3)) is None
    assert Certificate.of(nn.Sequential(nn.GELU(), nn.Linear(3, 3)), torch.ones(1, 3)) is None


# -- agreement with the naive computation ---------------------------------------------------------------------------
def zeroed_predictions(model, step, unit, images):
    """The definition: the unit's channel zeroed at ``step``'s output, the whole network run, ``ties.predict``."""
    acts = run_to(model, images, [step])[step].clone()
    acts[:, unit] = 0
    return ties.predict(tail_of(model, step), acts)


def trained_like():
    """A random demo whose classifier is a nearest-prototype rule on its own fc7 features: images near their class's
    prototype get confident predictions, as a trained network gives its validation images."""
    torch.manual_seed(6)
    model = lively(build_demo(num_classes=6))
    prototypes = torch.randn(6, 3, 64, 64)
    features = run_to(model, prototypes, ["relu7"])["relu7"]
    with torch.no_grad():
        model.fc8.weight.copy_(features)
        model.fc8.bias.copy_(-0.5 * features.pow(2).sum(1))
    images = prototypes.repeat(3, 1, 1, 1) + 0.6 * torch.randn(18, 3, 64, 64)
    return model, images


def random_demo():
    torch.manual_seed(0)
    return lively(build_demo()), torch.randn(12, 3, 64, 64)


def trained_demo(tiny_run):
    """The test session's trained demo (tests/conftest.py: two epochs on tiny SynthScenes), not ./data's."""
    path = Path(tiny_run["data_dir"]) / "weights" / "demo-seed0.pt"
    model = build_demo()
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    torch.manual_seed(3)
    return model.eval(), torch.randn(12, 3, 64, 64) * 0.5


@pytest.mark.parametrize("make", [trained_like, random_demo, trained_demo])
@pytest.mark.parametrize("step", ["relu3", "relu4", "relu5"])
def test_single_units_equal_naive(make, step, request):
    model, images = make(request.getfixturevalue("tiny_run")) if make is trained_demo else make()
    acts = run_to(model, images, [step])[step]
    labels = run_to(model, images, [], run_all=True)["logits"].argmax(1)
    engine = AblationEngine(tail_of(model, step))
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]), probabilities=False)
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], zeroed_predictions(model, step, unit, images)), f"unit {unit}"
    if make is trained_like:
        assert engine.rows_certified > 0 and engine.rows_computed > 0


@pytest.mark.parametrize("step", ["relu3", "relu5"])
def test_sets_and_directions_equal_naive(step):
    model, images = trained_like()
    tail = tail_of(model, step)
    acts = run_to(model, images, [step])[step]
    labels = tail(acts).argmax(1)
    engine = AblationEngine(tail, max_memory=200_000)  # several chunks
    masks = torch.rand(10, acts.shape[1], generator=torch.Generator().manual_seed(1)) < 0.05
    outcome = engine.evaluate_units(acts, labels, masks, probabilities=False)
    for s, mask in enumerate(masks):
        edited = acts * (~mask).float()[None, :, None, None]
        assert torch.equal(outcome.pred[s], ties.predict(tail, edited)), f"set {s}"
    assert_directions_equal_projection(engine, tail, acts, labels, random_rotation(acts.shape[1], 4), every=7)


def assert_directions_equal_projection(engine, tail, acts, labels, q, every: int) -> None:
    """Every ``every``-th direction of ``q`` removed by the engine (predictions only) equals the projection
    a - q_j (q_j^T a) run through the whole tail plainly (``ties.predict``)."""
    directions = torch.arange(0, acts.shape[1], every)
    outcome = engine.evaluate_directions(acts, labels, q, directions, probabilities=False)
    for row, j in enumerate(directions):
        qj = q[:, j]
        edited = acts - qj[None, :, None, None] * torch.einsum("bchw,c->bhw", acts, qj)[:, None]
        assert torch.equal(outcome.pred[row], ties.predict(tail, edited)), f"direction {int(j)}"
