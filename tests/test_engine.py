"""The engine's predictions equal the definition: zero the unit (weights and bias, or output) and run the network."""

import pytest
import torch

from compute.lib import engine as engine_module
from compute.lib import ties
from compute.lib.engine import AblationEngine, single_unit_masks
from compute.models.demo import build_demo
from compute.lib.sequence import run_to, tail_of


def lively(model):
    """He-initialise a random network so activations keep their scale and single ablations flip predictions."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                module.bias.uniform_(-0.05, 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def demo_case():
    torch.manual_seed(0)
    model = lively(build_demo())
    images = torch.randn(16, 3, 64, 64)
    with torch.no_grad():
        labels = model(images).argmax(1)
    return model, images, labels


def naive_zero_weights(model, conv_name, unit, images):
    conv = getattr(model, conv_name)
    saved = conv.weight.data[unit].clone(), conv.bias.data[unit].clone()
    conv.weight.data[unit] = 0
    conv.bias.data[unit] = 0
    try:
        return ties.predict(model, images)
    finally:
        conv.weight.data[unit], conv.bias.data[unit] = saved


@pytest.fixture(scope="module")
def demo_naive(demo_case):
    """Per layer, the naive predictions for every unit (computed once for both engine settings)."""
    model, images, _ = demo_case
    cache = {}

    def naive(layer):
        if layer not in cache:
            units = getattr(model, layer).out_channels
            cache[layer] = torch.stack([naive_zero_weights(model, layer, u, images) for u in range(units)])
        return cache[layer]
    return naive


@pytest.mark.parametrize("layer", ["conv3", "conv5"])
@pytest.mark.parametrize("shortcuts", [True, False])
def test_single_unit_equals_zeroed_weights(demo_case, demo_naive, layer, shortcuts):
    model, images, labels = demo_case
    step = "relu" + layer[-1]
    acts = run_to(model, images, [step])[step]
    engine = AblationEngine(tail_of(model, step), use_shortcuts=shortcuts)
    assert engine.has_shortcut == (shortcuts and layer == "conv5")
    assert (engine.entry is not None) == shortcuts  # conv3 -> conv4 is a convolution entry
    outcome = engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1]))
    expected = demo_naive(layer)
    for unit in range(acts.shape[1]):
        assert torch.equal(outcome.pred[unit], expected[unit]), f"unit {unit}"
    assert (expected != labels).any()  # the case is not trivial: some ablations flip predictions


@pytest.mark.parametrize("layer, max_memory", [("relu3", 4_000_000), ("relu5", 100_000)])
def test_chunking_leaves_outcomes_unchanged(demo_case, layer, max_memory):
    """Chunks of a few dozen rows (splitting units' images over chunks) give the outcome of one big chunk."""
    model, images, labels = demo_case
    acts = run_to(model, images, [layer])[layer]
    masks = single_unit_masks(acts.shape[1])[::3]
    whole = AblationEngine(tail_of(model, layer)).evaluate_units(acts, labels, masks)
    small = AblationEngine(tail_of(model, layer), max_memory=max_memory)
    sizes = []
    decide = small._decide
    small._decide = lambda logits, *rest: sizes.append(len(logits)) or decide(logits, *rest)
    chunked = small.evaluate_units(acts, labels, masks)
    assert len(sizes) > 4 and max(sizes) < 200
    assert torch.equal(chunked.pred, whole.pred)
    assert torch.allclose(chunked.true_prob, whole.true_prob, atol=1e-6)


@pytest.mark.parametrize("layer", ["relu3", "relu5"])
def test_unit_sets_equal_zeroed_output(demo_case, layer):
    model, images, labels = demo_case
    acts = run_to(model, images, [layer])[layer]
    generator = torch.Generator().manual_seed(1)
    masks = torch.rand(12, acts.shape[1], generator=generator) < 0.2
    masks[0] = False  # nothing ablated: the baseline
    masks[1] = False
    masks[1, 5] = True  # one unit among sets
    outcome = AblationEngine(tail_of(model, layer), max_memory=4096).evaluate_units(acts, labels, masks)
    for s in range(len(masks)):
        edited = acts * (~masks[s]).float()[None, :, None, None]
        expected = tail_of(model, layer)(edited)
        assert torch.equal(outcome.pred[s], ties.predict(tail_of(model, layer), edited))
        assert torch.allclose(outcome.true_prob[s], torch.softmax(expected, 1)[torch.arange(len(labels)), labels],
                              atol=1e-5)


LAYER_5 = "relu5"


def prefix_chains(orders, units):
    """Masks of the prefixes of each order (row 0 of each: nothing), as greedy's replays pass them."""
    masks = torch.zeros(len(orders), len(orders[0]) + 1, units, dtype=torch.bool)
    for r, order in enumerate(orders):
        for depth in range(1, len(order) + 1):
            masks[r, depth, order[:depth]] = True
    return masks.flatten(0, 1)


def test_chains_are_found_only_where_each_mask_adds_one_unit():
    chains = prefix_chains([[3, 1, 4], [0, 2, 1]], 5)
    added, first = engine_module._chains(chains)
    assert added.tolist() == [-1, 3, 1, 4, -1, 0, 2, 1]
    assert first.tolist() == [0, 0, 0, 0, 4, 4, 4, 4]
    assert engine_module._chains(single_unit_masks(5)) is None  # no empty start
    jump = chains.clone()
    jump[2, 4] = True  # the second step adds two units
    assert engine_module._chains(jump) is None
    swap = chains.clone()
    swap[2] = False
    swap[2, [1, 4]] = True  # as many units as a step adds, but unit 3 dropped
    assert engine_module._chains(swap) is None


@pytest.mark.parametrize("max_memory, chained", [(1 << 30, True), (400_000, True), (30_000, False)])
def test_chained_prefixes_equal_zeroed_output(demo_case, max_memory, chained, monkeypatch):
    """The running sums along unit orders (relu5 -> pool -> fc6) give the predictions of the zeroed activations;
    a budget of 400 kB splits chains across chunks, one of 30 kB cannot hold a chain's sums (the general path runs)."""
    calls = []
    original = engine_module._ChainUpdates.__call__
    monkeypatch.setattr(engine_module._ChainUpdates, "__call__", lambda self, rows: calls.append(len(rows)) or
                        original(self, rows))
    model, images, labels = demo_case
    acts = run_to(model, images, ["relu5"])[LAYER_5]
    generator = torch.Generator().manual_seed(2)
    orders = [torch.randperm(acts.shape[1], generator=generator)[:9].tolist() for _ in range(3)]
    masks = prefix_chains(orders, acts.shape[1])
    engine = AblationEngine(tail_of(model, "relu5"), max_memory=max_memory)
    assert engine_module._chains(masks) is not None and engine.has_shortcut
    outcome = engine.evaluate_units(acts, labels, masks)
    certified = engine.evaluate_units(acts, labels, masks, probabilities=False)
    tail = tail_of(model, "relu5")
    for s in range(len(masks)):
        edited = acts * (~masks[s]).float()[None, :, None, None]
        expected = ties.predict(tail, edited)
        assert torch.equal(outcome.pred[s], expected) and torch.equal(certified.pred[s], expected)
        assert torch.allclose(outcome.true_prob[s], torch.softmax(tail(edited), 1)[torch.arange(len(labels)), labels],
                              atol=1e-5)
    assert bool(calls) == chained and (len(calls) > 2) == (max_memory == 400_000)


def test_batchnorm_variant_zeroes_output_not_weights():
    torch.manual_seed(2)
    model = build_demo(batch_norm=True).eval()
    with torch.no_grad():
        model.bn5.running_mean.zero_()
        model.bn5.bias.uniform_(0.5, 1.0)  # positive shift: zeroing conv5's weights leaves the unit on
    images = torch.randn(8, 3, 64, 64)
    acts = run_to(model, images, ["relu5"])["relu5"]
    labels = torch.zeros(8, dtype=torch.long)
    outcome = AblationEngine(tail_of(model, "relu5")).evaluate_units(acts, labels, single_unit_masks(acts.shape[1]))

    def zero_output(unit):
        handle = model.relu5.register_forward_hook(lambda m, i, out: out.index_fill(1, torch.tensor([unit]), 0.0))
        try:
            with torch.no_grad():
                return model(images).argmax(1)
        finally:
            handle.remove()

    for unit in range(0, acts.shape[1], 7):
        assert torch.equal(outcome.pred[unit], zero_output(unit))
    with torch.no_grad():
        saved = model.conv5.weight.data[3].clone()
        model.conv5.weight.data[3] = 0
        model.conv5.bias.data[3] = 0
        still_on = run_to(model, images, ["relu5"])["relu5"][:, 3]
        model.conv5.weight.data[3] = saved
    assert still_on.abs().sum() > 0  # why the tool zeroes the output under batch norm


def random_rotation(channels, seed):
    generator = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(channels, channels, generator=generator, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@pytest.mark.parametrize("layer", ["relu3", "relu5"])
def test_directions_equal_projection(demo_case, layer):
    model, images, labels = demo_case
    acts = run_to(model, images, [layer])[layer]
    q = random_rotation(acts.shape[1], 0)
    directions = torch.arange(0, acts.shape[1], 5)
    engine = AblationEngine(tail_of(model, layer))
    outcome = engine.evaluate_directions(acts, labels, q, directions)
    for row, j in enumerate(directions):
        qj = q[:, j]
        edited = acts - qj[None, :, None, None] * torch.einsum("bchw,c->bhw", acts, qj)[:, None]
        assert torch.equal(outcome.pred[row], ties.predict(tail_of(model, layer), edited))


def test_rotation_round_trip_keeps_predictions(demo_case):
    model, images, labels = demo_case
    acts = run_to(model, images, ["relu5"])["relu5"]
    q = random_rotation(acts.shape[1], 3)
    z = torch.einsum("cd,bchw->bdhw", q, acts)
    back = torch.einsum("cd,bdhw->bchw", q, z)
    tail = tail_of(model, "relu5")
    assert torch.equal(tail(back).argmax(1), tail(acts).argmax(1))


@pytest.mark.parametrize("max_memory", [1 << 30, 50_000])
@pytest.mark.parametrize("layer", ["relu3", "relu5"])
def test_exact_ties_go_to_the_lowest_class(layer, max_memory):
    """Two classes with identical weights tie exactly on every image: the lower index wins, as in torch.argmax.

    Every row is a near-tie, so this also runs the float64 path for single units and for sets, in small pieces."""
    torch.manual_seed(5)
    model = lively(build_demo(num_classes=3))
    with torch.no_grad():
        model.fc8.weight[1] = model.fc8.weight[2]
        model.fc8.bias[1] = model.fc8.bias[2] + 50.0  # classes 1 and 2 always on top, tied
        model.fc8.bias[2] += 50.0
    images = torch.randn(4, 3, 64, 64)
    acts = run_to(model, images, [layer])[layer]
    labels = torch.full((4,), 2)
    engine = AblationEngine(tail_of(model, layer), max_memory=max_memory)
    assert torch.equal(engine.baseline(acts, labels).pred, torch.ones(4, dtype=torch.long))
    singles = single_unit_masks(acts.shape[1])[::8]
    sets = singles | singles.roll(1, dims=1)
    for masks in (singles, sets):
        outcome = engine.evaluate_units(acts, labels, masks)
        assert (outcome.pred == 1).all()
        assert torch.allclose(outcome.true_prob, torch.full_like(outcome.true_prob, 0.5), atol=1e-6)


def test_near_ties_are_decided_in_float64():
    """Two classes a hair apart: float32 cannot tell them apart reliably, the engine decides as float64 does."""
    torch.manual_seed(4)
    model = build_demo(num_classes=4).eval()
    with torch.no_grad():
        model.fc8.weight[1] = model.fc8.weight[0]
        model.fc8.bias[1] = model.fc8.bias[0]
        model.fc8.weight[0] *= 1 + 1e-7  # a margin far below any shortcut rounding bound
        model.fc8.bias[0] += 5.0
        model.fc8.bias[1] += 5.0
    images = torch.randn(6, 3, 64, 64)
    acts = run_to(model, images, ["relu5"])["relu5"]
    labels = torch.zeros(6, dtype=torch.long)
    outcome = AblationEngine(tail_of(model, "relu5")).evaluate_units(acts, labels, single_unit_masks(acts.shape[1]))
    tail64 = tail_of(model, "relu5").double()
    for unit in range(0, acts.shape[1], 9):
        edited = acts.clone().double()
        edited[:, unit] = 0
        assert torch.equal(outcome.pred[unit], tail64(edited).argmax(1))


@pytest.mark.parametrize("kernel, stride, padding, dilation", [
    ((3, 3), (1, 1), (1, 1), (1, 1)), ((5, 3), (2, 1), (2, 0), (1, 2)), ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 3), (2, 2), (0, 0), (2, 2))])
def test_patches_equal_unfold(kernel, stride, padding, dilation):
    """The engine's strided-slice patches of single-channel maps are ``F.unfold``'s, for any conv geometry."""
    conv = torch.nn.Conv2d(1, 1, kernel, stride, padding, dilation)
    maps = torch.randn(7, 11, 9)
    expected = torch.nn.functional.unfold(maps.unsqueeze(1), kernel, dilation, padding, stride)
    assert torch.equal(engine_module._patches(maps, conv), expected)
