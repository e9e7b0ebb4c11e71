"""Fig. 4: greedy ablation curves per class, greedy against random order, and the selection-bias check."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


def band_frame(curves: np.ndarray, label: str) -> pd.DataFrame:
    """Mean over classes and the interquartile band across classes of [K, S+1] drops (points)."""
    return pd.DataFrame({"units ablated": np.arange(curves.shape[1]), "curve": label,
                         "mean": 100 * curves.mean(0), "low": 100 * np.percentile(curves, 25, axis=0),
                         "high": 100 * np.percentile(curves, 75, axis=0)})


def random_drop(random_acc: np.ndarray) -> np.ndarray:
    """[Kg, S+1] class drops of the random orders ([R, Kg, S+1] accuracies), averaged over seeds."""
    return (random_acc[:, :, :1] - random_acc).mean(0)


def drop_summary(class_acc: np.ndarray, heldout_acc: np.ndarray, random_acc: np.ndarray):
    """The steps shown (5, 10 and the last) and the mean class drop (points) at each: greedy in-sample (the paper's
    number), greedy scored on the held-out half, and random order."""
    steps = class_acc.shape[1] - 1
    marks = sorted({n for n in (5, 10) if n < steps} | {steps})
    summary = {"greedy, in-sample (paper)": 100 * (class_acc[:, :1] - class_acc)[:, marks].mean(0),
               "greedy, held-out half": 100 * (heldout_acc[:, :1] - heldout_acc)[:, marks].mean(0)}
    if len(random_acc):
        summary["random order"] = 100 * random_drop(random_acc)[:, marks].mean(0)
    return marks, summary


def greedy_against_random(class_acc: np.ndarray, random_acc: np.ndarray) -> tuple[alt.LayerChart, pd.DataFrame]:
    """Fig. 4b: mean class drop with its interquartile band across classes, greedy order against random order."""
    frames = [band_frame(class_acc[:, :1] - class_acc, "greedy")]
    if len(random_acc):
        frames.append(band_frame(random_drop(random_acc), "random order"))
    frame = pd.concat(frames, ignore_index=True)
    base = alt.Chart(frame).encode(x=alt.X("units ablated:Q"), color=alt.Color("curve:N"))
    band = base.mark_area(opacity=0.2).encode(y=alt.Y("low:Q", title="class accuracy drop (points)"), y2="high:Q")
    line = base.mark_line(point=True).encode(y="mean:Q", tooltip=["curve", "units ablated",
                                                                  alt.Tooltip("mean:Q", format=".1f")])
    return (band + line).properties(height=320), frame


def selection_bias(class_acc: np.ndarray, select_acc: np.ndarray, heldout_acc: np.ndarray):
    """Mean class drop when the order is chosen and scored on the same images against scored on held-out ones."""
    frame = pd.concat([
        band_frame(class_acc[:, :1] - class_acc, "chosen and scored on all images (paper)"),
        band_frame(select_acc[:, :1] - select_acc, "chosen and scored on the even half"),
        band_frame(heldout_acc[:, :1] - heldout_acc, "chosen on the even half, scored on the odd half"),
    ], ignore_index=True)
    chart = alt.Chart(frame).mark_line(point=True).encode(
        x="units ablated:Q", y=alt.Y("mean:Q", title="mean class accuracy drop (points)"),
        color=alt.Color("curve:N", legend=alt.Legend(orient="bottom", columns=1)),
        tooltip=["curve", "units ablated", alt.Tooltip("mean:Q", format=".1f")]).properties(height=320)
    return chart, frame


def class_curves(class_acc: np.ndarray, names: list[str]) -> tuple[alt.Chart, pd.DataFrame]:
    """Fig. 4a: every class's accuracy as its greedy units are ablated one by one."""
    steps = class_acc.shape[1] - 1
    frame = pd.DataFrame({"class": np.repeat(names, steps + 1), "units ablated": np.tile(np.arange(steps + 1), len(names)),
                          "accuracy (%)": 100 * class_acc.ravel()})
    chart = alt.Chart(frame).mark_line(opacity=0.6).encode(
        x="units ablated:Q", y="accuracy (%):Q", color=alt.Color("class:N", legend=None),
        tooltip=["class", "units ablated", alt.Tooltip("accuracy (%):Q", format=".1f")]).properties(height=320)
    return chart, frame
