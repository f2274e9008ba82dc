#!/usr/bin/env bash
# Everything worth measuring on one GPU, as one prepared command (about 6 minutes on one H100, 8 at most):
# LLaVA-1.5-7B's architecture with random fp16 weights, built directly on the GPU (no download).
#   bash benchmarks/gpu.sh [OUT_DIR]
# Needs: a CUDA torch and this project importable (pip install -e ., or PYTHONPATH=.). Each stage has its own time
# limit and writes its JSON as it goes, so a stage that fails or runs out of time still leaves the others' results.
# Dry run anywhere: PRESET=tiny DEVICE=cpu DTYPE=float32 bash benchmarks/gpu.sh /tmp/gpu-dry
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-${OUT:-benchmarks/results/gpu}}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
LOG="$OUT/gpu.log"
common=(--preset "${PRESET:-llava-1.5-7b}" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-float16}")
failed=()

stage() {  # stage NAME SECONDS COMMAND...
    local name=$1 limit=$2; shift 2
    echo "=== $name (limit ${limit}s): $*" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: rc=$rc in $((SECONDS - t0))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failed+=("$name")
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "no nvidia-smi"
    "$PY" -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
} 2>&1 | tee "$LOG"

# 1. decode tokens/s at batch 1 against the bandwidth bound measured in the same run
stage decode_speed 100 "$PY" benchmarks/decode_speed.py "${common[@]}" --new-tokens 128 --json "$OUT/decode_speed.json"
# 2. ECSO / direct at one-token and 64-token answers, every configuration (stops itself after its budget)
stage ecso_overhead 230 "$PY" benchmarks/ecso_overhead.py "${common[@]}" --samples 2 --lengths 1,64 --repeats 1 \
    --configs default,exact,speculative,early,skip,noreuse --early-tokens 16 --time-budget-s 170 \
    --json "$OUT/ecso_overhead.json"
# 3. batched benchmark generation: samples/s at batch 1, 4, 8, 16
stage batch_throughput 130 "$PY" benchmarks/batch_throughput.py "${common[@]}" --samples 16 --batch-sizes 1,4,8,16 \
    --max-new-tokens 64 --json "$OUT/batch_throughput.json"
# 4. long answers (256 tokens): the defaults, the speculative caption and the early check
stage ecso_overhead_256 110 "$PY" benchmarks/ecso_overhead.py "${common[@]}" --samples 1 --lengths 256 --repeats 1 \
    --configs default,speculative,early --early-tokens 16 --time-budget-s 60 --json "$OUT/ecso_overhead_256.json"

echo "results in $OUT; failed stages: ${failed[*]:-none}" | tee -a "$LOG"
[ ${#failed[@]} -eq 0 ]
