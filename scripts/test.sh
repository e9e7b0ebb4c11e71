#!/usr/bin/env bash
# Run the whole test suite in the project's virtual environment (created if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}  # see compute/__init__.py
exec .venv/bin/python -m pytest -q "$@"
