"""The Python half of scripts/gpu_checks.sh: the machine record and model folder, and one summary line per step.

    python3 scripts/gpu_checks.py prepare --out prepare.json --model-dir /tmp/qwen2.5-3b-random
    python3 scripts/gpu_checks.py prepare --out prepare.json --tiny          # the smoke run's tiny model
    python3 scripts/gpu_checks.py summarise --step bench_step_bf16 --rc 0 --seconds 84 --results DIR

``prepare`` writes the versions and the device to its JSON, then builds the random Qwen2.5-3B folder once
(``models.tiny.random_qwen.cached_random_qwen``: every later step reuses it) or the tiny model (its own cache).
``summarise`` reads what a step left in the results folder (``<step>.json``, or pytest's ``<step>.xml``),
prints one line (name, how it ended, seconds, the headline figures) and appends the step to
``summary.json`` there. It imports neither torch nor the project: it must work when a step broke them.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py)

PACKAGES = ["torch", "triton", "transformers", "peft", "accelerate", "bitsandbytes", "pytest"]
PHASE_NAMES = {  # bench_step's phases, as the summary line names them
    "generate": "generate",
    "old_ref_logprobs": "old/ref",
    "policy_update": "update",
    "optimizer": "optim",
    "sync": "sync",
}


# ------------------------------------------------------------------------------------------- prepare


def prepare(out: Path, model_dir: str | None, tiny: bool) -> dict:
    """Versions, device, and the model folder the benchmark steps share; the JSON is written before the
    (long) build and again after it."""
    import torch

    record: dict[str, Any] = {"python": platform.python_version(), "executable": sys.executable}
    for name in PACKAGES:
        try:
            record[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            record[name] = None
    cuda = torch.cuda.is_available()
    record["device"] = torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        record["gpu_memory_gib"] = props.total_memory / 2**30
        record["multiprocessors"] = props.multi_processor_count
        try:
            record["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            record["nvidia_smi"] = f"not run: {err}"
    print(json.dumps(record, indent=2), flush=True)
    save_json(out, record)

    start = time.perf_counter()
    if tiny:
        from models.tiny import TINY_MODEL, resolve_tiny_model

        record["model_dir"] = resolve_tiny_model(name=TINY_MODEL)
    elif model_dir:
        from models.tiny.random_qwen import cached_random_qwen

        record["model_dir"] = cached_random_qwen(model_dir)
    if "model_dir" in record:
        record["model_seconds"] = time.perf_counter() - start
        record["model_gib"] = sum(f.stat().st_size for f in Path(record["model_dir"]).glob("*")) / 2**30
        print(
            f"model folder: {record['model_dir']} ({record['model_gib']:.2f} GiB, {record['model_seconds']:.1f} s)"
        )
    save_json(out, record)
    return record


# ------------------------------------------------------------------------------------------- summarise


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict | None:
    """passed / failed / errors / skipped of a pytest JUnit XML report (None if there is none)."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    for case in root.iter("testcase"):
        tags = {child.tag for child in case}
        key = (
            "failed"
            if "failure" in tags
            else "errors"
            if "error" in tags
            else "skipped"
            if "skipped" in tags
            else "passed"
        )
        counts[key] += 1
    return counts


def prepare_headline(record: dict) -> str:
    text = f"{record.get('device')}, torch {record.get('torch')}, triton {record.get('triton')}, "
    text += f"bitsandbytes {record.get('bitsandbytes')}"
    if "model_seconds" in record:
        text += f"; model folder {record['model_gib']:.2f} GiB in {record['model_seconds']:.0f} s"
    return text


def logprobs_headline(record: dict) -> str:
    """``triton vs torch bf16: logp 0.012 (tol 0.06), grad 0.004 (tol 0.03) PASS; bf16 ms: naive 60.1 ...``"""
    parts = []
    compare = record.get("compare") or {}
    if "error" in compare:
        parts.append(f"compare: {compare['error'][:120]}")
    elif compare:
        tol = compare["tolerance"]
        parts.append(
            f"{compare['candidate']} vs {compare['reference']} {compare['dtype']}: log-probs max|diff| "
            f"{compare['logp_max_abs_diff']:.3g} (tol {tol['logp_max_abs']:g}), grad rel "
            f"{compare['grad_max_rel_diff']:.3g} (tol {tol['grad_max_rel']:g}) "
            f"{'PASS' if compare['passed'] else 'FAIL'}"
        )
    by_dtype: dict[str, list[str]] = {}
    for row in record.get("rows", []):
        figure = (
            f"{row['backend']} {row['time_s'] * 1e3:.3g} ms ({row['tflops']:.3g} TFLOP/s)"
            if "time_s" in row
            else f"{row['backend']} error"
        )
        by_dtype.setdefault(row.get("dtype", "?"), []).append(figure)
    parts += [f"{dtype}: {', '.join(figures)}" for dtype, figures in by_dtype.items()]
    return "; ".join(parts) or "no figures"


