"""The provenance panel's stage table, from the records a run writes."""

from __future__ import annotations

from store import StoreReader


def test_stage_rows_show_each_stage_with_its_options(tiny_run):
    from app.provenance import stage_rows

    records = StoreReader(tiny_run["store"]).stage_records()
    table = stage_rows(records).set_index("stage")
    assert list(records)[:3] == ["setup", "baseline", "activations/conv3"]
    assert table.loc["greedy/conv5", "options"].startswith("greedy_steps=3, greedy_classes=null, random_orders=2")
    assert table.loc["ablation/conv5", "options"] == "keep_flip_thumbs=false"
    assert table.loc["setup", "options"] == "—"
    assert (table["seconds"].dropna() >= 0).all() and table["seconds"].notna().sum() == len(table)
    # the sweeps of all layers ran in one pass: each names the others, and they share its time
    sweeps = [name for name in records if name.startswith("ablation/")]
    assert len(sweeps) > 1
    for name in sweeps:
        assert table.loc[name, "note"] == f"time of one pass for {len(sweeps)} layers"
        assert records[name]["shared"] == [other for other in sweeps if other != name]
    assert table.loc[sweeps, "seconds"].nunique() == 1
    # each stage's own memory is its peak less the level it began at
    own = table["peak MiB"] - table["own MiB"]
    assert (table["own MiB"] >= 0).all() and (own > 0).all()
    assert all(abs(own[name] - records[name]["start_mib"]) < 0.2 for name in records)


def test_an_old_store_record_is_a_finish_time():
    from app.provenance import stage_rows
    from store.schema import parse_record

    rows = stage_rows({"setup": parse_record("2026-01-01T00:00:00")})
    assert rows.iloc[0].to_dict() == {"stage": "setup", "options": "—", "finished": "2026-01-01T00:00:00",
                                      "seconds": None, "peak MiB": None, "own MiB": None, "note": ""}
