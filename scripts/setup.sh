#!/usr/bin/env bash
# Create .venv and install lorakit into it (idempotent). Torch goes first, pinned to a build in
# our supported range, so pip does not pull a newer multi-GB build on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH_SPEC="${LORAKIT_TORCH:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
if ! python -c "import torch, sys; v = tuple(map(int, torch.__version__.split('+')[0].split('.')[:2])); sys.exit(not ((2, 6) <= v < (2, 15)))" 2>/dev/null; then
  python -m pip install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
fi
python -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
# The tokenizer test compares ours with open_clip's; its package needs torchvision only for
# models, so it comes without dependencies.
python -m pip install -q --no-deps "open_clip_torch==3.3.0" 2>&1 | grep -v "^WARNING: Location" || true
python -c "import lorakit, torch; print(f'lorakit {lorakit.__version__} with torch {torch.__version__} ready in .venv')"
