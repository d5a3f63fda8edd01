"""Benchmark logprob_kernels.logprobs.token_logprobs: forward + backward time, peak extra memory, TFLOP/s.

    python scripts/bench_logprobs.py --preset cpu          # M=2048, H=256, V=151,936, fp32, 2 CPU cores OK
    python scripts/bench_logprobs.py --preset gpu          # H100: M=6,144 and 12,288, H=2048, bf16
    python scripts/bench_logprobs.py --preset check        # the device check: triton vs torch, fp32 and bf16
    TRITON_INTERPRET=1 python scripts/bench_logprobs.py --preset check-smoke   # the same on CPU, tiny shapes

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

The ``check`` preset (scripts/gpu_checks.sh) first compares the triton backend with the torch backend on
the same bf16 inputs at the recipe's shape (M = 6,144 tokens = 6 completions x 1,024, H = 2,048,
V = 151,936): per-token log-probs (max |difference|) and the gradient with respect to the hidden states
(max |difference| / max |torch's gradient|), each against a stated tolerance (CHECK_TOLERANCES), and
both backends against an fp32 reference (the naive backend on the same inputs upcast). Then it times
naive, torch and triton (default chunks) in bf16 and in fp32. ``check-smoke`` runs the same on CPU at a
tiny shape (triton under TRITON_INTERPRET=1), to test the script, not the kernels' speed.

The table is printed and written as JSON to --out (default outputs/bench_logprobs_<preset>.json), rewritten
after every measurement: a run stopped by a time limit keeps what it had measured.
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

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py)

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
    # The device check: compare in "dtype", then time every backend at its default chunk in "time_dtypes".
    "check": {
        "tokens": [6144],
        "hidden": 2048,
        "vocab": 151_936,
        "dtype": "bfloat16",
        "time_dtypes": ["bfloat16", "float32"],
        "chunks": [None],
    },
    "check-smoke": {
        "tokens": [40],
        "hidden": 48,
        "vocab": 600,
        "dtype": "bfloat16",
        "time_dtypes": ["bfloat16", "float32"],
        "chunks": [None],
    },
}
CHECK_PRESETS = ("check", "check-smoke")
# Bars the chunked / fused backends must meet, relative to naive at the same shape.
BARS = {
    "cpu": {"memory_frac": 0.05, "time_frac": 1.0, "tflops": None},
    "gpu": {"memory_frac": 0.02, "time_frac": 0.8, "tflops": 400.0},
    "check": {"memory_frac": 0.02, "time_frac": 0.8, "tflops": 400.0},
    "check-smoke": None,  # tiny shapes under the interpreter: no bar means anything there
}
# Triton against torch on the same inputs (tests/test_logprobs.py states the same against float64). bf16: the
# torch backend rounds each logit to bf16 (8 significant bits) before its fp32 softmax, so with logits of
# order 1 (|z| < ~6) a logit is off by up to ~0.016 and a log-prob, z_t - logsumexp(z), by up to twice that;
# triton keeps the logits in fp32. Both return the hidden-state gradient in bf16 (2^-8 relative each).
CHECK_TOLERANCES = {
    "bfloat16": {"logp_max_abs": 6e-2, "grad_max_rel": 3e-2},
    "float16": {"logp_max_abs": 1e-2, "grad_max_rel": 5e-3},
    "float32": {"logp_max_abs": 1e-4, "grad_max_rel": 1e-4},
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


def run_cpu(args, preset: dict, on_row) -> list[dict]:
    rows = []
    configs = [("naive", None)] + [("torch", c) for c in args.chunks]
    for num_tokens in preset["tokens"]:
        for backend, chunk in configs:
            print(f"  memory: {backend} (chunk={chunk}) M={num_tokens} in a fresh process ...", flush=True)
            memory = _child(args, "memory", [(backend, chunk)], num_tokens)
            rows.append(
                {"backend": backend, "chunk": chunk, "tokens": num_tokens, "dtype": args.dtype, **memory}
            )
            on_row(rows)
        print(f"  time: {args.repeats} interleaved rounds of every backend, M={num_tokens} ...", flush=True)
        times = _child(args, "time", configs, num_tokens)
        for row in rows:
            if row["tokens"] == num_tokens:
                samples = times[f"{row['backend']}:{row['chunk'] or 0}"]
                row.update(time_s=min(samples), median_s=statistics.median(samples), times_s=samples)
        on_row(rows)
    return rows


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(
    backend: str, chunk: int | None, inputs: tuple, temperature: float, repeats: int, device: str
) -> dict:
    """Time and (CUDA) peak extra memory of one backend's forward+backward on ``inputs``, after a warm-up.

    CUDA: peak = max_memory_allocated during one step minus memory_allocated before it; time = median of
    ``repeats`` steps timed with CUDA events (the warm-up also runs Triton's autotuner). Elsewhere (the CPU
    smoke run) wall-clock times and no memory figure.
    """
    hidden, weight, targets, grad = inputs
    cuda = device == "cuda"
    step(backend, hidden, weight, targets, grad, temperature, chunk)  # warm-up + autotune
    synchronize(device)
    hidden.grad = None
    row: dict = {"peak_extra_bytes": None}
    if cuda:
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(backend, hidden, weight, targets, grad, temperature, chunk)
        torch.cuda.synchronize()
        row["peak_extra_bytes"] = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            step(backend, hidden, weight, targets, grad, temperature, chunk)
            end.record()
            torch.cuda.synchronize()
            times.append(begin.elapsed_time(end) / 1e3)
        else:
            start = time.perf_counter()
            step(backend, hidden, weight, targets, grad, temperature, chunk)
            times.append(time.perf_counter() - start)
    row["time_s"] = statistics.median(times)  # CUDA events: the median is stable
    row["times_s"] = times
    return row


def timed_row(args, backend: str, chunk: int | None, num_tokens: int, dtype_name: str, device: str) -> dict:
    """One row of the table: fresh inputs, ``measure``; an error (out of memory for naive at a large M, say)
    is reported in the row and the benchmark goes on."""
    if device == "cuda":
        torch.cuda.empty_cache()
    row = {"backend": backend, "chunk": chunk, "tokens": num_tokens, "dtype": dtype_name}
    try:
        inputs = make_inputs(num_tokens, args.hidden, args.vocab, getattr(torch, dtype_name), device)
        row.update(measure(backend, chunk, inputs, args.temperature, args.repeats, device))
        del inputs
    except Exception as err:
        row["error"] = f"{type(err).__name__}: {str(err)[:200]}"
    print(
        f"  {backend} chunk={chunk} M={num_tokens} {dtype_name}: {row.get('time_s', row.get('error'))}",
        flush=True,
    )
    return row


def run_gpu(args, preset: dict, on_row) -> list[dict]:
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
            rows.append(timed_row(args, backend, chunk, num_tokens, args.dtype, "cuda"))
            on_row(rows)
    return rows


def compare_backends(
    candidate: str, reference: str, num_tokens: int, hidden_size: int, vocab: int, dtype_name: str,
    temperature: float, device: str,
) -> dict:  # fmt: skip
    """``candidate`` against ``reference`` on the same inputs: log-probs [M] and d(sum logp * g)/d hidden [M, H].

    Also each of them against an fp32 reference (the naive backend, one log_softmax over the full
    [M, V] logits, on the same inputs upcast to fp32), which says which of the two is the closer one.
    Returns the differences, CHECK_TOLERANCES[dtype] and ``passed`` (candidate vs reference within them).
    """
    hidden, weight, targets, grad = make_inputs(
        num_tokens, hidden_size, vocab, getattr(torch, dtype_name), device
    )
    outputs = {}
    for backend in (candidate, reference):
        hidden.grad = None
        logp = token_logprobs(hidden, weight, targets, temperature, backend)
        (logp * grad).sum().backward()
        outputs[backend] = (logp.detach().float(), hidden.grad.float())
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # a true fp32 reference: no TF32 products
    try:
        hidden32 = hidden.detach().float().requires_grad_(True)
        logp32 = token_logprobs(hidden32, weight.float(), targets, temperature, "naive")
        (logp32 * grad).sum().backward()
        outputs["fp32"] = (logp32.detach(), hidden32.grad)
    finally:
        torch.set_float32_matmul_precision(previous)

    def differences(name: str, against: str) -> dict:
        (logp_a, grad_a), (logp_b, grad_b) = outputs[name], outputs[against]
        return {
            "logp_max_abs_diff": (logp_a - logp_b).abs().max().item(),
            "logp_mean_abs_diff": (logp_a - logp_b).abs().mean().item(),
            "grad_max_rel_diff": ((grad_a - grad_b).abs().max() / grad_b.abs().max().clamp_min(1e-30)).item(),
        }

    tolerance = CHECK_TOLERANCES[dtype_name]
    result = {
        "candidate": candidate,
        "reference": reference,
        "dtype": dtype_name,
        "tokens": num_tokens,
        "tolerance": tolerance,
        **differences(candidate, reference),
        "vs_fp32": {candidate: differences(candidate, "fp32"), reference: differences(reference, "fp32")},
    }
    result["passed"] = (
        result["logp_max_abs_diff"] <= tolerance["logp_max_abs"]
        and result["grad_max_rel_diff"] <= tolerance["grad_max_rel"]
    )
    return result


def print_comparison(comparison: dict) -> None:
    c, tol = comparison, comparison["tolerance"]
    print(
        f"{c['candidate']} vs {c['reference']}, {c['dtype']}, M={c['tokens']}: "
        f"log-probs max |diff| {c['logp_max_abs_diff']:.3g} (tolerance {tol['logp_max_abs']:g}, "
        f"mean {c['logp_mean_abs_diff']:.3g}), hidden gradient max |diff| / max |grad| "
        f"{c['grad_max_rel_diff']:.3g} (tolerance {tol['grad_max_rel']:g}): "
        f"{'PASS' if c['passed'] else 'FAIL'}"
    )
    for backend, d in c["vs_fp32"].items():
        print(
            f"  {backend} vs fp32 reference: log-probs max |diff| {d['logp_max_abs_diff']:.3g}, "
            f"gradient {d['grad_max_rel_diff']:.3g}"
        )


def run_check(args, preset: dict, record: dict, save) -> list[dict]:
    """The device check: the comparison first (the figure that matters most if time runs out), then every
    backend at its default chunk, in each of ``time_dtypes``; ``save()`` after each measurement."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    num_tokens = preset["tokens"][0]
    try:
        record["compare"] = compare_backends(
            "triton", "torch", num_tokens, args.hidden, args.vocab, args.dtype, args.temperature, device
        )
        print_comparison(record["compare"])
    except Exception as err:  # e.g. triton on CPU without the interpreter: say so, time the others
        record["compare"] = {"error": f"{type(err).__name__}: {str(err)[:300]}"}
        print(f"compare: {record['compare']['error']}")
    save()
    rows = record["rows"]
    for dtype_name in args.time_dtypes:
        for backend in ("naive", "torch", "triton"):
            rows.append(timed_row(args, backend, None, num_tokens, dtype_name, device))
            add_ratios(rows, args.preset, args.hidden, args.vocab)
            save()
    return rows


