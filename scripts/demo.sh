#!/usr/bin/env bash
# From a fresh clone: install, generate SynthScenes, train the demo CNN, compute its store, serve the app.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m compute.all --model demo "$@"
exec .venv/bin/streamlit run app/main.py --server.headless true --server.fileWatcherType none
