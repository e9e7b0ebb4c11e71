"""The sidebar's provenance panel: where a store comes from, and each stage's own settings."""

from __future__ import annotations

import json

import pandas as pd
import streamlit as st

PROVENANCE_KEYS = ("model", "description", "weights_sha256", "data_fingerprint", "num_images", "num_classes",
                   "device", "precision", "code_version", "completed", "ablation_note")


def stage_rows(records: dict[str, dict]) -> pd.DataFrame:
    """One row per stage: its options (those that change its result), when it finished, how long it took, the process's
    peak resident memory during it and the part of that the stage added."""
    rows = []
    for name, record in records.items():
        options = record.get("options") or {}
        rows.append({
            "stage": name,
            "options": ", ".join(f"{key}={json.dumps(value)}" for key, value in options.items()) or "—",
            "finished": record.get("finished", ""),
            "seconds": record.get("seconds"),
            "peak MiB": record.get("host_mib", record.get("device_mib")),
            # what the stage itself added above the process's level when it began (records since start_mib)
            "own MiB": (round(record["host_mib"] - record["start_mib"], 1)
                        if "start_mib" in record and "host_mib" in record else None),
            "note": (f"skipped: {record['skipped']}" if record.get("skipped") else
                     f"time of one pass for {len(record['shared']) + 1} layers" if record.get("shared") else ""),
        })
    return pd.DataFrame(rows, columns=["stage", "options", "finished", "seconds", "peak MiB", "own MiB", "note"])


def show(info) -> None:
    """Provenance attributes, then the stage table (stores written before per-stage records show finish times)."""
    with st.sidebar.expander("Provenance"):
        for key in PROVENANCE_KEYS:
            if key in info.attrs:
                st.caption(f"**{key}**: {info.attrs[key]}")
        records = info.stage_records()
        if records:
            # One line per stage: the sidebar is too narrow for a table of five columns.
            st.caption("**stages** (a rerun with other settings recomputes only the stages they change)")
            for row in stage_rows(records).to_dict("records"):
                seconds, own = row["seconds"], row["own MiB"]
                took = "" if seconds is None or seconds != seconds else f" · {seconds:.1f} s"
                took += "" if own is None or own != own else f" · +{own:.0f} MiB"
                details = "; ".join(part for part in (row["options"] if row["options"] != "—" else "", row["note"])
                                    if part)
                st.caption(f"`{row['stage']}`{took}" + (f" · {details}" if details else ""))
