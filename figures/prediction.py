"""Table 1: how well each attribute predicts the class a unit matters most for, scored strictly and leniently, against
chance.

A table read back from a store written before the strict score and the bootstrap intervals existed has None for them:
the frame shows "—" there, the chart draws the lenient bars with the stored Wilson intervals only.
"""

from __future__ import annotations

import altair as alt
import pandas as pd

CONFIDENCE = 0.95
MISSING = "—"
SCORES = ("strict", "lenient")
COLORS = {"strict": "#4c78a8", "lenient": "#9ecae9"}
PAPER_NOTE = ("The paper's Table 1 does not say how it scores ties: its label is \"the index of the class which has "
              "the largest accuracy drop\".")


def _level(table: dict) -> int:
    return int(round(100 * table.get("confidence", CONFIDENCE)))


def _count(table: dict, key: str, what: str) -> str:
    n = len(table.get(key, ()))
    return f"{n} {what}{'' if n == 1 else 's'}"


def interval_note(table: dict) -> str:
    """How the intervals were obtained, in one sentence."""
    level, method = _level(table), table.get("interval_method")
    resamples = f"{table.get('n_resamples')} resamples, seed {table.get('seed')}"
    if method == "cluster bootstrap":
        return (f"Intervals: {level}% percentile intervals of a two-level bootstrap that resamples the "
                f"{_count(table, 'test_stores', 'test network')} with replacement, then the units within each "
                f"({resamples}).")
    if method == "per-unit bootstrap":
        return (f"Intervals: {level}% per-unit bootstrap: with one test network only its units are resampled "
                f"({resamples}), so the interval leaves out how much another network would differ.")
    return (f"Intervals: {level}% Wilson intervals over units (per-unit), lenient score only: this table was stored "
            f"before the strict score and the bootstrap intervals ({MISSING}); run `python -m compute.predict` again "
            f"to add them.")


def scoring_notes(table: dict) -> list[str]:
    """The sentences that say how each score is counted, over which units, where the intervals come from, and that
    the paper leaves ties open."""
    tied = sum(table.get("tied", {}).get(name, 0) for name in table.get("test_stores", ()))
    return [
        "Strict: a prediction counts only if it is the class whose accuracy drops most when the unit is ablated, the "
        "lowest class index where several classes tie (numpy's argmax). Lenient: it counts if it is any of the "
        f"classes tied for the largest drop ({tied} test units have such ties).",
        f"Units counted: both scores count each of the {table['n_test']} test units once; the "
        f"{table.get('n_excluded', MISSING)} test units whose ablation lowers no class's accuracy (largest class "
        "drop ≤ 0) have no class to predict and are excluded, from training too.",
        interval_note(table),
        PAPER_NOTE,
    ]


