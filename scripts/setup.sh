#!/usr/bin/env bash
# Create .venv and install lorakit into it (the same as `python3 scripts/bootstrap.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/bootstrap.py "$@"
