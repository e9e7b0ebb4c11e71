"""Greedy ablation (the paper's Fig. 4): replay each class's stored greedy order step by step (with the images each
step breaks and fixes), compare the greedy curves with the random-order baseline and the held-out score, and run
greedy (or a hand-picked set) live from the store's activations and tail weights, with the images the set changes.
"""

from __future__ import annotations

import re
import time

import altair as alt
import numpy as np
import pandas as pd
import streamlit as st

from app import loaders
from app.common import chart_downloads, choose_layer, current_store, guarded, linked_select, side_by_side, table
from app.flip_sections import has_flips, recompute_command, show_flips, step_flips
from compute.flips import changed
from figures.greedy import class_curves, drop_summary, greedy_against_random, selection_bias
from store import StoreError
from store.schema import layer_path

LOSERS = 10  # other classes shown as losing most
NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
MODES = ("Greedy for one class", "Greedy for a group of classes", "Units picked by hand")


# -- small pieces ------------------------------------------------------------------------------------------------
def greedy_array(store, layer: str, name: str, selection=None):
    return loaders.layer_array(store.path, layer, "greedy", name, selection)


def unit_link(store, layer: str, unit: int, label: str | None = None) -> None:
    st.page_link("views/unit.py", label=label or f"Unit {unit}", icon=":material/neurology:",
                 query_params={"store": store.name, "layer": layer, "unit": str(unit)})


def unit_url(store, layer: str, unit: int) -> str:
    return f"unit?store={store.name}&layer={layer}&unit={unit}"


def show_top_images(store, layer: str, unit: int) -> None:
    """The unit's top activating images, once the topimages stage has stored thumbnails."""
    path = layer_path(layer, "topimages", "thumbs")
    if store.has(path):
        thumbs = loaders.array(store.path, path, int(unit))
        st.image(list(thumbs), width=80)
    else:
        st.caption("Top images appear here once the store holds them (topimages stage).")


def losers_chart(before: np.ndarray, after: np.ndarray, classes: list[str], skip: list[int]) -> alt.Chart | None:
    """Bar chart of the classes (other than ``skip``) whose accuracy fell most from ``before`` to ``after``."""
    drop = 100 * (np.asarray(before) - np.asarray(after))
    drop[list(skip)] = -np.inf
    top = [i for i in np.argsort(-drop, kind="stable")[:LOSERS] if drop[i] > 0]
    if not top:
        return None
    frame = pd.DataFrame({"class": [classes[i] for i in top], "drop (points)": drop[top], "rank": range(len(top))})
    # One label per bar: Vega-Lite drops labels it thinks overlap (every other one in a short chart), and a step
    # height gives each bar its own row whatever height the page leaves the chart.
    return alt.Chart(frame).mark_bar(color="#c0392b").encode(
        x=alt.X("drop (points):Q"),
        y=alt.Y("class:N", sort=alt.EncodingSortField("rank"), title=None,
                axis=alt.Axis(labelOverlap=False, labelLimit=180)),
        tooltip=["class", alt.Tooltip("drop (points):Q", format=".1f")]).properties(
        height=alt.Step(26), usermeta={"embedOptions": {"renderer": "svg"}})  # svg: its labels can be read back