def step_headline(record: dict) -> str:
    """``step 41.2 s (generate 30.1, old/ref 2.0, update 8.0, ...), 150 tok/s, peak 14.2 GiB``"""

    def figures(part: dict) -> str:
        phases = ", ".join(f"{short} {part['seconds'][phase]:.3g}" for phase, short in PHASE_NAMES.items())
        text = f"step {part['step_seconds']:.3g} s ({phases}), {part['generate_tokens_per_second']:.4g} tok/s"
        if part.get("peak_memory_gib") is not None:
            text += f", peak {part['peak_memory_gib']:.3g} GiB"
        return text

    dtype = f"{record.get('compute_dtype')}: "
    if record.get("steps_timed"):
        text = dtype + figures(record)
    elif "warmup" in record:
        text = (
            dtype
            + f"warm-up only ({record['warmup']['completion_length']} tokens): {figures(record['warmup'])}"
        )
    else:
        text = dtype + f"no step finished (status {record.get('status')})"
    if record.get("weights_memory_gib") is not None:
        text += f"; weights {record['weights_memory_gib']:.3g} GiB"
    if record.get("load_seconds") is not None:
        text += f", load {record['load_seconds']:.0f} s"
    return text


def headline(step: str, results: Path) -> tuple[str, dict | None]:
    """The step's headline figures and the record they come from (None when it left nothing readable)."""
    if step.startswith("test_"):
        counts = junit_counts(results / f"{step}.xml")
        if counts is None:
            return "no pytest report", None
        return ", ".join(f"{n} {k}" for k, n in counts.items() if n or k == "passed"), counts
    record = read_json(results / f"{step}.json")
    if record is None:
        return "no JSON", None
    if step == "prepare":
        return prepare_headline(record), record
    if step.startswith("bench_logprobs"):
        return logprobs_headline(record), record
    if step.startswith("bench_step"):
        return step_headline(record), record
    return "", record


def how_it_ended(rc: int) -> str:
    """``timeout`` exits 124 when its limit stops the command, 137 when it had to kill it."""
    return {0: "ok", 124: "TIMED OUT", 137: "KILLED (time limit)"}.get(rc, f"FAILED (exit {rc})")


def last_log_line(path: Path, width: int = 160) -> str:
    """The last non-empty line of a step's log (the error, usually), cut to ``width`` characters."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1][:width] if lines else ""


def summarise(step: str, rc: int, seconds: int, limit: int | None, results: Path) -> str:
    """One line for summary.txt; the step, its figures and how it ended appended to summary.json."""
    text, record = headline(step, results)
    limit_text = f" of {limit}" if limit else ""
    line = f"{step}: {how_it_ended(rc)} in {seconds}{limit_text} s; {text}"
    if rc != 0:
        line += f"; log ends: {last_log_line(results / f'{step}.log')}"
    summary_path = results / "summary.json"
    summary = read_json(summary_path) or {"steps": []}
    summary["steps"].append(
        {"step": step, "rc": rc, "seconds": seconds, "limit_s": limit, "line": line, "record": record}
    )
    save_json(summary_path, summary)
    return line


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="versions, device, and the shared model folder")
    prep.add_argument("--out", type=Path, required=True)
    prep.add_argument("--model-dir", default=None, help="the random Qwen2.5-3B folder (built once)")
    prep.add_argument("--tiny", action="store_true", help="the offline tiny model instead (smoke run)")
    summ = sub.add_parser("summarise", help="one summary line for a finished step")
    summ.add_argument("--step", required=True)
    summ.add_argument("--rc", type=int, required=True)
    summ.add_argument("--seconds", type=int, required=True)
    summ.add_argument("--limit", type=int, default=None)
    summ.add_argument("--results", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "prepare":
        prepare(args.out, args.model_dir, args.tiny)
    else:
        print(summarise(args.step, args.rc, args.seconds, args.limit, args.results))


if __name__ == "__main__":
    main()
