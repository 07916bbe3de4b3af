#!/usr/bin/env bash
# Issue 12's GPU checks in one call on a lent CUDA machine (see docs/benchmarks.md): the CUDA-only
# tests, then the training benchmark, then drawing eager and compiled with CUDA graphs. Logs and
# JSON go to $OUT (at most 7 files). Sized to end inside one 10-minute device call on an H100/H200:
#
#     bash benchmarks/device_check.sh                 # all three parts (about 9 minutes)
#     bash benchmarks/device_check.sh tests draw      # only those parts
#
# TRAIN_BUDGET (seconds, default 240) bounds the training suite; what it leaves out is listed as
# skipped in its table. Missing packages travel as wheels in .whl/ (git-ignored; carry it).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/lorakit-device-check}
mkdir -p "$OUT" /tmp/site
parts=("$@")
[ ${#parts[@]} -eq 0 ] && parts=(tests train draw)

for w in .whl/*.whl; do
    [ -e "$w" ] || continue
    m=$(basename "$w" | cut -d- -f1 | tr A-Z a-z)
    python3 -c "import $m" 2>/dev/null || python3 -m zipfile -e "$w" /tmp/site
done
export PYTHONPATH=src:/tmp/site PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

for part in "${parts[@]}"; do
    started=$(date +%s)
    case "$part" in
    tests)
        timeout 150 python3 -m pytest -q -p no:cacheprovider -rs tests/test_train_graph_step.py \
            tests/test_train_speed_paths.py tests/test_generate_speed_paths.py tests/test_models_load_direct.py \
            -k cuda 2>&1 | tee "$OUT/cuda_tests.log" | tail -25
        ;;
    train)
        timeout $((${TRAIN_BUDGET:-240} + 60)) python3 benchmarks/train_speed.py --budget "${TRAIN_BUDGET:-240}" \
            --json "$OUT/train_speed.json" 2>&1 | tee "$OUT/train_speed.log" | tail -30
        ;;
    draw)
        timeout 100 python3 benchmarks/generate_speed.py --json "$OUT/generate_speed.json" 2>&1 \
            | tee "$OUT/generate_speed.log" | tail -15
        # compiling costs a minute per shape: SD1.5 512² batch 1 (issue 12's 100 it/s target) only
        timeout 110 python3 benchmarks/generate_speed.py --families sd1 --batches 1 --compile inductor \
            --compile_mode reduce-overhead --json "$OUT/generate_speed_graphs.json" 2>&1 | tee "$OUT/generate_speed_graphs.log" | tail -15
        ;;
    *)
        echo "unknown part $part: use tests, train or draw" >&2
        exit 2
        ;;
    esac
    echo "== $part: $(($(date +%s) - started)) s"
done
