#!/usr/bin/env bash
# MM-SafetyBench: ECSO for every scenario x image mode, checking gen_mmsafe.sh's direct answers when they exist.
# As the seed's model_mmsafe_tell_ask.py: every step sees the padded image, the harm check the answer's first 1927
# characters (the defaults).
# Writes  $OUT_ROOT/data/mmsafe/outputs/{scenario}/{mode}/$MODEL/tell_ask/merge.jsonl
# Environment: see scripts/v1_5/common.sh; SCENARIOS and MODES pick a subset.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

for SPLIT in $SCENARIOS; do
  for MODE in $MODES; do
    out="$(ecso_out mmsafetybench "$SPLIT" "$MODE")"
    ecso_from_answers "$out/q/merge.jsonl"
    ecso_generate "$out/tell_ask" --benchmark mmsafetybench --data-root "$DATA_ROOT" --scenarios "$SPLIT" \
      --mode "$MODE" --method ecso --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
  done
done