def add_ratios(rows: list[dict], preset_name: str, hidden_size: int, vocab: int) -> None:
    """Effective TFLOP/s of every timed row; memory and time as fractions of naive at the same M and dtype,
    and whether the preset's bars are met."""
    bars = BARS[preset_name]
    naive = {(r["tokens"], r.get("dtype")): r for r in rows if r["backend"] == "naive" and "time_s" in r}
    for row in rows:
        if "time_s" not in row:
            continue
        row["tflops"] = 4 * row["tokens"] * hidden_size * vocab / row["time_s"] / 1e12
        ref = naive.get((row["tokens"], row.get("dtype")))
        if ref is None or row["backend"] in ("naive", "liger"):
            continue
        if row["peak_extra_bytes"] is not None and ref["peak_extra_bytes"] is not None:
            row["memory_frac_of_naive"] = row["peak_extra_bytes"] / max(ref["peak_extra_bytes"], 1)
        row["time_frac_of_naive"] = row["time_s"] / ref["time_s"]
        if bars is None or "memory_frac_of_naive" not in row:
            continue
        ok = (
            row["memory_frac_of_naive"] <= bars["memory_frac"]
            and row["time_frac_of_naive"] <= bars["time_frac"]
        )
        if bars["tflops"] is not None:
            ok = ok and row["tflops"] >= bars["tflops"]
        row["meets_bars"] = ok


