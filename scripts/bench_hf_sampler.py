"""Where the HF sampler's time goes: model forward, logits processors, generate's loop, our code around it.

    python scripts/bench_hf_sampler.py                               # the embedded default (tiny-cpu.yaml)
    python scripts/bench_hf_sampler.py --baseline OLD_hf_sampler.py  # A/B against another copy of the file
    python scripts/bench_hf_sampler.py --config FILE --prompts 6 --repeats 9 --profile 25

The shape is the config's: ``per_device_train_batch_size`` prompts (the first rows of its training stream,
chat template applied) x ``num_generations`` completions of at most ``max_completion_length`` tokens, at its
temperature / top-k / top-p. One measurement = one ``sampler.generate`` call (after one warm-up call), split
by timers around:

- ``forward``: the HF model's forward (prefill and each decoding step, KV-cache update included);
- ``processors``: the logits processors of each step (warpers, sampling, log-prob recording);
- ``generate_loop``: the rest of ``model.generate`` (setup, argmax / multinomial, stopping criteria, concat);
- ``outside_generate``: the sampler's code around it (padding, configs, RNG, stop detection, decoding text).

For a 4-bit model it also times ``HFSampler(dequantize_once=False)`` (bitsandbytes dequantising every
4-bit weight at every decoding step) beside the default, which dequantises once per call.

With ``--baseline FILE`` (an ``HFSampler`` in another copy of ``models/hf_sampler.py``) all run on the same
model and prompts, interleaved A B C, C B A, ..., so that a shared, busy machine slows all alike: compare
the medians of the paired ratios. ``--clock cpu`` times this process's CPU time instead of the wall clock;
with ``--threads 1`` too, no thread spins waiting for another, and the figures move least when other jobs
share the cores.
Prints a table and writes JSON to --out (default outputs/bench_hf_sampler.json).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import json
import platform
import pstats
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from data.mixture import build_train_dataset  # noqa: E402
from grpo.config import load_config  # noqa: E402
from models.forward import causal_lm  # noqa: E402
from models.hf_sampler import HFSampler  # noqa: E402
from models.policy import load_policy  # noqa: E402
from models.samplers import SamplingSettings, derive_seed  # noqa: E402

PARTS = ["forward", "processors", "generate_loop", "outside_generate"]


def load_sampler_class(path: str) -> type:
    """The ``HFSampler`` class of another copy of models/hf_sampler.py (e.g. the version before a change)."""
    spec = importlib.util.spec_from_file_location("baseline_hf_sampler", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.HFSampler


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}  # cpu: this process's CPU time, all threads


@contextmanager
def split_timers(model, seconds: dict, clock):
    """Add to ``seconds`` the time of the HF model's forwards, of the logits processors and of generate."""
    from transformers import LogitsProcessorList

    hf_model = causal_lm(model)
    started: list[float] = []

    def before(*_):
        sync()
        started.append(clock())

    def after(*_):
        sync()
        seconds["forward"] += clock() - started.pop()

    hooks = [hf_model.register_forward_pre_hook(before), hf_model.register_forward_hook(after)]
    original_call = LogitsProcessorList.__call__
    original_generate = model.generate

    def timed_processors(self, input_ids, scores, **kwargs):
        start = clock()
        out = original_call(self, input_ids, scores, **kwargs)
        sync()
        seconds["processors"] += clock() - start
        return out

    def timed_generate(*args, **kwargs):
        start = clock()
        out = original_generate(*args, **kwargs)
        sync()
        seconds["generate"] += clock() - start
        return out

    LogitsProcessorList.__call__ = timed_processors
    model.generate = timed_generate  # an instance attribute: shadows the method until deleted
    try:
        yield
    finally:
        LogitsProcessorList.__call__ = original_call
        del model.generate
        for hook in hooks:
            hook.remove()


def measure(sampler, prompt_ids, num_generations: int, seeds: list[int], clock) -> dict:
    """One timed ``generate`` call, split into PARTS (seconds of ``clock``), plus its total and the tokens."""
    seconds = {"forward": 0.0, "processors": 0.0, "generate": 0.0}
    with split_timers(sampler.model, seconds, clock):
        sync()
        start = clock()
        outputs = sampler.generate(prompt_ids, num_generations, seeds)
        sync()
        total = clock() - start
    return {
        "total": total,
        "forward": seconds["forward"],
        "processors": seconds["processors"],
        "generate_loop": seconds["generate"] - seconds["forward"] - seconds["processors"],
        "outside_generate": total - seconds["generate"],
        "tokens": sum(len(o.token_ids) for o in outputs),
    }


