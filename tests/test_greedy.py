"""Greedy ablation against its definition, random-baseline seeding, the stored datasets, live sessions, the page."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

from compute.lib import greedy, ties
from compute.stages import greedy as greedy_stage
from compute.lib.engine import AblationEngine, correct_counts
from compute.errors import UserError
from store import StoreReader
from tests.views import open_through_main

LAYER = "conv5"


def known_units_tail(units: int = 8) -> nn.Sequential:
    """Pool -> linear: class 0's logit is unit 2 + unit 5, class 1 a constant 1, class 2 a little of the others."""
    fc = nn.Linear(units, 3)
    with torch.no_grad():
        fc.weight.zero_()
        fc.bias.zero_()
        fc.weight[0, [2, 5]] = 1.0
        fc.bias[1] = 1.0
        fc.weight[2] = 0.1
        fc.weight[2, [2, 5]] = 0.0
    return nn.Sequential(OrderedDict(pool=nn.AdaptiveAvgPool2d(1), flatten=nn.Flatten(), fc=fc)).eval()


def known_units_acts(images: int = 30, units: int = 8) -> torch.Tensor:
    """Unit 2 ~ 1.5 and unit 5 ~ 0.8 everywhere: either alone leaves class 0 ahead of class 1 only with the other."""
    generator = torch.Generator().manual_seed(0)
    acts = torch.rand(images, units, 2, 2, generator=generator)
    acts[:, 2] = 1.2 + 0.6 * torch.rand(images, 2, 2, generator=generator)
    acts[:, 5] = 0.6 + 0.3 * torch.rand(images, 2, 2, generator=generator)
    return acts


@pytest.mark.parametrize("shortcuts", [True, False])
def test_greedy_finds_the_units_a_class_depends_on(shortcuts):
    acts, labels = known_units_acts(), torch.zeros(30, dtype=torch.long)
    engine = AblationEngine(known_units_tail(), use_shortcuts=shortcuts)
    state = greedy.greedy(engine, acts, labels, [0], steps=3)
    # Unit 2 alone drops class 0 to 0; then every candidate ties at 0 and the true-class probability picks unit 5.
    assert state.chosen[:2] == [2, 5]
    assert state.scores == [1.0, 0.0, 0.0, 0.0]
    assert state.probs[2] < state.probs[1] < state.probs[0]


def brute_force_order(tail, acts, labels, group, steps):
    """The definition, run naively: zero chosen + candidate in the activations and run the whole tail."""
    chosen = []
    for _ in range(steps):
        best = None
        for unit in range(acts.shape[1]):
            if unit in chosen:
                continue
            keep = torch.ones(acts.shape[1])
            keep[chosen + [unit]] = 0
            with torch.no_grad():
                logits = tail(acts * keep[None, :, None, None])
            correct = (logits.argmax(1) == labels).double()
            prob = torch.softmax(logits.double(), 1)[torch.arange(len(labels)), labels]
            accs = [correct[labels == c].mean().item() for c in group]
            probs = [prob[labels == c].mean().item() for c in group]
            key = (round(float(np.mean(accs)), 9), float(np.mean(probs)), unit)
            best = min(best, key) if best else key
        chosen.append(best[2])
    return chosen


