#!/usr/bin/env bash
# MM-SafetyBench: direct answers for every scenario x image mode (the seed's model_mmsafe.py runs).
# Reads   $DATA_ROOT/data/mmsafe/processed_questions/{scenario}.json, images $DATA_ROOT/data/mmsafe/images/{scenario}/{mode}/
# Writes  $OUT_ROOT/data/mmsafe/outputs/{scenario}/{mode}/$MODEL/q/merge.jsonl
# Environment: see scripts/v1_5/common.sh; SCENARIOS and MODES pick a subset.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

for SPLIT in $SCENARIOS; do
  for MODE in $MODES; do
    ecso_generate "$(ecso_out mmsafetybench "$SPLIT" "$MODE")/q" --benchmark mmsafetybench --data-root "$DATA_ROOT" \
      --scenarios "$SPLIT" --mode "$MODE" --method direct --max-new-tokens 2048
  done
done