def summarise(runs: list[dict]) -> dict:
    medians = {key: statistics.median(r[key] for r in runs) for key in ["total", *PARTS, "tokens"]}
    return {"median": medians, "runs": runs}


def main() -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", default="scripts/configs/tiny-cpu.yaml")
    parser.add_argument("--prompts", type=int, default=None, help="default: per_device_train_batch_size")
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per sampler")
    parser.add_argument("--baseline", default=None, help="another hf_sampler.py to compare with (A B B A)")
    parser.add_argument(
        "--clock",
        choices=list(CLOCKS),
        default="wall",
        help="cpu: less sensitive to other jobs on the machine",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--profile", type=int, default=0, help="also cProfile one call: print the top N")
    parser.add_argument("--out", default="outputs/bench_hf_sampler.json")
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)  # 1: no thread waits for another (steadier on a busy machine)
    config = load_config(["--config", args.config, "--output_dir", "outputs/bench_hf_sampler"])
    model, tokenizer = load_policy(config)
    model.train()  # as the trainer leaves it
    n_prompts = args.prompts or config.per_device_train_batch_size
    rows = build_train_dataset(config, tokenizer).rows(0, n_prompts)
    settings = SamplingSettings.from_config(config)
    samplers = {"current": HFSampler(model, tokenizer, settings)}
    if (
        config.load_in_4bit
    ):  # the same sampler, dequantising the 4-bit base at every step as bitsandbytes does
        samplers["per_step_dequant"] = HFSampler(model, tokenizer, settings, dequantize_once=False)
    if args.baseline:
        samplers["baseline"] = load_sampler_class(args.baseline)(model, tokenizer, settings)
    prompt_ids = samplers["current"].encode([row["prompt"] for row in rows])
    seeds = [derive_seed(config.seed, 0, p) for p in range(n_prompts)]
    group = config.num_generations
    lengths = [len(ids) for ids in prompt_ids]
    device = next(model.parameters()).device
    print(
        f"{n_prompts} prompts ({min(lengths)}-{max(lengths)} tokens) x {group} completions of <= "
        f"{settings.max_completion_length} tokens, {config.model_name_or_path}, 4-bit {config.load_in_4bit}, "
        f"device {device}, {torch.get_num_threads()} threads"
    )

    for sampler in samplers.values():  # warm-up
        sampler.generate(prompt_ids, group, seeds)
    runs: dict[str, list[dict]] = {name: [] for name in samplers}
    names = list(samplers)
    for r in range(args.repeats):
        for name in names if r % 2 == 0 else names[::-1]:  # A B C, C B A, ...
            runs[name].append(measure(samplers[name], prompt_ids, group, seeds, CLOCKS[args.clock]))

    results = {name: summarise(r) for name, r in runs.items()}
    print(f"\nmedian of {args.repeats} calls, {args.clock}-clock seconds (share of the total)")
    print(f"{'sampler':<17}{'total':>9}" + "".join(f"{part:>22}" for part in PARTS) + f"{'tokens':>8}")
    for name, result in results.items():
        m = result["median"]
        shares = "".join(f"{m[part]:>13.4f} ({100 * m[part] / m['total']:4.1f}%)" for part in PARTS)
        print(f"{name:<17}{m['total']:>9.3f}{shares}{m['tokens']:>8.0f}")
    for other in names[1:]:  # paired by round: both ran within seconds of each other
        ratios = [a["total"] / b["total"] for a, b in zip(runs["current"], runs[other], strict=True)]
        median = statistics.median(ratios)
        q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else ratios * 3
        spread = f"quartiles {q1:.3f}-{q3:.3f}"
        print(f"current / {other}: {len(ratios)} paired ratios, median {median:.3f} ({spread})")
        results[f"ratio_current_to_{other}"] = {"median": median, "quartiles": [q1, q3], "ratios": ratios}

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        samplers["current"].generate(prompt_ids, group, seeds)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(args.profile)

    report = {
        "command": " ".join(sys.argv),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "config": args.config,
        "clock": args.clock,
        "prompts": n_prompts,
        "prompt_tokens": lengths,
        "num_generations": group,
        "max_completion_length": settings.max_completion_length,
        "results": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out}")
    return report


if __name__ == "__main__":
    main()
