#!/usr/bin/env bash
# The GPU part of this round's issues, as ONE device call (see ../.library/device/README.md): the fused
# log-prob kernels' tests on CUDA, then the benchmarks at Qwen2.5-3B's shape (random weights: nothing can be
# downloaded there). Each step has its own time limit and the script goes on when one fails; every JSON and
# log lands in $OUT (default outputs/gpu_checks). At most 9 minutes (the steps' limits: 540 s) plus the install;
# run it with timeout_s=590.
#
# Prepare here (the GPU image has torch, triton, transformers, peft, accelerate; no bitsandbytes, einops,
# pytest, datasets or vllm), then run it on the device carrying the wheels (43 MB, .whl/ is git-ignored):
#   pip download --no-deps -d .whl bitsandbytes==0.50.2 einops pytest pluggy iniconfig pygments
#   run(command="bash scripts/gpu_checks.sh", carry=[".whl"], timeout_s=590)
# Nothing here needs `datasets` or vLLM: bench_step's preset gives the trainer synthetic prompts, and the
# samplers benchmarked are HF generate (vLLM's wheel cannot travel to that machine).
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-outputs/gpu_checks}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

if [ -d .whl ]; then
    python -m pip install -q --no-deps --no-index --find-links .whl \
        bitsandbytes einops pytest pluggy iniconfig pygments 2>&1 | tail -2
fi
python -c "import torch, bitsandbytes; print('torch', torch.__version__, torch.cuda.get_device_name())" \
    | tee "$OUT/machine.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >> "$OUT/machine.txt" 2>&1

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log, say how it ended
    local name=$1 limit=$2
    shift 2
    local started=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - started)) s" | tee -a "$OUT/summary.txt"
    tail -n 25 "$OUT/$name.log"
}

# 1. the kernels on CUDA: the Triton and chunked-torch backends against the naive reference
step test_logprobs 90 python -m pytest tests/test_logprobs.py -q -x
# 2. log-prob kernels at the recipe's token counts (M = 6,144 and 12,288, H 2048, V 151,936, bf16)
step bench_logprobs 90 python scripts/bench_logprobs.py --preset gpu --out "$OUT/bench_logprobs_gpu.json"
# 3. memory of the 4-bit policy, reference pass and update at 6 x 2,048 tokens
step bench_model_memory 90 python scripts/bench_model_memory.py --output "$OUT/bench_model_memory.json"
# 4. one GRPO step at the recipe's shape (HF sampler, gradient checkpointing on), its phase split and peak
step bench_step 150 python scripts/bench_step.py --preset qwen2.5-3b --steps 1 \
    --output "$OUT/bench_step_qwen2.5-3b.json"
# 5. the HF sampler alone at the recipe's shape (6 completions of up to 1,024 tokens): tokens/s
step bench_sampler 120 python scripts/bench_sampler.py --preset qwen2.5-3b --samplers hf \
    --out "$OUT/bench_sampler_qwen2.5-3b.json"
echo "done: $OUT"
