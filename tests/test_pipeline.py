"""End to end: compute.all on a tiny SynthScenes run, checked against definitions."""

import numpy as np
import pytest
import torch

from compute.all import main as compute_all
from compute.models import get_spec
from store import StoreReader


def test_store_holds_the_contract_paths(tiny_run):
    store = StoreReader(tiny_run["store"])
    assert len(store.classes) == 24
    labels = store.read("images/labels")
    assert np.bincount(labels).tolist() == [6] * 24
    for layer in ("conv3", "conv4", "conv5"):
        drop = store.layer(layer, "ablation", "class_drop")
        overall = store.layer(layer, "ablation", "overall_drop")
        assert drop.dtype == np.float32 and drop.shape == (store.layer(layer, "attributes", "l1").shape[0], 24)
        # balanced validation set: the overall drop is the mean of the class drops
        assert np.allclose(drop.mean(1), overall, atol=1e-6)
        assert store.layer(layer, "activations", "mean").shape == (144, drop.shape[0])
        assert store.layer(layer, "attributes", "selectivity").shape == drop.shape
    for key in ("model", "weights_sha256", "data_fingerprint", "config", "code_version", "created", "schema_version"):
        assert key in store.attrs


def tiny_model_and_images(tiny_run):
    """The tiny run's demo network, its validation images (preprocessed) and their labels."""
    from compute.data.validation import load_validation

    spec = get_spec("demo")
    model, _ = spec.load(None, tiny_run["data_dir"])
    val = load_validation("synthscenes", tiny_run["dataset"], spec.preprocess)
    images = torch.stack([val.dataset[i][0] for i in range(len(val.labels))])
    return model, images, torch.as_tensor(val.labels)


def test_single_unit_drop_equals_zeroed_weights(tiny_run):
    """Recompute a few units' drops by zeroing the conv filter in a copy of the network and running it whole."""
    store = StoreReader(tiny_run["store"])
    model, images, labels = tiny_model_and_images(tiny_run)
    with torch.no_grad():
        base_correct = (model(images).argmax(1) == labels).float()
    drop = store.layer("conv5", "ablation", "overall_drop")
    for unit in (0, 7, 31):
        conv = model.conv5
        saved = conv.weight.data[unit].clone(), conv.bias.data[unit].clone()
        conv.weight.data[unit] = 0
        conv.bias.data[unit] = 0
        with torch.no_grad():
            correct = (model(images).argmax(1) == labels).float()
        conv.weight.data[unit], conv.bias.data[unit] = saved
        assert drop[unit] == pytest.approx(float(base_correct.mean() - correct.mean()), abs=1e-6)


def test_rerun_is_up_to_date(tiny_run, capsys):
    assert compute_all(tiny_run["args"]) == 0
    assert "up to date" in capsys.readouterr().out


