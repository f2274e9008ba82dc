#!/usr/bin/env bash
# MM-Vet: direct answers (1024 new tokens, LLaVA's model_vqa setting; open-ended answers are long), merged, then the
# grader JSON.
# Reads   $DATA_ROOT/playground/data/eval/mm-vet/llava-mm-vet.jsonl, images .../mm-vet/images
# Writes  $OUT_ROOT/data/mm-vet/$MODEL/q/merge.jsonl and .../to_eval/merge.json
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_generate "$(ecso_out mmvet)/q" --benchmark mmvet --data-root "$DATA_ROOT" --method direct --max-new-tokens 1024
ecso_convert mmvet "$(ecso_out mmvet)/q"