def print_table(rows: list[dict], preset_name: str) -> None:
    bars = BARS[preset_name]
    header = f"{'backend':<8} {'chunk':>6} {'M':>6} {'dtype':>9} {'time (s)':>10} {'peak extra':>12} {'TFLOP/s':>9} {'mem/naive':>10} {'time/naive':>11}  bars"
    print(header)
    print("-" * len(header))
    for r in rows:
        head = f"{r['backend']:<8} {str(r['chunk'] or '-'):>6} {r['tokens']:>6} {r.get('dtype', ''):>9}"
        if "error" in r:
            print(f"{head}  {r['error']}")
            continue
        mem = f"{r['peak_extra_bytes'] / 2**20:,.1f} MiB" if r["peak_extra_bytes"] is not None else "-"
        mem_frac = f"{r['memory_frac_of_naive']:.2%}" if "memory_frac_of_naive" in r else "-"
        time_frac = f"{r['time_frac_of_naive']:.2f}x" if "time_frac_of_naive" in r else "-"
        verdict = {True: "PASS", False: "FAIL"}.get(r.get("meets_bars"), "")
        print(
            f"{head} {r['time_s']:>10.4f} {mem:>12} {r['tflops']:>9.3f} {mem_frac:>10} {time_frac:>11}  {verdict}"
        )
    if bars is None:
        print("bars: none at this preset")
        return
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
    parser.add_argument(
        "--time-dtypes", nargs="+", default=None, choices=["float32", "bfloat16", "float16"],
        help="check presets: the dtypes each backend is timed in (default bfloat16 float32)",
    )  # fmt: skip
    parser.add_argument("--chunks", type=int, nargs="+", default=None, help="chunk sizes to try")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs (default: cpu 3, gpu 10, check 5, check-smoke 2)",
    )
    parser.add_argument("--configs", nargs="+", default=None, help=argparse.SUPPRESS)  # backend:chunk
    parser.add_argument("--child", choices=["memory", "time"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    preset = PRESETS[args.preset]
    args.tokens = args.tokens or preset["tokens"]
    args.hidden = args.hidden or preset["hidden"]
    args.vocab = args.vocab or preset["vocab"]
    args.dtype = args.dtype or preset["dtype"]
    args.time_dtypes = args.time_dtypes or preset.get("time_dtypes", [args.dtype])
    args.chunks = args.chunks or preset["chunks"]
    args.repeats = args.repeats or {"cpu": 3, "gpu": 10, "check": 5, "check-smoke": 2}[args.preset]

    if args.child:
        args.configs = [(c.split(":")[0], int(c.split(":")[1]) or None) for c in args.configs]
        measure_child = measure_cpu_memory_child if args.child == "memory" else measure_cpu_time_child
        print(json.dumps(measure_child(args)))
        return

    preset = dict(preset, tokens=args.tokens)
    print(
        f"preset={args.preset} M={args.tokens} H={args.hidden} V={args.vocab} dtype={args.dtype} "
        f"T={args.temperature} torch={torch.__version__} threads={torch.get_num_threads()}"
    )
    cuda = torch.cuda.is_available()
    if args.preset in ("gpu", "check") and not cuda:
        sys.exit(f"--preset {args.preset} needs a CUDA device (on CPU: --preset cpu or check-smoke)")
    out = Path(args.out or f"outputs/bench_logprobs_{args.preset}.json")
    record = {
        "preset": args.preset,
        "tokens": args.tokens,
        "hidden": args.hidden,
        "vocab": args.vocab,
        "dtype": args.dtype,
        "temperature": args.temperature,
        "device": torch.cuda.get_device_name()
        if cuda
        else f"{cpu_model()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads",
        "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "bars": BARS[args.preset],
        "rows": [],
    }
    if args.preset in CHECK_PRESETS:
        record["time_dtypes"] = args.time_dtypes

    def save(rows: list[dict] | None = None) -> None:
        if rows is not None:
            record["rows"] = rows
            add_ratios(rows, args.preset, args.hidden, args.vocab)
        save_json(out, record)

    save()
    if args.preset == "cpu":
        print("  triton: skipped on CPU (it only runs there under the slow TRITON_INTERPRET interpreter)")
        rows = run_cpu(args, preset, save)
    elif args.preset == "gpu":
        rows = run_gpu(args, preset, save)
    else:
        rows = run_check(args, preset, record, save)
    save(rows)
    print()
    print_table(rows, args.preset)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
