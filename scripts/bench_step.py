"""Time one GRPO step, phase by phase, with peak memory.

    python scripts/bench_step.py --config scripts/configs/tiny-cpu.yaml          # any config (CPU or GPU)
    python scripts/bench_step.py --preset qwen2.5-3b                             # CUDA: the recipe's shape

Phases (``grpo.trainer.grpo_step``'s ``time/*`` metrics): generation (the sampler), scoring, old/reference
log-probs (no grad), policy update (forward + backward), optimiser (gradient all-reduce, clipping, step)
and sync (the new adapter to the sampler). The ``qwen2.5-3b`` preset builds the Qwen2.5-3B architecture with random
weights (nothing is downloaded; ``models/tiny/random_qwen.py``), loads it in 4-bit NF4 with the rank-64
LoRA, and runs G = 6 completions of 1,024 tokens for one 1,024-token prompt with the HF sampler
(random weights rarely emit EOS, so completions run to the limit). Any ``--field value`` of
GRPOConfig after the script's own flags overrides the config. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo.config import load_config  # noqa: E402
from grpo.trainer import grpo_step, setup  # noqa: E402

PHASES = ["generate", "score", "old_ref_logprobs", "policy_update", "optimizer", "sync"]
QWEN_PRESET = [
    "--num_generations", "6", "--per_device_train_batch_size", "1", "--max_prompt_length", "1100",
    "--max_completion_length", "1024", "--sampler", "hf", "--lora_r", "64", "--lora_alpha", "64",
    "--load_in_4bit", "true", "--gradient_checkpointing", "true", "--beta", "0.04",
]  # fmt: skip


class SyntheticPrompts:
    """An endless stream of one fixed-length prompt (the benchmark's shape, not a data set)."""

    def __init__(self, n_tokens: int):
        from models.tiny.random_qwen import random_prompt_ids

        self.row = {
            "prompt": random_prompt_ids(n_tokens),  # token ids: samplers take them as they are
            "answer": "0",
            "db_set": "gsm8k",
        }

    def rows(self, start: int, count: int) -> list[dict]:
        return [self.row] * count


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=["qwen2.5-3b"], default=None)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--prompt-tokens", type=int, default=1024, help="prompt length of the preset")
    parser.add_argument("--output", default=None, help="JSON file (default: outputs/bench_step_<name>.json)")
    args, overrides = parser.parse_known_args()

    cfg_path = overrides[overrides.index("--config") + 1] if "--config" in overrides[:-1] else None
    scratch = tempfile.TemporaryDirectory()
    argv = list(overrides)
    if args.preset == "qwen2.5-3b":
        if not torch.cuda.is_available():
            raise SystemExit("--preset qwen2.5-3b needs a CUDA device")
        from models.tiny.random_qwen import write_random_qwen

        print("writing the Qwen2.5-3B architecture with random weights ...", flush=True)
        model_dir = write_random_qwen(Path(scratch.name) / "model")
        argv = ["--model_name_or_path", model_dir, *QWEN_PRESET, *argv]
    argv += ["--output_dir", str(Path(scratch.name) / "run"), "--max_steps", str(args.steps + 1)]
    cfg = load_config(argv)
    run = setup(cfg, SyntheticPrompts(args.prompt_tokens) if args.preset else None)

    rows, peaks = [], []
    for i in range(args.steps + 1):
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        record = grpo_step(run)[-1]
        if i > 0:  # step 0 warms up kernels and allocators
            rows.append(record)
            peaks.append(torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)

    def median(key):
        return statistics.median(r[key] for r in rows)

    tokens = median("completion_length") * cfg.num_generations * cfg.per_device_train_batch_size
    result = {
        "name": args.preset or (Path(cfg_path).stem if cfg_path else "custom"),
        "device": torch.cuda.get_device_name()
        if torch.cuda.is_available()
        else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "model": cfg.model_name_or_path if not args.preset else "Qwen2.5-3B architecture, random weights",
        "config": {
            k: getattr(cfg, k)
            for k in (
                "num_generations",
                "per_device_train_batch_size",
                "max_completion_length",
                "lora_r",
                "load_in_4bit",
                "gradient_checkpointing",
                "beta",
                "sampler",
                "logprob_backend",
            )
        },
        "steps_timed": len(rows),
        "seconds": {phase: median(f"time/{phase}") for phase in PHASES},
        "step_seconds": sum(median(f"time/{p}") for p in PHASES),
        "completion_tokens_per_step": tokens,
        "generate_tokens_per_second": tokens / median("time/generate"),
        "peak_memory_gib": (max(peaks) / 2**30) if peaks and peaks[0] is not None else None,
        "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "torch": torch.__version__,
    }
    print(f"{'phase':<20}{'seconds':>10}")
    for phase, seconds in result["seconds"].items():
        print(f"{phase:<20}{seconds:>10.3f}")
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}, indent=2))
    output = Path(args.output or f"outputs/bench_step_{result['name']}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print(f"wrote {output}")
    run.sampler.close()
    return result


if __name__ == "__main__":
    main()
