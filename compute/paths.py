"""Where generated files live: one data directory (data sets, trained weights, stores), git-ignored.

Resolution order: an explicit ``--data-dir`` flag, then ``$UNIT_ABLATION_DATA``, then ``./data`` in the working
directory. Stores live in ``<data>/stores`` unless ``--store-dir`` / ``$UNIT_ABLATION_STORES`` says otherwise, so a lab
can point every member's app at one shared directory.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_ENV = "UNIT_ABLATION_DATA"
STORES_ENV = "UNIT_ABLATION_STORES"


def data_dir(explicit: str | os.PathLike | None = None) -> Path:
    raw = explicit or os.environ.get(DATA_ENV) or "data"
    return Path(raw).expanduser().resolve()


def store_dir(explicit: str | os.PathLike | None = None, data: str | os.PathLike | None = None) -> Path:
    raw = explicit or os.environ.get(STORES_ENV)
    if raw:
        return Path(raw).expanduser().resolve()
    return data_dir(data) / "stores"


def weights_dir(data: str | os.PathLike | None = None) -> Path:
    return data_dir(data) / "weights"


def datasets_dir(data: str | os.PathLike | None = None) -> Path:
    return data_dir(data) / "datasets"
