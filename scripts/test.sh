#!/usr/bin/env bash
# Set up, then run the whole test suite (the same as `python3 scripts/test.py`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 scripts/test.py "$@"
