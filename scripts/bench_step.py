"""Time one GRPO step, phase by phase, with peak memory.

    python scripts/bench_step.py --config scripts/configs/tiny-cpu.yaml          # any config (CPU or GPU)
    python scripts/bench_step.py --preset qwen2.5-3b                             # CUDA: the recipe's shape
    python scripts/bench_step.py --preset qwen2.5-3b --dtype fp32                # ... computing in fp32
    python scripts/bench_step.py --preset tiny --steps 1 --warmup-tokens 4       # anywhere: the same, tiny

Phases (``grpo.trainer.grpo_step``'s ``time/*`` metrics): generation (the sampler), scoring, old/reference
log-probs (no grad), policy update (forward + backward), optimiser (gradient all-reduce, clipping, step)
and sync (the new adapter to the sampler). The ``qwen2.5-3b`` preset builds the Qwen2.5-3B architecture with
random weights (nothing is downloaded; ``models/tiny/random_qwen.py``; ``--model-dir`` keeps the folder for the
next run), loads it in 4-bit NF4 with the rank-64 LoRA, and runs G = 6 completions of 1,024 tokens for one
1,024-token prompt with the HF sampler (random weights rarely emit EOS, so completions run to the limit).
The ``tiny`` preset runs the same steps on the offline tiny model (G = 4 completions of 16 tokens).
Any ``--field value`` of GRPOConfig after the script's own flags overrides the config (``--dtype bf16|fp32``
sets the compute dtype).

One warm-up step comes first (CUDA context, cuBLAS, Triton's autotuner, allocator); ``--warmup-tokens N``
makes its completions N tokens long, so that it costs seconds rather than a full step (the autotuner keys on
H and V, not on the token count). Then ``--steps`` timed steps. The JSON (--output) is rewritten after
loading, after the warm-up and after each timed step, so a run stopped by a time limit keeps what it had.
Prints a table at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py)

from grpo.config import load_config  # noqa: E402
from grpo.trainer import grpo_step, setup  # noqa: E402
from models.policy import resolve_dtype  # noqa: E402

PHASES = ["generate", "score", "old_ref_logprobs", "policy_update", "optimizer", "sync"]
PRESETS = {
    "qwen2.5-3b": [
        "--num_generations", "6", "--per_device_train_batch_size", "1", "--max_prompt_length", "1100",
        "--max_completion_length", "1024", "--sampler", "hf", "--lora_r", "64", "--lora_alpha", "64",
        "--load_in_4bit", "true", "--gradient_checkpointing", "true", "--beta", "0.04",
    ],
    "tiny": [
        "--model_name_or_path", "tiny-random-qwen2", "--num_generations", "4",
        "--per_device_train_batch_size", "1", "--max_prompt_length", "64", "--max_completion_length", "16",
        "--sampler", "hf", "--lora_r", "8", "--lora_alpha", "8", "--load_in_4bit", "true",
        "--gradient_checkpointing", "true", "--beta", "0.04",
    ],
}  # fmt: skip
# Prompt ids below each model's special tokens: Qwen2.5's start at 151,643, the tiny model's are 0, 1, 2.
PROMPT_IDS = {"qwen2.5-3b": (0, 151_643), "tiny": (3, 512)}
CONFIG_FIELDS = [
    "num_generations", "per_device_train_batch_size", "max_completion_length", "lora_r", "load_in_4bit",
    "gradient_checkpointing", "beta", "sampler", "logprob_backend", "dtype",
]  # fmt: skip


class SyntheticPrompts:
    """An endless stream of one fixed-length prompt (the benchmark's shape, not a data set)."""

    def __init__(self, n_tokens: int, low: int, high: int):
        from models.tiny.random_qwen import random_prompt_ids

        self.row = {
            "prompt": random_prompt_ids(n_tokens, low=low, high=high),  # ids: samplers take them as they are
            "answer": "0",
            "db_set": "gsm8k",
        }

    def rows(self, start: int, count: int) -> list[dict]:
        return [self.row] * count


def step_figures(record: dict, peak_bytes: int | None, group_size: int) -> dict:
    """One step's phase seconds, completion tokens and peak memory, from ``grpo_step``'s last record."""
    seconds = {phase: record[f"time/{phase}"] for phase in PHASES}
    tokens = record["completion_length"] * group_size
    return {
        "seconds": seconds,
        "step_seconds": sum(seconds.values()),
        "completion_tokens": tokens,
        "generate_tokens_per_second": tokens / max(seconds["generate"], 1e-9),
        "peak_memory_gib": peak_bytes / 2**30 if peak_bytes is not None else None,
    }


def summarise(steps: list[dict]) -> dict:
    """The medians over the timed steps (the figures a reader quotes)."""
    if not steps:
        return {}
    seconds = {phase: statistics.median(s["seconds"][phase] for s in steps) for phase in PHASES}
    tokens = statistics.median(s["completion_tokens"] for s in steps)
    peaks = [s["peak_memory_gib"] for s in steps if s["peak_memory_gib"] is not None]
    return {
        "seconds": seconds,
        "step_seconds": sum(seconds.values()),
        "completion_tokens_per_step": tokens,
        "generate_tokens_per_second": tokens / max(seconds["generate"], 1e-9),
        "peak_memory_gib": max(peaks) if peaks else None,
    }


def timed_step(run, cuda: bool) -> tuple[dict, int | None]:
    """One ``grpo_step``: its last metrics record and the peak CUDA memory allocated during it."""
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    record = grpo_step(run)[-1]
    return record, torch.cuda.max_memory_allocated() if cuda else None


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument(
        "--warmup-tokens",
        type=int,
        default=None,
        help="completion length of the warm-up step (default: full)",
    )
    parser.add_argument("--prompt-tokens", type=int, default=None, help="prompt length (qwen 1,024, tiny 32)")
    parser.add_argument(
        "--model-dir", default=None, help="qwen2.5-3b: the random model's folder, built there once and reused"
    )
    parser.add_argument("--output", default=None, help="JSON file (default: outputs/bench_step_<name>.json)")
    args, overrides = parser.parse_known_args()

    cfg_path = overrides[overrides.index("--config") + 1] if "--config" in overrides[:-1] else None
    cuda = torch.cuda.is_available()
    scratch = tempfile.TemporaryDirectory()
    argv = list(overrides)
    started = time.perf_counter()
    if args.preset == "qwen2.5-3b":
        if not cuda:
            raise SystemExit("--preset qwen2.5-3b needs a CUDA device (on CPU: --preset tiny)")
        from models.tiny.random_qwen import cached_random_qwen

        print("the Qwen2.5-3B architecture with random weights ...", flush=True)
        model_dir = cached_random_qwen(args.model_dir or Path(scratch.name) / "model")
        argv = ["--model_name_or_path", model_dir, *PRESETS[args.preset], *argv]
    elif args.preset == "tiny":
        argv = [*PRESETS[args.preset], *argv]
    argv += ["--output_dir", str(Path(scratch.name) / "run"), "--max_steps", str(args.steps + 1)]
    cfg = load_config(argv)
    name = args.preset or (Path(cfg_path).stem if cfg_path else "custom")
    output = Path(args.output or f"outputs/bench_step_{name}.json")
    prompts = None
    if args.preset:
        prompt_tokens = args.prompt_tokens or (1024 if args.preset == "qwen2.5-3b" else 32)
        prompts = SyntheticPrompts(prompt_tokens, *PROMPT_IDS[args.preset])

    result = {
        "name": name,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": "Qwen2.5-3B architecture, random weights"
        if args.preset == "qwen2.5-3b"
        else cfg.model_name_or_path,
        "config": {k: getattr(cfg, k) for k in CONFIG_FIELDS},
        "compute_dtype": str(resolve_dtype(cfg.dtype, "cuda" if cuda else "cpu")).removeprefix("torch."),
        "torch": torch.__version__,
        "status": "loading",
        "steps_timed": 0,
        "steps": [],
    }
    save_json(output, result)
    run = setup(cfg, prompts)
    result["load_seconds"] = time.perf_counter() - started  # model folder (if built), 4-bit load, sampler
    result["weights_memory_gib"] = torch.cuda.memory_allocated() / 2**30 if cuda else None
    result["status"] = "warm-up"
    save_json(output, result)

    # The warm-up step, with short completions when asked (the sampler's settings, then back).
    group = cfg.num_generations * cfg.per_device_train_batch_size
    full_settings = run.sampler.settings
    if args.warmup_tokens:
        run.sampler.settings = dataclasses.replace(full_settings, max_completion_length=args.warmup_tokens)
    record, peak = timed_step(run, cuda)
    run.sampler.settings = full_settings
    result["warmup"] = {"completion_length": args.warmup_tokens or cfg.max_completion_length}
    result["warmup"].update(step_figures(record, peak, group))
    result["status"] = "timing"
    save_json(output, result)

    for _ in range(args.steps):
        record, peak = timed_step(run, cuda)
        result["steps"].append(step_figures(record, peak, group))
        result.update(summarise(result["steps"]), steps_timed=len(result["steps"]))
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        save_json(output, result)
    result["status"] = "done"
    save_json(output, result)

    print(f"{'phase':<20}{'seconds':>10}")
    for phase, seconds in result.get("seconds", {}).items():
        print(f"{phase:<20}{seconds:>10.3f}")
    headline = ["step_seconds", "generate_tokens_per_second", "peak_memory_gib", "weights_memory_gib"]
    print(", ".join(f"{k} {result[k]:.3f}" for k in headline if result.get(k) is not None))
    print(f"wrote {output}")
    run.sampler.close()
    return result


if __name__ == "__main__":
    main()
