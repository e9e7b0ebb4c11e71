"""The engine's predictions equal the definition on randomly initialised AlexNet and ResNet18 at 224x224.

The definition, computed naively: AlexNet -- zero the unit's conv weight and bias and run torchvision's whole model;
ResNet18 -- run the whole step sequence with the unit's channel zeroed at the layer (batch norm and the skip connection
make zeroing conv weights a different ablation). Each layer's engine path is covered: AlexNet conv5 and ResNet18
layer4 through the low-rank update of the first linear layer, AlexNet conv3 through the one-channel convolution update,
ResNet18 layer3 through the full tail. A few images and a sample of units keep it quick; the sample includes units the
engine says flip a prediction, so agreement is checked where it matters.
"""

import numpy as np
import pytest
import torch
from scipy.stats import ortho_group

from bench.ablation import naive_predictions, random_images, random_model
from compute.lib import ties
from compute.lib.engine import AblationEngine, single_unit_masks
from compute.lib.sequence import run_to, tail_of

IMAGES = 3


@pytest.fixture(scope="module")
def alexnet():
    return random_model("alexnet-places")


@pytest.fixture(scope="module")
def resnet():
    return random_model("resnet18-places")


def sample_units(outcome, labels, candidates, count):
    """Up to ``count`` units: half among those whose ablation the engine says flips a prediction, half spread."""
    flips = (outcome.pred != labels).any(1).numpy()
    flipping = candidates[flips][: count // 2]
    spread = candidates[np.linspace(0, len(candidates) - 1, count - len(flipping)).round().astype(int)]
    return np.unique(np.concatenate([flipping, spread]))


def engine_outcome(sequence, step, images, units):
    acts = run_to(sequence, images, [step])[step]
    with torch.no_grad():
        labels = sequence(images).argmax(1)
    engine = AblationEngine(tail_of(sequence, step))
    return engine, engine.evaluate_units(acts, labels, single_unit_masks(acts.shape[1])[units]), labels


def zeroed_weights(model, conv_name, unit, images):
    """Logits and predictions (``compute.lib.ties``' rule) of the whole model with the unit's weight and bias zeroed."""
    conv = dict(model.named_modules())[conv_name]
    saved = conv.weight.data[unit].clone(), conv.bias.data[unit].clone()
    conv.weight.data[unit] = 0
    conv.bias.data[unit] = 0
    try:
        with torch.no_grad():
            return model(images), ties.predict(model, images)
    finally:
        conv.weight.data[unit], conv.bias.data[unit] = saved


@pytest.mark.parametrize("layer, entry, every_unit, sample",
                         [("conv5", "Linear", True, 6), ("conv3", "Conv2d", False, 4)])
def test_alexnet_equals_zeroed_weights(alexnet, layer, entry, every_unit, sample):
    spec, model, sequence = alexnet
    images = random_images(spec, IMAGES, seed=11)
    channels = dict(model.named_modules())[spec.unit_weights[layer]].out_channels
    candidates = np.arange(channels) if every_unit else np.linspace(0, channels - 1, 12).round().astype(int)
    engine, outcome, labels = engine_outcome(sequence, spec.layers[layer], images, torch.as_tensor(candidates))
    assert type(engine.entry).__name__ == entry
    flipped = 0
    for unit in sample_units(outcome, labels, candidates, sample):
        row = int(np.flatnonzero(candidates == unit)[0])
        logits, predicted = zeroed_weights(model, spec.unit_weights[layer], int(unit), images)
        assert torch.equal(outcome.pred[row], predicted), f"unit {unit}"
        expected = torch.softmax(logits, 1)[torch.arange(IMAGES), labels]
        assert torch.allclose(outcome.true_prob[row], expected, atol=1e-4)
        flipped += int((outcome.pred[row] != labels).sum())
    assert flipped > 0  # the sample includes ablations that change predictions


@pytest.mark.parametrize("layer, every_unit, sample", [("layer4", True, 6), ("layer3", False, 3)])
def test_resnet_equals_zeroed_output(resnet, layer, every_unit, sample):
    spec, _, sequence = resnet
    images = random_images(spec, IMAGES, seed=12)
    step = spec.layers[layer]
    channels = run_to(sequence, images[:1], [step])[step].shape[1]
    candidates = np.arange(channels) if every_unit else np.linspace(0, channels - 1, 8).round().astype(int)
    engine, outcome, labels = engine_outcome(sequence, step, images, torch.as_tensor(candidates))
    assert engine.has_shortcut == (layer == "layer4")
    flipped = 0
    for unit in sample_units(outcome, labels, candidates, sample):
        row = int(np.flatnonzero(candidates == unit)[0])
        assert torch.equal(outcome.pred[row], naive_predictions(sequence, step, int(unit), images)), f"unit {unit}"
        flipped += int((outcome.pred[row] != labels).sum())
    assert flipped > 0


def test_resnet_layer4_directions_equal_projection(resnet):
    """Average pooling is linear, so directions take the rotated low-rank update; compare with the projected tail."""
    spec, _, sequence = resnet
    images = random_images(spec, IMAGES, seed=13)
    acts = run_to(sequence, images, ["layer4"])["layer4"]
    tail = tail_of(sequence, "layer4")
    q = torch.from_numpy(ortho_group.rvs(acts.shape[1], random_state=0)).float()
    directions = torch.arange(0, acts.shape[1], 4)
    with torch.no_grad():
        labels = tail(acts).argmax(1)
    engine = AblationEngine(tail)
    outcome = engine.evaluate_directions(acts, labels, q, directions)
    assert engine.has_shortcut and engine.pool_is_linear
    with torch.no_grad():
        for row, j in enumerate(directions):
            qj = q[:, j]
            edited = acts - qj[None, :, None, None] * torch.einsum("bchw,c->bhw", acts, qj)[:, None]
            assert torch.equal(outcome.pred[row], ties.predict(tail, edited)), f"direction {int(j)}"
    assert (outcome.pred != labels).any()


def test_alexnet_conv5_predictions_only_equal_zeroed_weights(alexnet):
    """With ``probabilities=False`` rows may be certified and skip the tail (the ReLUs after fc6 work in place):
    predictions stay those of the full path and of the zeroed network."""
    spec, model, sequence = alexnet
    images = random_images(spec, IMAGES, seed=11)
    step = spec.layers["conv5"]
    acts = run_to(sequence, images, [step])[step]
    labels = sequence(images).argmax(1).detach()
    engine = AblationEngine(tail_of(sequence, step))
    masks = single_unit_masks(acts.shape[1])
    full = engine.evaluate_units(acts, labels, masks)
    only = engine.evaluate_units(acts, labels, masks, probabilities=False)
    assert torch.equal(only.pred, full.pred)
    for unit in sample_units(only, labels, np.arange(acts.shape[1]), 4):
        assert torch.equal(only.pred[unit], zeroed_weights(model, spec.unit_weights["conv5"], int(unit), images)[1])
