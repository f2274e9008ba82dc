#!/usr/bin/env bash
# MMBench with ECSO, checking the direct answers of scripts/v1_5/eval/mmbench.sh when they exist; as the seed's
# model_mmbench_ask_unsafe.py: the harm check sees the whole answer, every step the padded image (the safe answer
# too). Then the submission xlsx.
# Writes  $OUT_ROOT/data/mmbench/$MODEL/tell_ask/merge.jsonl and .../to_eval/merge.xlsx
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out mmbench)/q/merge.jsonl"
ecso_generate "$(ecso_out mmbench)/tell_ask" --benchmark mmbench --data-root "$DATA_ROOT" --method ecso \
  --image-in-safe-step --truncate-chars 0 --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
ecso_convert mmbench "$(ecso_out mmbench)/tell_ask"
