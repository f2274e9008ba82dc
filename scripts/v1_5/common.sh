# Shared by scripts/v1_5/eval_safe/*.sh and scripts/v1_5/eval/*.sh: source it, do not run it.
#
# Environment (all optional):
#   MODEL                 name in output paths and in every answer's model_id (default llava-1.5-7b)
#   MODEL_PATH            checkpoint folder or hub id (default models/$MODEL)
#   DATA_ROOT             folder holding data/ and playground/ as the seed and LLaVA lay them out (default .)
#   OUT_ROOT              where outputs go, same layout (default $DATA_ROOT)
#   CUDA_VISIBLE_DEVICES  comma-separated GPU ids: one process (and one chunk) per GPU (default 0)
#   BATCH_SIZE            samples per model call (default 8)
#   LIMIT / ECSO_LIMIT    answer only the first N samples: a quick end-to-end check
#   FORCE=1               redo results whose merged file already exists (default: skip them with a message)
#   PYTHON                interpreter (default python)
#   EXTRA_ARGS            more flags for python -m llava.eval.generate, e.g. "--verdict exact --device cpu"
#   SCENARIOS, MODES      MM-SafetyBench scripts: which scenarios (names) and image modes (default all 13; SD_TYPO TYPO SD)

ECSO_REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
export PYTHONPATH="$ECSO_REPO${PYTHONPATH:+:$PYTHONPATH}"

MODEL="${MODEL:-llava-1.5-7b}"
MODEL_PATH="${MODEL_PATH:-models/$MODEL}"
DATA_ROOT="${DATA_ROOT:-.}"
OUT_ROOT="${OUT_ROOT:-$DATA_ROOT}"
BATCH_SIZE="${BATCH_SIZE:-8}"
PYTHON="${PYTHON:-python}"
FORCE="${FORCE:-0}"
EXTRA_ARGS="${EXTRA_ARGS:-}"
if [ -n "${LIMIT:-}" ]; then export ECSO_LIMIT="$LIMIT"; fi
IFS=',' read -ra GPULIST <<< "${CUDA_VISIBLE_DEVICES:-0}"
CHUNKS=${#GPULIST[@]}

MMSAFE_ALL_SCENARIOS="01-Illegal_Activitiy 02-HateSpeech 03-Malware_Generation 04-Physical_Harm 05-EconomicHarm 06-Fraud 07-Sex 08-Political_Lobbying 09-Privacy_Violence 10-Legal_Opinion 11-Financial_Advice 12-Health_Consultation 13-Gov_Decision"
SCENARIOS="${SCENARIOS:-$MMSAFE_ALL_SCENARIOS}"
MODES="${MODES:-SD_TYPO TYPO SD}"

# The model flags every script passes: greedy decoding with LLaVA-1.5's template, as the seed's scripts did.
MODEL_ARGS=(--model-path "$MODEL_PATH" --model-name "$MODEL" --conv-mode vicuna_v1 --temperature 0)

ecso_log() { echo "[$(date +%H:%M:%S)] $*" >&2; }

# ecso_out BENCHMARK [SCENARIO MODE]: the folder of a benchmark's outputs (the seed's layout); the direct answers
# go to .../q/merge.jsonl, ECSO's to a sibling folder.
ecso_out() {
  case "$1" in
    vlsafe) echo "$OUT_ROOT/data/vlsafe/VLSafe_harmlessness_examine/output/$MODEL/image" ;;
    mmsafetybench) echo "$OUT_ROOT/data/mmsafe/outputs/$2/$3/$MODEL" ;;
    mme) echo "$OUT_ROOT/data/mme/$MODEL" ;;
    mmbench) echo "$OUT_ROOT/data/mmbench/$MODEL" ;;
    mmvet) echo "$OUT_ROOT/data/mm-vet/$MODEL" ;;
    *) echo "ecso_out: unknown benchmark $1" >&2; return 1 ;;
  esac
}

