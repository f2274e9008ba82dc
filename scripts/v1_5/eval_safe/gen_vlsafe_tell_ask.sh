#!/usr/bin/env bash
# VLSafe: ECSO ("tell" = query-aware caption, "ask" = harm check), checking the direct answers of gen_vlsafe.sh when
# they exist (two-pass, as the seed), else running all four steps.
# Writes  $OUT_ROOT/data/vlsafe/VLSafe_harmlessness_examine/output/$MODEL/image/tell_ask/merge.jsonl
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out vlsafe)/q/merge.jsonl"
ecso_generate "$(ecso_out vlsafe)/tell_ask" --benchmark vlsafe --data-root "$DATA_ROOT" --method ecso \
  --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
