#!/usr/bin/env bash
# MME with ECSO (utility under ECSO), checking the direct answers of scripts/v1_5/eval/mme.sh when they exist;
# the image stays in the safe-answer step, as the seed's utility scripts had it. Then the eval_tool files.
# Writes  $OUT_ROOT/data/mme/$MODEL/tell_ask_safe/merge.jsonl and .../to_eval/{category}.txt
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out mme)/q/merge.jsonl"
ecso_generate "$(ecso_out mme)/tell_ask_safe" --benchmark mme --data-root "$DATA_ROOT" --method ecso \
  --image-in-safe-step --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
ecso_convert mme "$(ecso_out mme)/tell_ask_safe"
