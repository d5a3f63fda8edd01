#!/usr/bin/env bash
# The GPU checks as ONE device call (a lent machine gives 15 minutes in all, 10 per command, and brings back at
# most 8 files from $OUT): the fused log-prob kernels' tests on CUDA, the Triton kernel against the torch backend
# at the recipe's shape, and one GRPO step at the recipe's shape in bf16 and in fp32. Random weights throughout:
# nothing can be downloaded there.
#
# Steps (each under its own time limit; the script goes on when one fails or runs out of time):
#   prepare          45 s  versions and device; the random Qwen2.5-3B folder, built once, reused by both steps
#   test_logprobs    60 s  pytest tests/test_logprobs.py -m "not slow": every backend against float64 (CUDA too)
#   bench_logprobs   60 s  triton vs torch at M = 6,144, H = 2,048, V = 151,936 in bf16 (log-probs and the
#                          hidden-state gradient, stated tolerances), then naive / torch / triton timed in bf16 and fp32
#   bench_step_bf16  95 s  one GRPO step at the recipe's shape (6 x 1,024 tokens, 4-bit, LoRA r 64), dtype bf16:
#                          phase split and peak memory, after a 16-token warm-up step
#   bench_step_fp32 100 s  the same step with dtype fp32
# The limits sum to 360 s (plus a few seconds of wheel install and archiving): a rerun fits in the budget.
#
# What comes back: $OUT/gpu_checks.tar.gz (every log and JSON: gpu_checks/<step>.log, <step>.json,
# test_logprobs.xml, summary.txt, summary.json), $OUT/summary.txt (one line per step: how it ended, seconds,
# the headline figures) and $OUT/summary.json. Each benchmark rewrites its JSON after every measurement and the
# archive is rebuilt after every step, so a step stopped by its limit (or the call by its timeout) loses only
# the measurement in flight. Default OUT: outputs/gpu_checks.
#
# The GPU image has python3, torch, triton, transformers, peft, accelerate and pytest, not bitsandbytes: its wheel
# travels in .whl/ (43 MB, git-ignored; the tree and it must stay under 64 MiB; docs/BENCHMARKS.md, "The device check"):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=420)
# Nothing here needs `datasets` or vLLM (bench_step's presets give the trainer synthetic prompts).
#
# Smoke mode, on any CPU (tests/test_gpu_checks.py): `GPU_CHECKS_SMOKE=1 bash scripts/gpu_checks.sh` or
# `bash scripts/gpu_checks.sh --smoke` runs the same steps at tiny shapes (the offline tiny model, M = 40,
# H = 48, V = 600; Triton under its CPU interpreter) into the same archive layout.
# PY (default python3) is the interpreter; GPU_CHECKS_MODEL_DIR the random model's folder.
set -u
cd "$(dirname "$0")/.."
PY="${PY:-python3}"
SMOKE="${GPU_CHECKS_SMOKE:-0}"
[ "${1:-}" = "--smoke" ] && SMOKE=1
OUT="${OUT:-outputs/gpu_checks}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
rm -f "$OUT/gpu_checks.tar.gz" "$OUT/summary.txt" "$OUT/summary.json"
SCRATCH="$(mktemp -d)"
RESULTS="$SCRATCH/gpu_checks"  # the archive's one folder
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
STARTED=$SECONDS

archive() {  # the results so far into $OUT, replacing the last archive in one rename
    [ -s "$RESULTS/summary_errors.log" ] || rm -f "$RESULTS/summary_errors.log"
    cp "$RESULTS/summary.txt" "$OUT/summary.txt" 2>/dev/null
    cp "$RESULTS/summary.json" "$OUT/summary.json" 2>/dev/null
    tar -czf "$OUT/gpu_checks.tar.gz.partial" -C "$SCRATCH" gpu_checks \
        && mv -f "$OUT/gpu_checks.tar.gz.partial" "$OUT/gpu_checks.tar.gz"
}

step() {  # step NAME SECONDS COMMAND...: run under a time limit into $RESULTS/NAME.log, one summary line
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS line
    echo "== $name (limit $limit s)"
    timeout --kill-after=5 "$limit" "$@" > "$RESULTS/$name.log" 2>&1
    local rc=$?
    local seconds=$((SECONDS - started))
    line=$("$PY" scripts/gpu_checks.py summarise --step "$name" --rc "$rc" --seconds "$seconds" \
        --limit "$limit" --results "$RESULTS" 2>> "$RESULTS/summary_errors.log") \
        || line="$name: exit $rc in $seconds of $limit s (no headline: see summary_errors.log)"
    echo "$line" >> "$RESULTS/summary.txt"
    tail -n 12 "$RESULTS/$name.log"
    echo "$line"
    archive
}

if [ "$SMOKE" = 1 ]; then
    echo "smoke mode: tiny shapes on $($PY -c 'import platform; print(platform.machine())')"
    PREPARE=(--tiny)
    PYTEST_SELECT=(-k "hand_worked or bad_inputs")  # the plumbing, not the kernels: those have their own tests
    LOGPROBS_PRESET=check-smoke
    STEP_ARGS=(--preset tiny --steps 1 --warmup-tokens 4)
    KERNELS_ENV=(env TRITON_INTERPRET=1)  # Triton on CPU tensors (set before anything imports triton)
else
    MODEL_DIR="${GPU_CHECKS_MODEL_DIR:-/tmp/gpu_checks_model/qwen2.5-3b-random}"
    PREPARE=(--model-dir "$MODEL_DIR")
    PYTEST_SELECT=()
    KERNELS_ENV=()
    LOGPROBS_PRESET=check
    STEP_ARGS=(--preset qwen2.5-3b --model-dir "$MODEL_DIR" --steps 1 --warmup-tokens 16)
    if compgen -G ".whl/*.whl" > /dev/null; then  # bitsandbytes (and anything else carried) into a side folder
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu_checks_site .whl/*.whl 2>&1 | tail -3 | tee "$RESULTS/install.log"
        export PYTHONPATH="/tmp/gpu_checks_site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi

step prepare 45 "$PY" scripts/gpu_checks.py prepare --out "$RESULTS/prepare.json" "${PREPARE[@]}"
step test_logprobs 60 "${KERNELS_ENV[@]}" "$PY" -m pytest tests/test_logprobs.py -m "not slow" -v -p no:cacheprovider \
    --junitxml="$RESULTS/test_logprobs.xml" "${PYTEST_SELECT[@]}"
step bench_logprobs 60 "${KERNELS_ENV[@]}" "$PY" scripts/bench_logprobs.py --preset "$LOGPROBS_PRESET" \
    --out "$RESULTS/bench_logprobs.json"
step bench_step_bf16 95 "$PY" scripts/bench_step.py "${STEP_ARGS[@]}" --output "$RESULTS/bench_step_bf16.json" \
    --dtype bf16
step bench_step_fp32 100 "$PY" scripts/bench_step.py "${STEP_ARGS[@]}" --output "$RESULTS/bench_step_fp32.json" \
    --dtype fp32

echo "all steps: $((SECONDS - STARTED)) s" | tee -a "$RESULTS/summary.txt"
archive
rm -rf "$SCRATCH"
echo "done: $OUT/gpu_checks.tar.gz, $OUT/summary.txt"
