"""Fig. 3: a layer's units sorted by their max class accuracy drop, with the overall and min class drop beside it."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

CURVES = ["max class drop", "overall drop", "min class drop"]


def curve_frame(class_drop: np.ndarray, overall: np.ndarray) -> pd.DataFrame:
    """Long table of the three curves over units ranked by max class drop (drops in percentage points)."""
    max_drop = class_drop.max(1)
    order = np.argsort(-max_drop, kind="stable")
    rank = np.arange(len(order))
    series = dict(zip(CURVES, (max_drop[order], overall[order], class_drop.min(1)[order])))
    frames = [pd.DataFrame({"rank": rank, "unit": order, "curve": name, "drop (%)": 100 * values})
              for name, values in series.items()]
    return pd.concat(frames, ignore_index=True)


def curve_chart(frame: pd.DataFrame, title: str | None = None, pick=None) -> alt.Chart:
    """The three curves; ``pick`` (a point selection on ``unit``) makes points clickable in the app."""
    chart = alt.Chart(frame).mark_line(point=alt.OverlayMarkDef(size=25)).encode(
        x=alt.X("rank:Q", title="units sorted by max class drop"),
        y=alt.Y("drop (%):Q", title="accuracy drop (points)"),
        color=alt.Color("curve:N", sort=CURVES),
        tooltip=["unit:Q", "curve:N", alt.Tooltip("drop (%):Q", format=".2f")],
    ).properties(height=380)
    if pick is not None:
        chart = chart.add_params(pick)
    return chart.properties(title=title) if title else chart


def median_ratio(class_drop: np.ndarray, overall: np.ndarray, num_images: int) -> float:
    """Median over units of max class drop / |overall drop|, the overall drop floored at one image."""
    return float(np.median(class_drop.max(1) / np.maximum(np.abs(overall), 1.0 / max(1, num_images))))
