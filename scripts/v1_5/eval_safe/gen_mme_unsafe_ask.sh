#!/usr/bin/env bash
# MME with ECSO (utility under ECSO), checking the direct answers of scripts/v1_5/eval/mme.sh when they exist;
# as the seed's model_vqa_ask_unsafe.py: the harm check sees the whole answer; it, the caption and the safe answer
# see the center-cropped image (the direct answer saw it padded). Then the eval_tool files.
# Writes  $OUT_ROOT/data/mme/$MODEL/tell_ask_safe/merge.jsonl and .../to_eval/{category}.txt
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out mme)/q/merge.jsonl"
ecso_generate "$(ecso_out mme)/tell_ask_safe" --benchmark mme --data-root "$DATA_ROOT" --method ecso \
  --image-in-safe-step --image-aspect-ratio-check crop --image-aspect-ratio-caption crop --truncate-chars 0 \
  --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
ecso_convert mme "$(ecso_out mme)/tell_ask_safe"
