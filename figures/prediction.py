"""Table 1: how well each attribute predicts the class a unit matters most for, against chance."""

from __future__ import annotations

import altair as alt
import pandas as pd

CONFIDENCE = 0.95


def table_frame(table: dict) -> pd.DataFrame:
    level = int(round(100 * table.get("confidence", CONFIDENCE)))
    return pd.DataFrame([{"attribute": row["attribute"], "accuracy (%)": 100 * row["accuracy"],
                          f"{level}% CI low (%)": 100 * row["ci"][0], f"{level}% CI high (%)": 100 * row["ci"][1],
                          "correct": row["correct"], "test units": row["n_test"]} for row in table["rows"]])


def accuracy_chart(table: dict) -> alt.LayerChart:
    """Accuracy per attribute with its interval, against the two chance levels."""
    frame = pd.DataFrame([{"attribute": r["attribute"], "accuracy": 100 * r["accuracy"], "low": 100 * r["ci"][0],
                           "high": 100 * r["ci"][1]} for r in table["rows"]])
    chance = pd.DataFrame({"level": ["most frequent class", "uniform guess"],
                           "accuracy": [100 * table["chance_majority"], 100 * table["chance_uniform"]]})
    order = list(frame["attribute"])
    bars = alt.Chart(frame).mark_bar(color="#4c78a8").encode(
        x=alt.X("attribute:N", sort=order, title=None), y=alt.Y("accuracy:Q", title="test accuracy (%)"),
        tooltip=["attribute:N", alt.Tooltip("accuracy:Q", format=".1f")])
    errors = alt.Chart(frame).mark_errorbar(ticks=True).encode(
        x=alt.X("attribute:N", sort=order), y=alt.Y("low:Q", title="test accuracy (%)"), y2="high:Q")
    rules = alt.Chart(chance).mark_rule(strokeDash=[5, 3]).encode(
        y="accuracy:Q", color=alt.Color("level:N", title="chance"))
    return (bars + errors + rules).properties(height=320)
