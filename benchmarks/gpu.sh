#!/usr/bin/env bash
# Everything worth measuring on one GPU, as one prepared command (< 8 minutes on one H100):
# LLaVA-1.5-7B's architecture with random fp16 weights, built directly on the GPU (no download).
#   bash benchmarks/gpu.sh [OUT_DIR]
# Needs: a CUDA torch, and the project installed (pip install -e .).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/nvidia-smi.csv"
common=(--preset llava-1.5-7b --device cuda --dtype float16)
timeout 150 "$PY" benchmarks/decode_speed.py "${common[@]}" --new-tokens 128 --json "$OUT/decode_speed.json" | tee "$OUT/decode_speed.txt"
timeout 200 "$PY" benchmarks/ecso_overhead.py "${common[@]}" --samples 4 --lengths 1,64,256 --repeats 2 \
    --json "$OUT/ecso_overhead.json" | tee "$OUT/ecso_overhead.txt"
timeout 150 "$PY" benchmarks/batch_throughput.py "${common[@]}" --samples 32 --batch-sizes 1,4,8,16 \
    --max-new-tokens 64 --json "$OUT/batch_throughput.json" | tee "$OUT/batch_throughput.txt"
echo "results in $OUT"
