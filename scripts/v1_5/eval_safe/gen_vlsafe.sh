#!/usr/bin/env bash
# VLSafe: direct answers of the model (the seed's model_vlsafe.py run), one process per GPU, merged.
# Reads   $DATA_ROOT/data/vlsafe/VLSafe_harmlessness_examine/data.jsonl, images $DATA_ROOT/data/coco/images/train2017
# Writes  $OUT_ROOT/data/vlsafe/VLSafe_harmlessness_examine/output/$MODEL/image/q/merge.jsonl
# Environment: see scripts/v1_5/common.sh (MODEL, MODEL_PATH, DATA_ROOT, CUDA_VISIBLE_DEVICES, LIMIT, FORCE ...).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_generate "$(ecso_out vlsafe)/q" --benchmark vlsafe --data-root "$DATA_ROOT" --method direct --max-new-tokens 2048
