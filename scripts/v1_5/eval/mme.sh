#!/usr/bin/env bash
# MME: direct answers (LLaVA's model_vqa_loader run: 128 new tokens), merged, then the eval_tool files.
# Reads   $DATA_ROOT/playground/data/eval/MME/llava_mme.jsonl and MME_Benchmark_release_version/ beside it
# Writes  $OUT_ROOT/data/mme/$MODEL/q/merge.jsonl and .../to_eval/{category}.txt
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_generate "$(ecso_out mme)/q" --benchmark mme --data-root "$DATA_ROOT" --method direct --max-new-tokens 128
ecso_convert mme "$(ecso_out mme)/q"
