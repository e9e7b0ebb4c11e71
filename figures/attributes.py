"""Fig. 5: each scalar unit attribute against the overall drop and the max class drop, with the correlation table."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd

from compute.analysis.relations import in_paper_sign

PANEL = 170
PAPER_SIGN_COLUMN = "paper's sign"


def unit_frame(attributes: dict, targets: dict, class_drop: np.ndarray, classes: list[str]) -> pd.DataFrame:
    """One row per unit: its scalar attributes, its drops in percentage points, and the class it hurts most."""
    frame = pd.DataFrame({"unit": np.arange(len(class_drop))})
    for name, values in attributes.items():
        frame[name] = values
    for name, values in targets.items():
        frame[name] = 100 * values
    hurt = class_drop.max(1) > 0  # a unit whose ablation lowers no class hurts none (argmax would say class 0)
    frame["most hurt class"] = np.where(hurt, np.array(classes, dtype=object)[class_drop.argmax(1)], "none")
    return frame


def coefficient_frame(table: dict, confidence: float) -> pd.DataFrame:
    """One row per attribute and drop: Pearson r; PAPER_SIGN_COLUMN, that r as the paper's Fig. 5 would report it
    (its drop is ablated minus baseline: ``compute.analysis.relations.in_paper_sign``); r's interval and p-value; then
    Spearman's rho, its interval and p-value. Computed from the stored coefficients, which keep this tool's sign."""
    rows = []
    for i, attribute in enumerate(table["attributes"]):
        for j, target in enumerate(table["targets"]):
            row = {"attribute": attribute, "against": target}
            for method, symbol in (("pearson", "Pearson r"), ("spearman", "Spearman ρ")):
                low, high = table[f"{method}_ci"][i, j]
                row[symbol] = table[f"{method}_r"][i, j]
                if method == "pearson":
                    row[PAPER_SIGN_COLUMN] = float(in_paper_sign(row[symbol]))
                row[f"{symbol} {round(100 * confidence)}% CI"] = "" if np.isnan(low) else f"[{low:.2f}, {high:.2f}]"
                row[f"{symbol} p"] = table[f"{method}_p"][i, j]
            rows.append(row)
    return pd.DataFrame(rows)


def _lookup(table: dict, attribute: str, target: str, key: str) -> float:
    i = list(table["attributes"]).index(attribute)
    j = list(table["targets"]).index(target)
    return float(table[key][i, j])


def _title(r: float, rho: float) -> str:
    """Panel title; a constant attribute or drop (e.g. no unit changes accuracy) has no coefficient."""
    fmt = lambda v: "n/a" if np.isnan(v) else f"{v:.2f}"  # noqa: E731
    return f"r = {fmt(r)}, ρ = {fmt(rho)}"


def scatter_grid(frame: pd.DataFrame, attributes: list[str], targets: list[str], table: dict,
                 interactive: bool = True) -> alt.VConcatChart:
    """Fig. 5 transposed: a row per attribute, a panel per drop (the paper's 2 x 4 grid is 7 panels wide here and
    would be cut off on a laptop screen; two columns fit any page); one brush and one click selection shared by all
    panels."""
    brush = alt.selection_interval(name="brush")
    colour = alt.condition(brush, alt.value("#1f77b4"), alt.value("#d0d0d0")) if interactive else alt.value("#1f77b4")
    pick = alt.selection_point(name="pick", fields=["unit"], on="click")
    rows = []
    for attribute in attributes:
        panels = []
        for target in targets:
            r, rho = _lookup(table, attribute, target, "pearson_r"), _lookup(table, attribute, target, "spearman_r")
            panels.append(alt.Chart(frame).mark_circle(size=28, opacity=0.8).encode(
                x=alt.X(f"{attribute}:Q", title=attribute, scale=alt.Scale(zero=False)),
                y=alt.Y(f"{target}:Q", title=f"{target} (pts)"),
                color=colour,
                tooltip=["unit:Q", alt.Tooltip(f"{attribute}:Q", format=".3f"),
                         alt.Tooltip(f"{target}:Q", format=".2f"), "most hurt class:N"],
            ).add_params(*((brush, pick) if interactive else ())).properties(
                width=PANEL, height=PANEL, title=_title(r, rho)))
        rows.append(alt.hconcat(*panels))
    return alt.vconcat(*rows)


