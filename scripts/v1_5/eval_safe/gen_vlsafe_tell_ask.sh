#!/usr/bin/env bash
# VLSafe: ECSO (in the seed's code TELL is the harm check), checking the direct answers of gen_vlsafe.sh when they
# exist (two-pass, as the seed), else running all four steps. As the seed's model_vlsafe_tell_ask.py: the harm check
# and the caption see the center-cropped image (the direct answer saw it padded). The seed's script sampled at
# temperature 0.2 (its shell script passed no --temperature); this one decodes greedily like the others.
# Writes  $OUT_ROOT/data/vlsafe/VLSafe_harmlessness_examine/output/$MODEL/image/tell_ask/merge.jsonl
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_from_answers "$(ecso_out vlsafe)/q/merge.jsonl"
ecso_generate "$(ecso_out vlsafe)/tell_ask" --benchmark vlsafe --data-root "$DATA_ROOT" --method ecso \
  --image-aspect-ratio-check crop --image-aspect-ratio-caption crop --max-new-tokens 1024 "${FROM_ANSWERS[@]}"