@pytest.mark.parametrize("extra, message", [
    (["--model", "vgg99"], "unknown model"),
    (["--layers", "conv9"], "unknown layer"),
    (["--device", "tpu"], "unknown device"),
])
def test_bad_input_is_one_line_exit_2(tiny_run, capsys, extra, message):
    args = list(tiny_run["args"]) + extra
    assert compute_all_cli(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_unwritable_store_is_one_line(tiny_run, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert compute_all_cli(list(tiny_run["args"]) + ["--store", str(blocker / "sub")]) == 2
    assert "writable --store" in capsys.readouterr().err


def compute_all_cli(args):
    from compute.all import main
    from compute.errors import run_cli

    return run_cli(main, args)


def test_drops_rest_on_paired_counts(tiny_run):
    """lost/gained per class equal a naive count over the images for a few units, reproduce the drops exactly, and
    their q-values are scipy's Benjamini-Hochberg over the layer's McNemar p-values."""
    from scipy import stats

    from compute.lib import ties

    store = StoreReader(tiny_run["store"])
    model, images, labels = tiny_model_and_images(tiny_run)
    base_right = ties.predict(model, images) == labels
    lost, gained = (store.layer("conv5", "ablation", name) for name in ("lost", "gained"))
    for unit in (0, 7, 31):
        conv = model.conv5
        saved = conv.weight.data[unit].clone(), conv.bias.data[unit].clone()
        conv.weight.data[unit] = 0
        conv.bias.data[unit] = 0
        right = ties.predict(model, images) == labels
        conv.weight.data[unit], conv.bias.data[unit] = saved
        assert lost[unit].tolist() == np.bincount(labels[base_right & ~right], minlength=24).tolist()
        assert gained[unit].tolist() == np.bincount(labels[~base_right & right], minlength=24).tolist()
    n_k = np.bincount(labels.numpy(), minlength=24)
    for layer in ("conv3", "conv4", "conv5"):
        lost, gained, drop, p, q = (store.layer(layer, "ablation", name)
                                    for name in ("lost", "gained", "class_drop", "p_value", "q_value"))
        assert lost.dtype == np.int32 and np.array_equal(((lost - gained) / n_k).astype(np.float32), drop)
        assert np.array_equal(store.layer(layer, "ablation", "overall_lost"), lost.sum(1))
        assert np.array_equal(q, stats.false_discovery_control(p.ravel()).reshape(p.shape))


def test_a_missing_demo_checkpoint_is_trained_by_compute_all_not_by_the_loader(tmp_path, monkeypatch):
    """The loader refuses (MissingWeights, one line naming compute.train); compute.all's load_or_train trains."""
    from compute import all as pipeline
    from compute import train
    from compute.errors import MissingWeights
    from compute.models.demo import weights_file

    spec = get_spec("demo")
    with pytest.raises(MissingWeights, match="python -m compute.train --model demo --seed 3"):
        spec.load(None, tmp_path, seed=3)
    trained = []

    def fake_training(model, seed, data_dir):
        trained.append((model, seed))
        path = weights_file(model, seed, data_dir)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(spec.build().state_dict(), path)

    monkeypatch.setattr(train, "train_demo", fake_training)
    model, provenance = pipeline.load_or_train(spec, None, tmp_path, 3)
    assert trained == [("demo", 3)] and provenance["weights_path"] == str(weights_file("demo", 3, tmp_path))


def _context(tiny_run, **extra):
    from compute.data.validation import load_validation
    from compute.models import get_spec
    from compute.run.context import RunContext
    from compute.run.imagecache import ImageCache

    spec = get_spec("demo")
    model, _ = spec.load(None, tiny_run["data_dir"])
    val = load_validation("synthscenes", tiny_run["dataset"], spec.preprocess)
    return RunContext(spec=spec, model=model, images=ImageCache(val.dataset, spec.preprocess),
                      class_names=list(val.class_names), layers=["conv3", "conv4", "conv5"],
                      device=torch.device("cpu"), writer=None, config={}, data_dir=tiny_run["data_dir"],
                      batch_size=50, **extra)


def _passes(ctx, layers, indices=None):
    return [({name: value.clone() for name, value in acts.items()}, labels, idx)
            for acts, labels, idx in ctx.activations(layers, indices=indices)]


def test_kept_activations_are_the_recomputed_ones(tiny_run, monkeypatch):
    """A layer in ``keep`` is kept by the first full pass over it; later passes (all images, or some in any order)
    run no prefix and yield the batches a fresh pass yields, bit for bit, with the same labels and indices."""
    import compute.run.context as context_module

    plain = _context(tiny_run)
    ctx = _context(tiny_run, keep=frozenset({"conv5"}))
    some = np.random.default_rng(0).permutation(len(ctx.images))[:37]
    expected = {"all": _passes(plain, ["conv5"]), "some": _passes(plain, ["conv5"], some)}
    _passes(ctx, ["conv4", "conv5"])  # the first full pass (the ablation stage's, several layers)
    runs = []
    original = context_module.run_to
    monkeypatch.setattr(context_module, "run_to", lambda *args, **kwargs: runs.append(1) or original(*args, **kwargs))
    for name, indices in (("all", None), ("some", some)):
        got = _passes(ctx, ["conv5"], indices)
        assert len(got) == len(expected[name])
        for (acts, labels, idx), (want, want_labels, want_idx) in zip(got, expected[name]):
            assert torch.equal(acts["conv5"], want["conv5"])
            assert torch.equal(labels, want_labels) and torch.equal(idx, want_idx)
    assert runs == []
    _passes(ctx, ["conv4"])  # not kept: the prefix runs
    assert len(runs) > 0


def test_nothing_kept_beyond_a_quarter_of_the_memory_budget(tiny_run):
    ctx = _context(tiny_run, keep=frozenset({"conv5"}), max_memory=1 << 20)
    _passes(ctx, ["conv5"])
    assert ctx._kept == {}


def test_an_engine_gets_what_is_left_of_the_budget(tiny_run):
    """A stage's engine gets --max-memory less the activations kept (or to be kept by the first full pass) and what the
    stage holds beside it, but never less than an eighth of it."""
    budget = 64 << 20
    ctx = _context(tiny_run, keep=frozenset({"conv5"}), max_memory=budget)
    planned = len(ctx.images) * ctx.units("conv5") * 8 * 8 * 4  # the demo's conv5 maps are 8 x 8, float32
    assert planned <= budget // 4
    assert ctx.engine("conv5").max_memory == budget - planned
    assert ctx.engine("conv5", holding=budget // 8).max_memory == budget - planned - budget // 8
    _passes(ctx, ["conv5"])  # now kept: the same share
    assert ctx.kept_bytes() == planned and ctx.engine("conv5").max_memory == budget - planned
    assert ctx.engine("conv5", holding=budget).max_memory == budget // 8
    assert _context(tiny_run, max_memory=budget).engine("conv5").max_memory == budget  # nothing kept
