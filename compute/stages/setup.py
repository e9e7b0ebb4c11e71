"""The run's first stage: what every page needs to name things (class names, image labels and files)."""

from __future__ import annotations

import numpy as np

from store.writer import write_array


def run_stage(ctx) -> None:
    with ctx.writer.stage("setup") as h5:
        write_array(h5, "classes", np.array(ctx.class_names, dtype=object))
        write_array(h5, "images/labels", np.asarray(ctx.labels, np.int64))
        write_array(h5, "images/files", np.array(ctx.files, dtype=object))
