"""Benchmark logprob_kernels.logprobs.token_logprobs: forward + backward time, peak extra memory, TFLOP/s.

    python scripts/bench_logprobs.py --preset cpu          # M=2048, H=256, V=151,936, fp32, 2 CPU cores OK
    python scripts/bench_logprobs.py --preset gpu          # H100: M=6,144 and 12,288, H=2048, bf16

One measurement = hidden [M, H] requiring grad, a frozen weight [V, H] (the recipe's tied lm_head),
`logp = token_logprobs(...)`, `(logp * grad).sum().backward()`. Effective TFLOP/s counts 4*M*H*V per
forward+backward (the two matmuls a plain implementation needs), whatever the backend really does.

Peak extra memory:
- cpu: each (backend, chunk) runs in a fresh Python process; we read the resident set size
  (/proc/self/statm) after building the inputs and the high-water mark (getrusage ru_maxrss) after
  one forward+backward. The difference is the most memory that step held on top of the inputs.
  (PyTorch's CPU allocator hands large blocks back to the OS on free, so RSS follows the live tensors;
  tracemalloc cannot see them.) Time: one more process runs every backend in turn for --repeats
  rounds after a warm-up round (wall clock); the table shows each backend's fastest round, the least
  disturbed when other jobs share the cores, and the JSON keeps every round and the median.
- gpu: torch.cuda.max_memory_allocated during the step minus memory_allocated before it; time from
  CUDA events, median of --repeats runs after warm-up (the warm-up also runs Triton's autotuner).

The table is printed and written as JSON to --out (default outputs/bench_logprobs_<preset>.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from anywhere without installing

from logprob_kernels.logprobs import token_logprobs  # noqa: E402

PRESETS = {
    "cpu": {"tokens": [2048], "hidden": 256, "vocab": 151_936, "dtype": "float32", "chunks": [64, 128, 256]},
    "gpu": {
        "tokens": [6144, 12288],
        "hidden": 2048,
        "vocab": 151_936,
        "dtype": "bfloat16",
        "chunks": [256, 512, 1024],
    },
}
# Bars the chunked / fused backends must meet, relative to naive at the same shape.
BARS = {
    "cpu": {"memory_frac": 0.05, "time_frac": 1.0, "tflops": None},
    "gpu": {"memory_frac": 0.02, "time_frac": 0.8, "tflops": 400.0},
}


def make_inputs(
    num_tokens: int, hidden_size: int, vocab: int, dtype: torch.dtype, device: str, seed: int = 0
):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen, device=device, dtype=dtype)
    weight = torch.randn(vocab, hidden_size, generator=gen, device=device, dtype=dtype)
    weight.mul_(hidden_size**-0.5)  # in place: no temporary copy inflating the memory baseline
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen, device=device)
    grad = torch.randn(num_tokens, generator=gen, device=device)
    return hidden.requires_grad_(True), weight, targets, grad


def step(backend: str, hidden, weight, targets, grad, temperature: float, chunk: int | None) -> None:
    hidden.grad = None
    if backend == "liger":  # optional comparison: liger's fused linear + mean cross-entropy
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        LigerFusedLinearCrossEntropyLoss()(weight, hidden, targets).backward()
        return
    logp = token_logprobs(hidden, weight, targets, temperature, backend, chunk_size=chunk)
    (logp * grad).sum().backward()


def max_rss_bytes() -> int:
    """The process's resident-set high-water mark (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.machine()


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure_cpu_memory_child(args) -> dict:
    """Runs in a fresh process: peak extra memory of one forward+backward of one backend."""
    dtype = getattr(torch, args.dtype)
    hidden, weight, targets, grad = make_inputs(args.tokens[0], args.hidden, args.vocab, dtype, "cpu")
    backend, chunk = args.configs[0]
    # Peak during the step minus what is resident just before it. If the process had once been
    # higher (imports), the high-water mark can only overstate the step's memory, never hide it.
    before = current_rss_bytes()
    step(backend, hidden, weight, targets, grad, args.temperature, chunk)
    return {"peak_extra_bytes": max_rss_bytes() - before}