# -- replay ------------------------------------------------------------------------------------------------------
def replay(store, layer: str) -> None:
    classes = list(store.classes)
    rows = greedy_array(store, layer, "classes")
    order = greedy_array(store, layer, "order")
    steps = order.shape[1]
    names = [classes[int(r)] for r in rows]
    row = linked_select("Class", list(range(len(rows))), "class", "greedy_class", text=names.__getitem__,
                        format_func=names.__getitem__)
    target = int(rows[row])
    step = st.slider("Units ablated", 0, steps, 0, key="greedy_step")
    class_acc = greedy_array(store, layer, "class_acc", row)
    held = greedy_array(store, layer, "heldout_acc", row)
    overall = greedy_array(store, layer, "overall_acc", row)
    cols = st.columns(3)
    cols[0].metric("Class accuracy (in-sample)", f"{100 * class_acc[step]:.1f}%",
                   f"{100 * (class_acc[step] - class_acc[0]):+.1f} pts", help="order chosen and scored on all of "
                   "the class's validation images: the paper's number")
    cols[1].metric("Class accuracy (held-out half)", f"{100 * held[step]:.1f}%",
                   f"{100 * (held[step] - held[0]):+.1f} pts", help="order chosen on the even-position images, "
                   "scored on the odd-position ones")
    cols[2].metric("Overall accuracy", f"{100 * overall[step]:.1f}%", f"{100 * (overall[step] - overall[0]):+.2f} pts")
    left, right = st.columns([3, 2])
    with left:
        st.subheader("Class accuracy so far")
        chart = replay_chart(store, layer, row, step)
        st.altair_chart(chart, width="stretch")
        chart_downloads(chart.properties(title=f"{store.name} {layer}: greedy ablation for {classes[target]}"),
                        f"{store.name}-{layer}-greedy-{classes[target]}-step{step}")
        st.caption(why_heldout_differs(store, target))
        st.caption("Ablated: " + (", ".join(str(u) for u in order[row, :step]) or "nothing yet"))
    with right:
        if step < steps:
            unit = int(order[row, step])
            st.subheader(f"Next: unit {unit}")
            unit_link(store, layer, unit, f"Open unit {unit}")
            show_top_images(store, layer, unit)
        else:
            st.subheader("All greedy units ablated")
        st.subheader("Other classes that lose most")
        all_class = greedy_array(store, layer, "all_class_acc", row)
        chart = losers_chart(all_class[0], all_class[step], classes, [target])
        if chart is None:
            st.caption("No other class has lost accuracy at this step.")
        else:
            st.altair_chart(chart, width="stretch")
            chart_downloads(chart, f"{store.name}-{layer}-greedy-{classes[target]}-step{step}-others")
    step_images(store, layer, row, step, target, order)


def step_images(store, layer: str, row: int, step: int, target: int, order: np.ndarray) -> None:
    """The images greedy step ``step`` breaks and fixes (their prediction with ``step`` units ablated against
    ``step - 1``), over every validation image, the greedy class's first."""
    if step == 0:
        st.subheader("Images a step changes")
        st.caption("Step 0 is the unablated network: move the slider to see the images each step breaks and fixes.")
        return
    unit = int(order[row, step - 1])
    st.subheader(f"Images step {step} changes (ablating unit {unit})")
    if not has_flips(store, layer, "greedy"):
        st.caption(f"This store does not list the images each greedy step changes (it predates them): recompute it "
                   f"with `{recompute_command(store)}`.")
        return
    show_flips(store, layer, step_flips(store, layer, row, step), [unit], f"greedy-{target}-step{step}",
               first_class=target, what=f"step {step}")


