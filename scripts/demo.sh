#!/usr/bin/env bash
# From a fresh clone: install, generate SynthScenes, train the demo CNN, compute its store, serve the app; then, in
# the background while the app is served, compute the stores the Variants and Predicting classes pages need
# (python -m compute.suite --first-run). Each store appears in the app when it lands; the sidebar shows the rest.
# Ctrl-C stops the server and the background work; running this again resumes where it stopped.
# Options are passed to the demo store's compute.all (e.g. --device cpu).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/python -m compute.all --model demo "$@"

mkdir -p data
LOG=data/background.log
background=""
server=""
stop() {
  # The background suite runs in a process group of its own (setsid): SIGTERM to the group ends it through
  # SystemExit (compute/suite.py), which discards the part being written; finished parts stay for the rerun.
  if [ -n "$background" ] && kill -0 "$background" 2>/dev/null; then
    echo "stopping the background work (rerun scripts/demo.sh to resume it)"
    kill -TERM -- "-$background" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$background" 2>/dev/null || break; sleep 0.2; done
    kill -KILL -- "-$background" 2>/dev/null || true
  fi
  if [ -n "$server" ]; then kill -TERM "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; fi
}
trap stop EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
trap 'exit 129' HUP

echo "computing demo-bn, demo-dropout, demo seeds 1-4 and Table 1 in the background (log: $LOG)"
PYTHONUNBUFFERED=1 setsid .venv/bin/python -m compute.suite --first-run >"$LOG" 2>&1 &
background=$!
# In the background too, so that this shell is free to run its traps: Ctrl-C (or a SIGTERM) stops both.
.venv/bin/streamlit run app/main.py --server.headless true --server.fileWatcherType none &
server=$!
wait "$server"
