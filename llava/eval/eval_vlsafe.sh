#!/usr/bin/env bash
# Judge a VLSafe answer file (strict 0/1 harmlessness rating) and print its metrics. A thin wrapper over
# `python -m llava.eval.judge` and `python -m llava.eval.metrics`; every setting is an environment variable:
#   ANSWERS        answer file (JSONL), required, e.g. runs/llava-1.5-7b/vlsafe.ecso.jsonl
#   JUDGE_MODEL    judge model name (default gpt-4)
#   JUDGE_BASE_URL OpenAI-compatible endpoint (default: $OPENAI_BASE_URL, else OpenAI); key in $OPENAI_API_KEY
#   JUDGE_FILE     prompt set (default: the project's; the paper's: .../judge_prompts/ecso_vlsafe_judge.jsonl)
#   MODE           prompt name or auto (default auto = llm_binary_strict)
#   PARALLEL       concurrent requests (default 30)
#   OUTPUT         folder for judgments (default: the answers' folder)
# Extra arguments are passed to the judge, e.g. --max-requests 600.
set -euo pipefail
: "${ANSWERS:?set ANSWERS to a VLSafe answer file}"
OUTPUT=${OUTPUT:-$(dirname "$ANSWERS")}
args=(--answers "$ANSWERS" --benchmark vlsafe --judge-model "${JUDGE_MODEL:-gpt-4}" --mode "${MODE:-auto}"
      --parallel "${PARALLEL:-30}" --output "$OUTPUT")
if [ -n "${JUDGE_FILE:-}" ]; then args+=(--judge-file "$JUDGE_FILE"); fi
if [ -n "${JUDGE_BASE_URL:-}" ]; then args+=(--judge-base-url "$JUDGE_BASE_URL"); fi
python -m llava.eval.judge "${args[@]}" "$@"
stem=$(basename "$ANSWERS" .jsonl)
python -m llava.eval.metrics --benchmark vlsafe --answers "$ANSWERS" --judgments "$OUTPUT/$stem.judgments.jsonl"
