#!/usr/bin/env bash
# Set up, then run the demo workflow (the same as `python3 scripts/quickstart.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/quickstart.py "$@"
