#!/usr/bin/env bash
# Judge MM-SafetyBench answer files: every scenario (01-13) with its own prompt, every image mode found in the
# rows, then print the metrics (all 13 scenarios and the paper's 8). A thin wrapper over `python -m
# llava.eval.judge` and `python -m llava.eval.metrics`; every setting is an environment variable:
#   ANSWERS        one or more answer files (space-separated), or
#   ANSWERS_DIR    a folder whose *.jsonl answer files are all judged (judgment files are skipped)
#   JUDGE_MODEL    judge model name (default gpt-4)
#   JUDGE_BASE_URL OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI); key in $OPENAI_API_KEY
#   JUDGE_FILE     prompt set (default: the project's; the paper's: .../judge_prompts/ecso_vlsafe_judge.jsonl)
#   MODE           auto (default: per-scenario prompts) or one prompt name for all, e.g. query_safety as the seed
#   PARALLEL       concurrent requests (default 30)
#   OUTPUT         folder for judgments (default: each answer file's folder)
# Extra arguments are passed to the judge.
set -euo pipefail
files=()
if [ -n "${ANSWERS:-}" ]; then
  read -r -a files <<< "$ANSWERS"
elif [ -n "${ANSWERS_DIR:-}" ]; then
  for f in "$ANSWERS_DIR"/*.jsonl; do
    case "$f" in *.judgments.jsonl) ;; *) files+=("$f") ;; esac
  done
else
  echo "set ANSWERS (files) or ANSWERS_DIR (folder)" >&2; exit 2
fi
[ "${#files[@]}" -gt 0 ] || { echo "no answer files found" >&2; exit 2; }
for answers in "${files[@]}"; do
  out=${OUTPUT:-$(dirname "$answers")}
  args=(--answers "$answers" --benchmark mmsafetybench --judge-model "${JUDGE_MODEL:-gpt-4}" --mode "${MODE:-auto}"
        --parallel "${PARALLEL:-30}" --output "$out")
  if [ -n "${JUDGE_FILE:-}" ]; then args+=(--judge-file "$JUDGE_FILE"); fi
  if [ -n "${JUDGE_BASE_URL:-}" ]; then args+=(--judge-base-url "$JUDGE_BASE_URL"); fi
  python -m llava.eval.judge "${args[@]}" "$@"
  python -m llava.eval.metrics --benchmark mmsafetybench --answers "$answers" \
    --judgments "$out/$(basename "$answers" .jsonl).judgments.jsonl"
done
