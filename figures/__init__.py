"""The paper's figures as Altair charts, built from plain arrays: shared by the app's pages and ``compute.report``.

Knows pandas, numpy and Altair only (no Streamlit, no torch, no HDF5), so a page and a report draw the same chart from
the same numbers. ``render`` turns a chart into PNG or SVG bytes with vl-convert (no browser needed).
"""

from __future__ import annotations

FORMATS = ("png", "svg")


def render(chart, fmt: str = "png", scale: float = 2.0) -> bytes:
    """The chart as PNG (at ``scale`` times its size) or SVG bytes."""
    import vl_convert

    spec = chart.to_dict()
    if fmt == "png":
        return vl_convert.vegalite_to_png(spec, scale=scale)
    if fmt == "svg":
        return vl_convert.vegalite_to_svg(spec).encode()
    raise ValueError(f"unknown image format {fmt!r}: use one of {', '.join(FORMATS)}")