def random_tail_case():
    torch.manual_seed(3)
    tail = nn.Sequential(nn.Conv2d(6, 10, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(40, 4)).eval()
    acts = torch.relu(torch.randn(48, 6, 4, 4))
    with torch.no_grad():
        tail[-1].bias -= tail(acts).mean(0)  # centred logits: every class is predicted for some images
        predicted = tail(acts).argmax(1)
    labels = torch.where(torch.arange(48) % 3 == 0, torch.arange(48) % 4, predicted)  # some wrong, most right
    return tail, acts, labels


def linear_tail_case():
    """A tail entered through a Linear (pool -> flatten -> fc): greedy's candidates are certified where they can be,
    and its replays run along chains of running sums."""
    torch.manual_seed(4)
    tail = nn.Sequential(nn.MaxPool2d(2), nn.Flatten(), nn.Linear(24, 12), nn.ReLU(), nn.Linear(12, 4)).eval()
    acts = torch.relu(torch.randn(48, 6, 4, 4))
    with torch.no_grad():
        tail[-1].bias -= tail(acts).mean(0)
        predicted = tail(acts).argmax(1)
    labels = torch.where(torch.arange(48) % 3 == 0, torch.arange(48) % 4, predicted)
    return tail, acts, labels


@pytest.mark.parametrize("case", [random_tail_case, linear_tail_case])
@pytest.mark.parametrize("group", [[1], [0, 2]])
def test_greedy_equals_brute_force(group, case):
    tail, acts, labels = case()
    chosen = torch.as_tensor(np.flatnonzero(np.isin(labels.numpy(), group)))
    state = greedy.greedy(AblationEngine(tail), acts[chosen], labels[chosen], group, steps=4)
    assert state.chosen == brute_force_order(tail, acts[chosen], labels[chosen], group, 4)
    assert state.scores[0] > state.scores[-1]


@pytest.mark.parametrize("case", [random_tail_case, linear_tail_case])
def test_ablation_paths_equal_zeroed_prefixes(case):
    tail, acts, labels = case()
    orders = [[4, 0, 3], [1, 4, 5]]
    pred = greedy.ablation_paths(AblationEngine(tail), acts, labels, orders)
    assert pred.shape == (2, 4, len(labels))
    for row, order in enumerate(orders):
        for step in range(4):
            keep = torch.ones(acts.shape[1])
            keep[order[:step]] = 0
            with torch.no_grad():
                expected = ties.predict(tail, acts * keep[None, :, None, None])
            assert torch.equal(pred[row, step], expected)
    counts = correct_counts(pred, labels, 4)
    assert counts.shape == (2, 4, 4) and counts[0, 0].sum() == (pred[0, 0] == labels).sum().item()
    assert greedy.ablation_paths(AblationEngine(tail), acts, labels, np.zeros((0, 3), int)).shape == (0, 4, 48)


def test_random_orders_are_reproducible_by_seed():
    first = greedy.random_orders(128, 20, 3, class_index=5)
    assert np.array_equal(first, greedy.random_orders(128, 20, 3, class_index=5))
    assert np.array_equal(first[1], np.random.default_rng((1, 5)).permutation(128)[:20])
    assert not np.array_equal(first, greedy.random_orders(128, 20, 3, class_index=6))
    assert all(len(set(row)) == 20 for row in first)
    assert greedy.random_orders(128, 20, 0, 5).shape == (0, 20)


def test_resolve_classes():
    names = ["beach", "forest", "kitchen"]
    assert greedy.resolve_classes(None, names).tolist() == [0, 1, 2]
    assert greedy.resolve_classes(["kitchen", "0"], names).tolist() == [0, 2]
    with pytest.raises(UserError, match="unknown class 'desert'"):
        greedy.resolve_classes(["desert"], names)
    with pytest.raises(UserError, match="indices 0..2"):
        greedy.resolve_classes(["3"], names)


def stage_context(**args):
    from types import SimpleNamespace

    from compute.run.options import GreedyOptions

    options = GreedyOptions(**(dict(greedy_steps=20, random_orders=10, greedy_classes=None) | args))
    return SimpleNamespace(option=lambda kind: options, layers=["conv3", "conv5"],
                           class_names=["beach", "forest", "kitchen"], num_classes=3,
                           labels=np.repeat([0, 1, 2], 4), units=lambda layer: 8)


def test_stage_settings():
    from compute.errors import StageSkipped

    assert greedy_stage._settings(stage_context(), "conv5")[:2] == (8, 10)  # steps capped at the layer's units
    assert greedy_stage._settings(stage_context(greedy_classes=["forest"]), "conv5")[2].tolist() == [1]
    with pytest.raises(StageSkipped, match="--greedy-steps is 0"):
        greedy_stage._settings(stage_context(greedy_steps=0), "conv5")
    with pytest.raises(UserError, match="unknown class 'desert'"):
        greedy_stage._settings(stage_context(greedy_classes=["desert"]), "conv5")


def test_a_share_without_classes_has_empty_rows_of_the_right_shape():
    """Under torchrun with more ranks than classes some ranks get none; their share must still combine."""
    ctx = stage_context()
    ctx.engine = lambda layer, holding=0: None
    ctx.max_memory = 1 << 30
    share = greedy_stage.class_share(ctx, "conv5", np.zeros(0, np.int64), steps=3, seeds=2)
    assert {name: value.shape for name, value in share.items()} == {
        "order": (0, 3), "heldout_order": (0, 3), "class_acc": (0, 4), "heldout_select_acc": (0, 4),
        "heldout_acc": (0, 4), "random_class_acc": (0, 2, 4), "counts": (0, 4, 3)}
    assert share["order"].dtype == np.int64


# -- the tiny run's store --------------------------------------------------------------------------------------
def test_stored_greedy_is_consistent(tiny_run):
    store = StoreReader(tiny_run["store"])
    read = lambda name: store.layer(LAYER, "greedy", name)  # noqa: E731
    classes, order, class_acc = read("classes"), read("order"), read("class_acc")
    steps, k = 3, len(store.classes)
    assert classes.tolist() == list(range(k))
    assert order.shape == read("heldout_order").shape == (k, steps)
    assert all(len(set(row)) == steps for row in order)
    base = store.layer(LAYER, "ablation", "baseline_class_acc")
    assert np.array_equal(class_acc[:, 0], base[classes])
    random = read("random_class_acc")
    assert random.shape == (2, k, steps + 1) and np.array_equal(random[:, :, 0], np.broadcast_to(base, (2, k)))
    assert np.all(class_acc[:, 1] <= random[:, :, 1])  # step 1 of greedy is the best single unit
    all_class = read("all_class_acc")
    assert all_class.shape == (k, steps + 1, k)
    # the same order scored on all images gives the same class accuracy as on the class's own images
    assert np.allclose(all_class[np.arange(k), :, classes], class_acc, atol=1e-6)
    overall = read("overall_acc")
    assert np.allclose(overall, all_class.mean(-1), atol=1e-6)  # balanced classes
    assert overall[:, 0] == pytest.approx(store.read_attrs(f"layers/{LAYER}/ablation")["baseline_overall_acc"])
    labels = store.read("images/labels")
    held = read("heldout_acc")
    assert held.shape == (k, steps + 1)
    for c in range(k):  # step 0 of the held-out curve: baseline accuracy of the odd-position images
        images = np.flatnonzero(labels == c)[1::2]
        predictions = store.read("images/predictions")[images]
        assert held[c, 0] == pytest.approx(np.mean(predictions == c))
    attrs = store.read_attrs(f"layers/{LAYER}/greedy")
    assert attrs["steps"] == steps and attrs["random_orders"] == 2 and "probability" in attrs["tie_break"]
    assert not store.has("layers/conv3/greedy")  # greedy defaults to the deepest chosen layer


def test_live_session_matches_the_store(tiny_run):
    from compute.live_session import load_session

    session = load_session(tiny_run["store"], LAYER)
    store = StoreReader(tiny_run["store"])
    assert torch.equal(session.baseline().pred, torch.as_tensor(store.read("images/predictions")))
    state = session.start_greedy([4])
    for _ in range(3):
        session.advance(state)
    assert state.chosen == store.layer(LAYER, "greedy", "order")[4].tolist()
    class_acc, overall = session.path_accuracy(state.chosen)
    assert np.allclose(overall, store.layer(LAYER, "greedy", "overall_acc")[4], atol=1e-6)
    assert np.allclose(class_acc, store.layer(LAYER, "greedy", "all_class_acc")[4], atol=1e-6)


def test_greedy_bench_finds_both_paths_equal(tiny_run, capsys):
    """bench/greedy.py's checks on a small store: predictions first and every candidate in full choose the same
    orders; chained and general replays give the same predictions (its exit code says both)."""
    from bench import greedy as greedy_bench

    assert greedy_bench.main(["--store", str(tiny_run["store"]), "--layer", LAYER, "--classes", "3", "--steps", "3",
                              "--orders", "2", "--repeats", "1"]) == 0
    printed = capsys.readouterr().out
    assert "same orders: True" in printed and "same predictions: True" in printed


def test_a_layer_too_big_to_hold_is_streamed_from_the_store_with_equal_results(tiny_run):
    from compute.live_session import load_session

    held = load_session(tiny_run["store"], LAYER)
    shape = held.acts.shape
    streamed = load_session(tiny_run["store"], LAYER, hold=0, block_bytes=50 * 4 * int(np.prod(shape[1:])))
    assert held.acts.held is not None and streamed.acts.held is None and streamed.acts.block == 50
    assert len(list(streamed.acts.blocks())) == -(-shape[0] // 50) > 1
    assert torch.equal(held.baseline().pred, streamed.baseline().pred)
    states = [session.start_greedy([2, 7]) for session in (held, streamed)]
    for _ in range(3):
        assert held.advance(states[0]) == streamed.advance(states[1])
    for mine, theirs in zip(held.path_accuracy(states[0].chosen), streamed.path_accuracy(states[1].chosen)):
        assert np.array_equal(mine, theirs)


def test_live_session_without_live_data_says_which_command(tiny_run):
    from compute.live_session import load_session
    from store import StoreError

    with pytest.raises(StoreError, match="no live results for conv3"):
        load_session(tiny_run["store"], "conv3")


# -- the page ----------------------------------------------------------------------------------------------------
def page(_env):
    return open_through_main("greedy")


def test_page_replays_a_class(store_env):
    at = page(store_env)
    assert any("class accuracy" in m.label.lower() for m in at.metric)
    slider = at.slider(key="greedy_step")
    slider.set_value(2).run()
    assert not at.exception, at.exception
    assert at.get("arrow_vega_lite_chart") or at.get("vega_lite_chart")
    assert any("unit" in m.value for m in at.markdown) or at.get("page_link")


def test_page_runs_live_greedy_and_saves(tiny_run, tmp_path, monkeypatch):
    import shutil

    (tmp_path / "stores").mkdir()
    copy = shutil.copy(tiny_run["store"], tmp_path / "stores" / "demo.h5")  # saving must not touch the shared store
    monkeypatch.setenv("UNIT_ABLATION_STORES", str(tmp_path / "stores"))
    at = page(None)
    assert "live_run" not in [button.key for button in at.button]
    at.toggle(key="live_on").set_value(True).run()  # the activations load only when asked for
    at.number_input(key="live_steps").set_value(2)
    at.button(key="live_run").click().run()
    assert not at.exception, at.exception
    job = at.session_state["greedy_live"]
    assert len(job["state"].chosen) == 2 and not job["running"]
    assert job["result"]["class_acc"].shape == (3, 24)
    job["running"], job["steps"] = True, 3  # as if Stop were clicked at step 2 of 3: the units so far are kept
    at.button(key="live_stop").click().run()
    assert not job["running"] and len(job["state"].chosen) == 2
    at.button(key="live_continue").click().run()
    assert not at.exception, at.exception
    assert len(job["state"].chosen) == 3 and job["result"]["overall_acc"].shape == (4,)
    at.text_input(key="live_name").input("three_steps")
    at.button(key="live_save").click().run()
    assert not at.exception, at.exception
    store = StoreReader(copy)
    assert store.read(f"layers/{LAYER}/greedy_live/three_steps/order").tolist() == job["state"].chosen
    assert store.read(f"layers/{LAYER}/greedy_live/three_steps/class_acc").shape == (4, len(store.classes))
