#!/usr/bin/env bash
# MMBench dev: direct answers with the single-prediction prompt (128 new tokens), merged, then the submission xlsx.
# Reads   $DATA_ROOT/playground/data/eval/mmbench/mmbench_dev_20230712.tsv
# Writes  $OUT_ROOT/data/mmbench/$MODEL/q/merge.jsonl and .../to_eval/merge.xlsx
# Environment: see scripts/v1_5/common.sh.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/../common.sh"

ecso_generate "$(ecso_out mmbench)/q" --benchmark mmbench --data-root "$DATA_ROOT" --method direct --max-new-tokens 128
ecso_convert mmbench "$(ecso_out mmbench)/q"