def why_heldout_differs(store, target: int) -> str:
    """Why the held-out curve can end below the in-sample one (a reader sees the crossing and suspects a bug)."""
    images = int((np.asarray(loaders.array(store.path, "images/labels")) == target).sum())
    odd = max(images // 2, 1)
    points = f"{100 / odd:.2g} point{'' if round(100 / odd, 2) == 1 else 's'}"
    return ("Why the held-out curve can end below the in-sample one: greedy adds at each step the unit that leaves "
            "the class's accuracy lowest on the images it chooses on (ties, common when accuracy moves in whole "
            "images, go to the lowest probability of the class), which makes a good order, not the best set of "
            "units. The held-out order, chosen on the other half of the images, can happen upon units that break "
            f"more, and it is scored on {odd} images (one image = {points}).")


def replay_chart(store, layer: str, row: int, step: int) -> alt.LayerChart:
    class_acc = greedy_array(store, layer, "class_acc", row)
    held = greedy_array(store, layer, "heldout_acc", row)
    random = greedy_array(store, layer, "random_class_acc")[:, row]
    steps = len(class_acc) - 1
    frames = [pd.DataFrame({"units ablated": np.arange(step + 1), "curve": "greedy, in-sample",
                            "accuracy (%)": 100 * class_acc[:step + 1]}),
              pd.DataFrame({"units ablated": np.arange(step + 1), "curve": "greedy, held-out half",
                            "accuracy (%)": 100 * held[:step + 1]})]
    if len(random):
        frames.append(pd.DataFrame({"units ablated": np.arange(steps + 1), "curve": "random order (mean)",
                                    "accuracy (%)": 100 * random.mean(0)}))
    lines = alt.Chart(pd.concat(frames)).mark_line(point=True).encode(
        x=alt.X("units ablated:Q", scale=alt.Scale(domain=[0, steps])),
        y=alt.Y("accuracy (%):Q", scale=alt.Scale(domain=[0, 100])),
        # the legend under the plot, one entry a line: beside it, or in one line under it, it cut the names short
        color=alt.Color("curve:N", legend=alt.Legend(orient="bottom", direction="vertical", title=None)),
        tooltip=["curve", "units ablated", alt.Tooltip("accuracy (%):Q", format=".1f")])
    rule = alt.Chart(pd.DataFrame({"x": [step]})).mark_rule(strokeDash=[4, 4]).encode(x=alt.X("x:Q", title=None))
    return (lines + rule).properties(height=370)  # 300 for the plot, the rest for the legend under it


# -- Fig. 4 ------------------------------------------------------------------------------------------------------
def curves(store, layer: str) -> None:
    """Fig. 4 for one store's layer: the summary at 5 and 10 units, greedy against random, and selection bias."""
    arrays = {name: greedy_array(store, layer, name) for name in
              ("classes", "class_acc", "random_class_acc", "heldout_acc", "heldout_select_acc")}
    marks, summary = drop_summary(arrays["class_acc"], arrays["heldout_acc"], arrays["random_class_acc"])
    table(pd.DataFrame(summary, index=pd.Index(marks, name="units ablated")).astype(float).round(1),
          f"{store.name}-{layer}-greedy-summary")
    st.caption("Mean class accuracy drop (points) over the classes run.")
    st.subheader("Mean class accuracy drop: greedy against random order (Fig. 4b)")
    chart, frame = greedy_against_random(arrays["class_acc"], arrays["random_class_acc"])
    st.altair_chart(chart, width="stretch")
    chart_downloads(chart.properties(title=f"{store.name} {layer}: greedy against random"),
                    f"{store.name}-{layer}-fig4b", frame)
    st.caption(f"Lines: mean over {len(arrays['classes'])} classes; bands: 25th to 75th percentile across classes. "
               f"Random order: mean over {arrays['random_class_acc'].shape[0]} seeds per class (seed r of class k: "
               "numpy default_rng((r, k))).")
    st.subheader("Selection bias: in-sample against held-out")
    chart, frame = selection_bias(arrays["class_acc"], arrays["heldout_select_acc"], arrays["heldout_acc"])
    st.altair_chart(chart, width="stretch")
    chart_downloads(chart, f"{store.name}-{layer}-selection-bias", frame)
    st.subheader("Each class's greedy curve (Fig. 4a)")
    chart, frame = class_curves(arrays["class_acc"], [store.classes[int(r)] for r in arrays["classes"]])
    st.altair_chart(chart, width="stretch")
    chart_downloads(chart, f"{store.name}-{layer}-fig4a", frame)


# -- live --------------------------------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the layer's activations and tail weights...", max_entries=2)
def _session(path: str, stamp: float, layer: str):
    from compute.live_session import load_session

    return load_session(path, layer)


def session_for(store, layer: str):
    return _session(str(store.path), loaders.mtime(store.path), layer)


def live_request(store, session) -> dict | None:
    """The widgets that say what to ablate; returns the request, or None when it is incomplete."""
    classes = list(store.classes)
    mode = st.radio("Ablate", MODES, horizontal=True, key="live_mode")
    if mode == MODES[2]:
        units = st.multiselect("Units, in the order to ablate them", range(session.units), key="live_units")
        return {"mode": mode, "group": [], "order": [int(u) for u in units], "steps": len(units)} if units else None
    if mode == MODES[0]:
        group = [st.selectbox("Class", range(len(classes)), format_func=classes.__getitem__, key="live_class")]
    else:
        group = st.multiselect("Classes (objective: their mean class accuracy)", range(len(classes)),
                               default=list(range(min(2, len(classes)))), format_func=classes.__getitem__,
                               key="live_group")
    steps = int(st.number_input("Units to ablate", 1, session.units, min(20, session.units), key="live_steps"))
    return {"mode": mode, "group": [int(c) for c in group], "order": [], "steps": steps} if group else None


def new_job(store, layer: str, session, request: dict) -> dict:
    job = dict(request, store=str(store.path), layer=layer, running=True, result=None, seconds=0.0, state=None)
    if request["mode"] != MODES[2]:
        job["state"] = session.start_greedy(request["group"])
    return job


def job_order(job: dict) -> list[int]:
    return list(job["state"].chosen) if job["state"] is not None else list(job["order"])


def run_job(job: dict, session) -> None:
    """Advance the job one unit at a time; progress lives in session_state, so a Stop (a rerun) keeps it."""
    state = job["state"]
    if state is not None:
        bar = st.progress(len(state.chosen) / job["steps"], text="choosing units")
        while len(state.chosen) < job["steps"]:
            started = time.perf_counter()
            unit = session.advance(state)
            job["seconds"] += time.perf_counter() - started
            bar.progress(len(state.chosen) / job["steps"],
                         text=f"step {len(state.chosen)}/{job['steps']}: unit {unit}, objective "
                              f"{100 * state.scores[-1]:.1f}%")
    finish(job, session)


def finish(job: dict, session) -> None:
    with st.spinner("Scoring the ablated units on every class"):
        started = time.perf_counter()
        class_acc, overall, predictions = session.path_outcome(job_order(job))
        job["seconds"] += time.perf_counter() - started
    job["result"] = {"class_acc": class_acc, "overall_acc": overall,
                     "predictions": predictions.numpy().astype(np.int32)}  # [steps + 1, images]
    job["running"] = False


def show_job(store, job: dict) -> None:
    classes = list(store.classes)
    order, result = job_order(job), job["result"]
    class_acc, overall = result["class_acc"], result["overall_acc"]
    group = job["group"]
    cols = st.columns(3)
    cols[0].metric("Units ablated", len(order), help=f"took {job['seconds']:.1f} s")
    if group:
        objective = np.asarray(job["state"].scores)
        label = f"Accuracy of {classes[group[0]]}" if len(group) == 1 else "Mean accuracy of the group"
        cols[1].metric(label, f"{100 * objective[-1]:.1f}%",
                       f"{100 * (objective[-1] - objective[0]):+.1f} pts")
    cols[2].metric("Overall accuracy", f"{100 * overall[-1]:.1f}%", f"{100 * (overall[-1] - overall[0]):+.2f} pts")
    frame = pd.DataFrame({"step": np.arange(len(order) + 1), "unit": pd.array([None] + order, dtype="Int64"),
                          "overall accuracy (%)": 100 * overall})
    if group:
        frame["group accuracy (%)"] = 100 * class_acc[:, group].mean(1)
    frame["unit page"] = [None] + [unit_url(store, job["layer"], u) for u in order]
    left, right = st.columns([3, 2])
    with left:
        long = frame.drop(columns=["unit", "unit page"]).melt("step", var_name="curve", value_name="accuracy (%)")
        chart = alt.Chart(long).mark_line(point=True).encode(
            x="step:Q", y=alt.Y("accuracy (%):Q", scale=alt.Scale(domain=[0, 100])), color="curve:N",
            tooltip=["curve", "step", alt.Tooltip("accuracy (%):Q", format=".1f")]).properties(height=300)
        st.altair_chart(chart, width="stretch")
        chart_downloads(chart, f"{store.name}-{job['layer']}-live")
        table(frame, f"{store.name}-{job['layer']}-live-steps", hide_index=True, column_config={
            "unit page": st.column_config.LinkColumn("unit page", display_text="open")})
    with right:
        st.subheader("Classes that lose most")
        chart = losers_chart(class_acc[0], class_acc[-1], classes, group)
        if chart is None:
            st.caption("No other class lost accuracy.")
        else:
            st.altair_chart(chart, width="stretch")
            chart_downloads(chart, f"{store.name}-{job['layer']}-live-others")
    live_images(store, job)


def live_images(store, job: dict) -> None:
    """The images the ablated set changes, computed on the spot: every image's prediction with nothing ablated
    against that with the first s units of the set ablated (s chosen, all of them by default)."""
    order, predictions = job_order(job), job["result"].get("predictions")
    if predictions is None or not order:
        return
    st.subheader("Images the ablated units change")
    count = len(order)
    if count > 1:
        if not 1 <= st.session_state.get("live_flip_step", 1) <= count:  # kept from a longer set
            del st.session_state["live_flip_step"]
        count = st.slider("With the first units of the set ablated", 1, len(order), len(order), key="live_flip_step")
    group = job["group"]
    show_flips(store, job["layer"], changed(predictions[0], predictions[count]), [int(u) for u in order[:count]],
               f"live-{count}", first_class=group[0] if group else None,
               what=f"ablating unit{'s' if count > 1 else ''} {', '.join(map(str, order[:count]))}")


def save_job(store, job: dict, name: str) -> None:
    """Write the live result under layers/<L>/greedy_live/<name>/ (copy, write, rename: readers never see half)."""
    import json

    from store.writer import amend, write_array

    order, result = job_order(job), job["result"]
    group = layer_path(job['layer'], "greedy_live", name)
    with amend(store.path) as h5:
        if group in h5:
            del h5[group]
        write_array(h5, f"{group}/order", np.asarray(order, np.int64))
        write_array(h5, f"{group}/class_acc", result["class_acc"].astype(np.float32))
        write_array(h5, f"{group}/overall_acc", result["overall_acc"].astype(np.float32))
        if job["state"] is not None:
            write_array(h5, f"{group}/objective_acc", np.asarray(job["state"].scores, np.float32))
        attrs = h5[group].attrs
        attrs["mode"] = job["mode"]
        attrs["classes"] = json.dumps(job["group"])
        attrs["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")


def saved_runs(store, layer: str) -> None:
    prefix = layer_path(layer, "greedy_live") + "/"
    names = sorted({p[len(prefix):].split("/")[0] for p in store.contents if p.startswith(prefix)})
    if not names:
        return
    with st.expander(f"Saved live runs ({len(names)})"):
        name = st.selectbox("Saved run", names, key="live_saved")
        overall = loaders.array(store.path, f"{prefix}{name}/overall_acc")
        order = loaders.array(store.path, f"{prefix}{name}/order")
        info = store.read_attrs(f"{prefix}{name}")
        st.caption(f"{info.get('mode', '')} · classes {info.get('classes', '[]')} · units {order.tolist()} · "
                   f"overall accuracy {100 * overall[0]:.1f}% -> {100 * overall[-1]:.1f}%")


def live(store) -> None:
    layers = [layer for layer in store.layers if store.has(layer_path(layer, "live", "acts"))]
    if not layers:
        try:
            store.require(store.layers[-1] if store.layers else "?", "live")
        except StoreError as error:
            st.warning(str(error))
        return
    from compute.live_session import live_memory_budget  # imports torch: only on a store with live data

    layer = st.selectbox("Layer (layers with live data)", layers, index=len(layers) - 1, key="live_layer")
    size = int(np.prod(store.shape(layer_path(layer, "live", "acts")))) * 4
    held = size <= live_memory_budget()
    where = f"{size / 2**20:,.0f} MB in memory" if held else f"{size / 2**30:,.1f} GB, read from the store as needed"
    if not st.toggle(f"Load {layer}'s activations for live work ({where})", key="live_on",
                     help="Layers up to the live-memory budget ($UNIT_ABLATION_LIVE_MEMORY GB, default 2) are held by "
                          "the app process while any session uses them; larger ones are read a class at a time, and "
                          "a finished path's accuracy streams every image."):
        return
    session = session_for(store, layer)
    request = live_request(store, session)
    run_col, stop_col, more_col = st.columns(3)
    job = st.session_state.get("greedy_live")
    if job is not None and (job["store"], job["layer"]) != (str(store.path), layer):
        job = None
    if run_col.button("Run", type="primary", key="live_run", disabled=request is None):
        job = st.session_state["greedy_live"] = new_job(store, layer, session, request)
    if stop_col.button("Stop", key="live_stop", disabled=not (job and job["running"])):
        finish(job, session)
    resumable = job is not None and job["state"] is not None and len(job["state"].chosen) < job["steps"]
    if more_col.button("Continue", key="live_continue", disabled=not (resumable and not job["running"])):
        job["running"] = True
    if job is not None and job["running"]:
        run_job(job, session)
    if job is not None and job["result"] is not None:
        show_job(store, job)
        name = st.text_input("Name to save it under", key="live_name",
                             placeholder="letters, digits, . _ -")
        if st.button("Save into the store", key="live_save"):
            if not NAME.match(name or ""):
                st.error("Give a name of letters, digits, '.', '_' or '-' (up to 64 characters).")
            else:
                save_job(store, job, name)
                st.success(f"Saved under layers/{layer}/greedy_live/{name} in {store.path.name}.")
    saved_runs(store, layer)


# -- page --------------------------------------------------------------------------------------------------------
def render() -> None:
    store = current_store()
    if store is None:
        return
    st.title("Greedy unit ablation")
    replay_tab, curves_tab, live_tab = st.tabs(["Replay a class", "Greedy vs random (Fig. 4)", "Live ablation"])
    with replay_tab:
        layer = choose_layer(store, "greedy", key="greedy_layer")
        if layer is not None:
            replay(store, layer)
    with curves_tab:
        if layer is not None:
            side_by_side(store, layer, "greedy", curves)
        else:
            st.caption("Needs the greedy results (see the first tab).")
    with live_tab:
        live(store)


guarded(render)
