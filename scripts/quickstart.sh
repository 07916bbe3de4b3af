#!/usr/bin/env bash
# Set up, then train a LoRA on a tiny model and dataset that lorakit builds itself.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/lorakit quickstart "$@"
