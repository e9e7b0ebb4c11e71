"""Network Dissection summaries: detector units (best-concept IoU above a threshold) by concept, layer and category."""

from __future__ import annotations

import altair as alt
import numpy as np
import pandas as pd


UNION_RULE_NOTES = {
    "image": "image presence: a unit's active area joins a category's union on every image that carries a label of "
             "that category, whichever index.csv column holds it",
    "pixel": "pixel contact, as NetDissect-Lite: a unit's active area joins a category's union on the images where it "
             "touches a label of that category",
}


def union_rule_sentence(rule) -> str:
    """One sentence naming the union rule a store's IoUs were counted under (the ``union_rule`` attribute; stores
    written before it existed counted by index.csv column, which could put IoU above 1)."""
    if rule is None:
        return ("IoU union rule: image presence by index.csv column (before the fix): where a label sat in another "
                "category's column its overlap counted but the unit's active area did not, which inflates IoU; "
                "recompute the store to count by the labels present.")
    rule = rule.decode() if isinstance(rule, bytes) else str(rule)
    return f"IoU union rule: {UNION_RULE_NOTES.get(rule, rule)}."


def detector_frame(best: np.ndarray, best_iou: np.ndarray, names, categories, threshold: float) -> pd.DataFrame:
    """One row per detector unit (best-concept IoU above ``threshold``): unit, concept, category, IoU."""
    units = np.flatnonzero(best_iou > threshold)
    return pd.DataFrame({"unit": units, "concept": [str(names[best[u]]) for u in units],
                         "category": [str(categories[best[u]]) for u in units], "IoU": best_iou[units]})


def concept_table(detectors: pd.DataFrame) -> pd.DataFrame:
    """Detectors grouped by concept: how many units, which ones (best IoU first), their best IoU."""
    if detectors.empty:
        return pd.DataFrame(columns=["concept", "category", "units", "unit list", "best IoU"])
    rows = []
    for (concept, category), group in detectors.groupby(["concept", "category"], sort=False):
        ranked = group.sort_values("IoU", ascending=False)
        rows.append({"concept": concept, "category": category, "units": len(group),
                     "unit list": ", ".join(str(u) for u in ranked["unit"]), "best IoU": float(ranked["IoU"].iloc[0])})
    return pd.DataFrame(rows).sort_values(["units", "best IoU"], ascending=False, ignore_index=True)


def counts_chart(counts: pd.DataFrame, layers: list[str]) -> alt.Chart:
    return alt.Chart(counts).mark_bar().encode(
        x=alt.X("layer:N", sort=layers, title=None),
        y=alt.Y("units:Q", title="detector units"),
        color=alt.Color("category:N"),
        xOffset="category:N",
        tooltip=["layer", "category", "units"],
    ).properties(height=300)


def category_counts(detectors: dict) -> pd.DataFrame:
    """Detector units per layer and category (layer, category, units) from {layer: detector_frame(...)}."""
    frames = []
    for layer, found in detectors.items():
        counts = found.groupby("category").size()
        frames.append(pd.DataFrame({"layer": layer, "category": counts.index, "units": counts.values}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["layer", "category", "units"])
