"""The HDF5 store: one file per run. h5py and numpy only; knows nothing of torch or Streamlit.

Layout in SCHEMA.md. ``StoreWriter`` writes a run under a temporary name and renames it when complete;
``open_store`` / ``StoreReader`` read a finished file briefly and hand back numpy arrays.
"""

from store.schema import SCHEMA_VERSION, StoreError  # noqa: F401
from store.writer import StoreWriter  # noqa: F401
from store.reader import StoreReader, list_stores  # noqa: F401