def _intervals(table: dict) -> tuple[str, str]:
    """(the lenient interval's row key, its name in column headers): the bootstrap where stored, else Wilson."""
    if all(row.get("bootstrap_ci") is not None for row in table["rows"]):
        return "bootstrap_ci", "CI"
    return "ci", "Wilson CI"


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns holding a missing value become text with "—" for it (one decimal for the numbers)."""
    for column in frame.columns:
        if frame[column].isna().any():
            frame[column] = [MISSING if pd.isna(v) else f"{v:.1f}" if isinstance(v, float) else str(v)
                             for v in frame[column]]
    return frame


def table_frame(table: dict) -> pd.DataFrame:
    """One row per attribute: strict and lenient accuracy side by side, each with its interval, and the counts."""
    level = _level(table)
    key, name = _intervals(table)

    def pct(value):
        return None if value is None else 100 * value

    records = []
    for row in table["rows"]:
        strict_ci, lenient_ci = row.get("strict_ci") or (None, None), row.get(key) or (None, None)
        records.append({
            "attribute": row["attribute"],
            "strict accuracy (%)": pct(row.get("strict_accuracy")),
            f"strict {level}% CI low (%)": pct(strict_ci[0]), f"strict {level}% CI high (%)": pct(strict_ci[1]),
            "lenient accuracy (%)": pct(row["accuracy"]),
            f"lenient {level}% {name} low (%)": pct(lenient_ci[0]),
            f"lenient {level}% {name} high (%)": pct(lenient_ci[1]),
            "strict correct": row.get("strict_correct"), "lenient correct": row["correct"],
            "test units": row["n_test"],
        })
    frame = pd.DataFrame(records)
    return _shown(frame.astype({c: "object" for c in frame.columns if frame[c].isna().any()}))


def accuracy_chart(table: dict) -> alt.LayerChart:
    """Strict and lenient accuracy per attribute with their intervals, side by side, against the chance levels."""
    key, _ = _intervals(table)
    bars = []
    for row in table["rows"]:
        for score, accuracy, ci in (("strict", row.get("strict_accuracy"), row.get("strict_ci")),
                                    ("lenient", row["accuracy"], row.get(key))):
            if accuracy is not None:
                bars.append({"attribute": row["attribute"], "score": score, "accuracy": 100 * accuracy,
                             "low": None if ci is None else 100 * ci[0], "high": None if ci is None else 100 * ci[1]})
    frame = pd.DataFrame(bars)
    chance = pd.DataFrame([{"level": level, "score": score, "accuracy": 100 * value}
                           for level, prefix in (("most frequent class", "chance_majority"),
                                                 ("uniform guess", "chance_uniform"))
                           for score, value in (("strict", table.get(f"strict_{prefix}")),
                                                ("lenient", table.get(prefix))) if value is not None])
    order = list(dict.fromkeys(frame["attribute"]))
    scores = [s for s in SCORES if s in set(frame["score"])]
    x = alt.X("attribute:N", sort=order, title=None)
    offset = alt.XOffset("score:N", sort=scores)
    color = alt.Color("score:N", sort=scores, title="score",
                      scale=alt.Scale(domain=scores, range=[COLORS[s] for s in scores]))
    bar = alt.Chart(frame).mark_bar().encode(
        x=x, xOffset=offset, color=color, y=alt.Y("accuracy:Q", title="test accuracy (%)"),
        tooltip=["attribute:N", "score:N", alt.Tooltip("accuracy:Q", format=".1f"), alt.Tooltip("low:Q", format=".1f"),
                 alt.Tooltip("high:Q", format=".1f")])
    errors = alt.Chart(frame).mark_errorbar(ticks=True).encode(
        x=x, xOffset=offset, y=alt.Y("low:Q", title="test accuracy (%)"), y2="high:Q")
    rules = alt.Chart(chance).mark_rule().encode(
        y="accuracy:Q", color=alt.Color("level:N", title="chance", scale=alt.Scale(scheme="set2")),
        strokeDash=alt.StrokeDash("score:N", sort=scores, title="chance, scored"),
        tooltip=["level:N", "score:N", alt.Tooltip("accuracy:Q", format=".1f")])
    shown = "strict and lenient accuracy" if "strict" in scores else f"lenient accuracy (strict: {MISSING})"
    title = alt.TitleParams(f"Table 1, {table['layer']}: {shown}", anchor="start",
                            subtitle=["strict: only the largest-drop class, the lowest class index on ties; "
                                      "lenient: any tied class",
                                      f"{table['n_test']} test units; {table.get('n_excluded', MISSING)} with no "
                                      "positive drop excluded",
                                      _short_interval(table),
                                      "the paper's Table 1 does not say how it scores ties"])
    return (bar + errors + rules).resolve_scale(color="independent").properties(height=320, title=title)


def _short_interval(table: dict) -> str:
    level, method = _level(table), table.get("interval_method")
    if method == "cluster bootstrap":
        return f"bars: {level}% CI, bootstrap over test networks then units ({table.get('n_resamples')} resamples)"
    if method == "per-unit bootstrap":
        return f"bars: {level}% CI, per-unit bootstrap (one test network)"
    return f"bars: {level}% Wilson CI over units (per-unit); stored before the strict score"