# ecso_from_answers DIRECT_FILE: sets FROM_ANSWERS=(--from-answers DIRECT_FILE) when the direct run's merged
# answers exist (the paper's two-pass evaluation), else FROM_ANSWERS=() and ECSO generates the direct answers itself.
ecso_from_answers() {
  FROM_ANSWERS=()
  if [ -f "$1" ]; then FROM_ANSWERS=(--from-answers "$1"); else ecso_log "no direct answers at $1: ECSO runs all four steps"; fi
}

# ecso_generate OUT_DIR GENERATE_ARGS...: one llava.eval.generate process per GPU on its chunk
# (OUT_DIR/{CHUNKS}_{IDX}.jsonl), then merge into OUT_DIR/merge.jsonl. A finished merge.jsonl is kept unless FORCE=1.
# A failed chunk stops the script; its answers stay on disk and rerunning the script resumes it.
ecso_generate() {
  local out_dir="$1"; shift
  local merged="$out_dir/merge.jsonl"
  if [ -f "$merged" ] && [ "$FORCE" != "1" ]; then
    ecso_log "skip: $merged exists (FORCE=1 to redo it)"
    return 0
  fi
  local redo=() pids=() parts=() idx failed=0
  if [ "$FORCE" = "1" ]; then redo=(--overwrite); fi
  mkdir -p "$out_dir"
  trap 'kill "${pids[@]}" 2>/dev/null' INT TERM
  for idx in $(seq 0 $((CHUNKS - 1))); do
    parts+=("$out_dir/${CHUNKS}_${idx}.jsonl")
    # shellcheck disable=SC2086 # EXTRA_ARGS is a list of flags
    CUDA_VISIBLE_DEVICES="${GPULIST[$idx]}" "$PYTHON" -m llava.eval.generate "${MODEL_ARGS[@]}" "$@" \
      --answers-file "${parts[$idx]}" --num-chunks "$CHUNKS" --chunk-idx "$idx" --batch-size "$BATCH_SIZE" \
      --no-progress "${redo[@]}" $EXTRA_ARGS &
    pids+=($!)
  done
  for idx in "${!pids[@]}"; do
    if ! wait "${pids[$idx]}"; then ecso_log "chunk $idx failed: ${parts[$idx]}"; failed=1; fi
  done
  trap - INT TERM
  if [ "$failed" = "1" ]; then
    ecso_log "not merging $merged: rerun this script to resume the unfinished chunks"
    return 1
  fi
  "$PYTHON" -m llava.eval.merge --out "$merged" --remove-parts --force "${parts[@]}"
}

# ecso_question_file MERGED: the benchmark question file a merged answer file was generated from (its manifest).
ecso_question_file() {
  "$PYTHON" -c 'import json, sys; print(json.load(open(sys.argv[1]))["inputs"]["question_file"])' \
    "${1%.jsonl}.manifest.json"
}

# ecso_convert BENCHMARK OUT_DIR: the official submission files from OUT_DIR/merge.jsonl into OUT_DIR/to_eval
# (MME eval_tool txt files, MMBench xlsx, MM-Vet grader JSON), as the seed's scripts did after merging.
ecso_convert() {
  local merged="$2/merge.jsonl" gt
  mkdir -p "$2/to_eval"
  case "$1" in
    mme)
      gt="$DATA_ROOT/playground/data/eval/MME/llava_mme_gt.jsonl"
      [ -f "$gt" ] || gt="$DATA_ROOT/playground/data/eval/MME/MME_Benchmark_release_version"
      "$PYTHON" -m llava.eval.formats mme --answers "$merged" --gt-file "$gt" --out "$2/to_eval" ;;
    mmbench)
      "$PYTHON" -m llava.eval.formats mmbench --answers "$merged" --question-file "$(ecso_question_file "$merged")" \
        --out "$2/to_eval/merge.xlsx" ;;
    mmvet)
      "$PYTHON" -m llava.eval.formats mmvet --answers "$merged" --out "$2/to_eval/merge.json" ;;
  esac
}