def measure_cpu_time_child(args) -> dict:
    """Runs in one fresh process: every backend in turn, round after round, on the same inputs.

    Interleaving means a burst of load from other jobs hits every backend alike; the fastest round of
    each backend is its least disturbed one.
    """
    dtype = getattr(torch, args.dtype)
    hidden, weight, targets, grad = make_inputs(args.tokens[0], args.hidden, args.vocab, dtype, "cpu")
    times: dict[str, list[float]] = {f"{b}:{c or 0}": [] for b, c in args.configs}
    for round_index in range(args.repeats + 1):  # round 0 warms up (thread pools, page tables)
        for backend, chunk in args.configs:
            start = time.perf_counter()
            step(backend, hidden, weight, targets, grad, args.temperature, chunk)
            if round_index > 0:
                times[f"{backend}:{chunk or 0}"].append(time.perf_counter() - start)
    return times


def _child(args, mode: str, configs: list[tuple[str, int | None]], num_tokens: int) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, "--preset", "cpu", "--tokens", str(num_tokens)]
    cmd += ["--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype]
    cmd += ["--repeats", str(args.repeats), "--temperature", str(args.temperature)]
    cmd += ["--configs"] + [f"{b}:{c or 0}" for b, c in configs]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def run_cpu(args, preset: dict) -> list[dict]:
    rows = []
    configs = [("naive", None)] + [("torch", c) for c in args.chunks]
    for num_tokens in preset["tokens"]:
        for backend, chunk in configs:
            print(f"  memory: {backend} (chunk={chunk}) M={num_tokens} in a fresh process ...", flush=True)
            memory = _child(args, "memory", [(backend, chunk)], num_tokens)
            rows.append({"backend": backend, "chunk": chunk, "tokens": num_tokens, **memory})
        print(f"  time: {args.repeats} interleaved rounds of every backend, M={num_tokens} ...", flush=True)
        times = _child(args, "time", configs, num_tokens)
        for row in rows:
            if row["tokens"] == num_tokens:
                samples = times[f"{row['backend']}:{row['chunk'] or 0}"]
                row.update(time_s=min(samples), median_s=statistics.median(samples), times_s=samples)
    return rows


def run_gpu(args, preset: dict) -> list[dict]:
    dtype = getattr(torch, args.dtype)
    configs = [("naive", None)]
    configs += [("torch", c) for c in args.chunks] + [("triton", c) for c in args.chunks]
    try:
        import liger_kernel  # noqa: F401

        configs.append(("liger", None))
    except ImportError:
        print("  liger-kernel not importable: no liger column")
    rows = []
    for num_tokens in preset["tokens"]:
        for backend, chunk in configs:
            torch.cuda.empty_cache()
            hidden, weight, targets, grad = make_inputs(num_tokens, args.hidden, args.vocab, dtype, "cuda")
            row = {"backend": backend, "chunk": chunk, "tokens": num_tokens}
            try:
                step(backend, hidden, weight, targets, grad, args.temperature, chunk)  # warm-up + autotune
                torch.cuda.synchronize()
                hidden.grad = None
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                step(backend, hidden, weight, targets, grad, args.temperature, chunk)
                torch.cuda.synchronize()
                row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
                times = []
                for _ in range(args.repeats):
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    step(backend, hidden, weight, targets, grad, args.temperature, chunk)
                    end.record()
                    torch.cuda.synchronize()
                    times.append(begin.elapsed_time(end) / 1e3)
                row["time_s"] = statistics.median(times)  # CUDA events: the median is stable
                row["times_s"] = times
            except Exception as err:  # e.g. out of memory for naive at a large M: report it, go on
                row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
            print(
                f"  {backend} chunk={chunk} M={num_tokens}: {row.get('time_s', row.get('error'))}", flush=True
            )
            rows.append(row)
            del hidden, weight, targets, grad
    return rows


def add_ratios(rows: list[dict], preset_name: str, hidden_size: int, vocab: int) -> None:
    bars = BARS[preset_name]
    naive = {r["tokens"]: r for r in rows if r["backend"] == "naive" and "time_s" in r}
    for row in rows:
        if "time_s" not in row:
            continue
        row["tflops"] = 4 * row["tokens"] * hidden_size * vocab / row["time_s"] / 1e12
        ref = naive.get(row["tokens"])
        if ref is None or row["backend"] in ("naive", "liger"):
            continue
        row["memory_frac_of_naive"] = row["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
        row["time_frac_of_naive"] = row["time_s"] / ref["time_s"]
        ok = (
            row["memory_frac_of_naive"] <= bars["memory_frac"]
            and row["time_frac_of_naive"] <= bars["time_frac"]
        )
        if bars["tflops"] is not None:
            ok = ok and row["tflops"] >= bars["tflops"]
        row["meets_bars"] = ok


def print_table(rows: list[dict], preset_name: str) -> None:
    bars = BARS[preset_name]
    header = f"{'backend':<8} {'chunk':>6} {'M':>6} {'time (s)':>10} {'peak extra':>12} {'TFLOP/s':>9} {'mem/naive':>10} {'time/naive':>11}  bars"
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['backend']:<8} {str(r['chunk'] or '-'):>6} {r['tokens']:>6}  {r['error']}")
            continue
        mem = f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB"
        mem_frac = f"{r['memory_frac_of_naive']:.2%}" if "memory_frac_of_naive" in r else "-"
        time_frac = f"{r['time_frac_of_naive']:.2f}x" if "time_frac_of_naive" in r else "-"
        verdict = {True: "PASS", False: "FAIL"}.get(r.get("meets_bars"), "")
        print(
            f"{r['backend']:<8} {str(r['chunk'] or '-'):>6} {r['tokens']:>6} {r['time_s']:>10.4f} {mem:>12} "
            f"{r['tflops']:>9.3f} {mem_frac:>10} {time_frac:>11}  {verdict}"
        )
    bar_text = f"memory <= {bars['memory_frac']:.0%} of naive, time <= {bars['time_frac']}x naive"
    if bars["tflops"]:
        bar_text += f", >= {bars['tflops']:.0f} TFLOP/s"
    print(f"bars: {bar_text}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument(
        "--out", default=None, help="JSON path (default outputs/bench_logprobs_<preset>.json)"
    )
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="override the preset's M values")
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--vocab", type=int, default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="chunk sizes to try")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default: cpu 3, gpu 10)")
    parser.add_argument("--configs", nargs="+", default=None, help=argparse.SUPPRESS)  # backend:chunk
    parser.add_argument("--child", choices=["memory", "time"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    args.tokens = args.tokens or preset["tokens"]
    args.hidden = args.hidden or preset["hidden"]
    args.vocab = args.vocab or preset["vocab"]
    args.dtype = args.dtype or preset["dtype"]
    args.chunks = args.chunks or preset["chunks"]
    args.repeats = args.repeats or (3 if args.preset == "cpu" else 10)

    if args.child:
        args.configs = [(c.split(":")[0], int(c.split(":")[1]) or None) for c in args.configs]
        measure = measure_cpu_memory_child if args.child == "memory" else measure_cpu_time_child
        print(json.dumps(measure(args)))
        return

    preset = dict(preset, tokens=args.tokens)
    print(
        f"preset={args.preset} M={args.tokens} H={args.hidden} V={args.vocab} dtype={args.dtype} "
        f"T={args.temperature} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    if args.preset == "cpu":
        print("  triton: skipped on CPU (it only runs there under the slow TRITON_INTERPRET interpreter)")
        rows = run_cpu(args, preset)
        device = f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"
    else:
        if not torch.cuda.is_available():
            sys.exit("--preset gpu needs a CUDA device")
        rows = run_gpu(args, preset)
        device = torch.cuda.get_device_name()
    add_ratios(rows, args.preset, args.hidden, args.vocab)
    print()
    print_table(rows, args.preset)

    out = Path(args.out or f"outputs/bench_logprobs_{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "preset": args.preset,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "device": device,
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "bars": BARS[args.preset],
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
