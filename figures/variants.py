"""Figs. 8 and 9: several networks (instances, batch norm, dropout) side by side."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


def sorted_max_drops(class_drops: dict) -> pd.DataFrame:
    """Long table (store, layer, rank, max class drop in points, largest first) from {(store, layer): [U, K] drops}."""
    frames = [pd.DataFrame({"store": name, "layer": layer, "rank": np.arange(len(drop)),
                            "max class drop": -np.sort(-drop.max(1)) * 100})
              for (name, layer), drop in class_drops.items()]
    return pd.concat(frames, ignore_index=True)


def max_drop_chart(frame: pd.DataFrame, stores: list[str], layers: list[str]) -> alt.FacetChart:
    """Fig. 8: per layer, each store's units sorted by max class drop (a long frame: store, layer, rank, drop)."""
    return alt.Chart(frame).mark_line().encode(
        x=alt.X("rank:Q", title="units sorted by max class drop"),
        y=alt.Y("max class drop:Q", title="max class accuracy drop (points)"),
        color=alt.Color("store:N", sort=stores),
        tooltip=["store:N", "layer:N", "rank:Q", alt.Tooltip("max class drop:Q", format=".2f")],
    ).properties(height=300, width=300).facet(column=alt.Column("layer:N", sort=layers, title=None)).resolve_scale(
        x="independent")


def detector_chart(counts: pd.DataFrame, stores: list[str], layers: list[str]) -> alt.FacetChart:
    """Fig. 9: interpretable units (best-concept IoU above a threshold) per store and layer."""
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("store:N", sort=stores, title=None), y=alt.Y("detectors:Q", title="units above threshold"),
        color=alt.Color("store:N", sort=stores, legend=None),
        tooltip=["store:N", "layer:N", "detectors:Q", "units:Q"]).properties(width=160, height=260).facet(
        column=alt.Column("layer:N", sort=layers))
