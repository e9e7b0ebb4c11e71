"""Fig. 3: a layer's units sorted by their max class accuracy drop, with the overall and min class drop beside it."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

CURVES = ["max class drop", "overall drop", "min class drop"]


def curve_frame(class_drop: np.ndarray, overall: np.ndarray, significant: np.ndarray | None = None) -> pd.DataFrame:
    """Long table of the three curves over units ranked by max class drop (drops in percentage points);
    ``significant`` [U] marks units with at least one significant class drop (column left out when None)."""
    max_drop = class_drop.max(1)
    order = np.argsort(-max_drop, kind="stable")
    rank = np.arange(len(order))
    series = dict(zip(CURVES, (max_drop[order], overall[order], class_drop.min(1)[order])))
    frames = [pd.DataFrame({"rank": rank, "unit": order, "curve": name, "drop (%)": 100 * values})
              for name, values in series.items()]
    frame = pd.concat(frames, ignore_index=True)
    if significant is not None:
        frame["significant class drop"] = np.asarray(significant, bool)[frame["unit"].to_numpy()]
    return frame


def curve_chart(frame: pd.DataFrame, title: str | None = None, pick=None) -> alt.Chart:
    """The three curves; ``pick`` (a point selection on ``unit``) makes points clickable in the app."""
    marked = "significant class drop" in frame
    tooltip = ["unit:Q", "curve:N", alt.Tooltip("drop (%):Q", format=".2f")]
    base = alt.Chart(frame).encode(
        x=alt.X("rank:Q", title="units sorted by max class drop"),
        y=alt.Y("drop (%):Q", title="accuracy drop (points)"),
        color=alt.Color("curve:N", sort=CURVES),
        tooltip=tooltip + (["significant class drop:N"] if marked else []))
    if marked:  # max class drop: filled and larger where the unit has a significant class drop, hollow elsewhere
        shown = "datum.curve !== 'max class drop' || datum['significant class drop']"
        points = base.mark_point().encode(
            fill=alt.condition(shown, alt.Color("curve:N", sort=CURVES), alt.value("white")),
            size=alt.condition("datum.curve === 'max class drop' && datum['significant class drop']", alt.value(70),
                               alt.value(20)))
    else:
        points = base.mark_point(size=25, filled=True)
    if pick is not None:
        points = points.add_params(pick)
    chart = (base.mark_line() + points).properties(height=380)
    return chart.properties(title=title) if title else chart


def median_ratio(class_drop: np.ndarray, overall: np.ndarray, num_images: int) -> float:
    """Median over units of max class drop / |overall drop|, the overall drop floored at one image."""
    return float(np.median(class_drop.max(1) / np.maximum(np.abs(overall), 1.0 / max(1, num_images))))


def significance_counts(class_drop: np.ndarray, q_value: np.ndarray | None, overall: np.ndarray,
                        overall_q: np.ndarray | None, level: float) -> dict:
    """Per layer: units, units with at least one significant class drop, units with a significant overall drop (a
    drop is significant when positive with q below ``level``; None where the store predates the tests)."""
    from compute.analysis.significance import significant_drops

    return {"units": len(overall),
            "units with a significant class drop": None if q_value is None else
            int(significant_drops(q_value, class_drop, level).any(1).sum()),
            "units with a significant overall drop": None if overall_q is None else
            int(significant_drops(overall_q, overall, level).sum())}
