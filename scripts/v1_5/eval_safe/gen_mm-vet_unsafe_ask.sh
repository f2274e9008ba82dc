#!/usr/bin/env bash
# MM-Vet with ECSO, checking the direct answers of scripts/v1_5/eval/mmvet.sh when they exist; as the seed's
# model_vqa_ask_unsafe.py: the harm check sees the whole answer; it, the caption and the safe answer see the
# center-cropped image (the direct answer saw it padded). Then the grader JSON.
# Writes  $OUT_ROOT/data/mm-vet/$MODEL/tell_ask/merge.jsonl and .../to_eval/merge.json
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out mmvet)/q/merge.jsonl"
ecso_generate "$(ecso_out mmvet)/tell_ask" --benchmark mmvet --data-root "$DATA_ROOT" --method ecso \
  --image-in-safe-step --image-aspect-ratio-check crop --image-aspect-ratio-caption crop --truncate-chars 0 \
  --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
ecso_convert mmvet "$(ecso_out mmvet)/tell_ask"
