"""scripts/gpu_checks.sh, the device check: its smoke mode end to end on CPU, its time budget, its summary lines.

The smoke run is the same script as on the GPU, at tiny shapes: it must leave exactly one archive (plus the
short summaries) in $OUT, with every step's log and JSON inside, each JSON holding the figures the
summary quotes. A device call brings back at most 8 files from $OUT, and the steps' limits must leave room
for a rerun in a 15-minute lease: both are checked here, so that the script is known to work before a GPU
is lent.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_checks.sh"
STEPS = ["prepare", "test_logprobs", "bench_logprobs", "bench_step_bf16", "bench_step_fp32"]
PHASES = {"generate", "score", "old_ref_logprobs", "policy_update", "optimizer", "sync"}


def step_limits(script_text: str) -> dict[str, int]:
    """{step name: seconds} from the script's ``step NAME SECONDS COMMAND...`` lines."""
    return {name: int(limit) for name, limit in re.findall(r"^step (\w+) (\d+) ", script_text, re.M)}


def test_steps_fit_in_six_minutes_and_a_rerun_fits_the_lease():
    limits = step_limits(SCRIPT.read_text())
    assert list(limits) == STEPS
    # 45 + 60 + 60 + 95 + 100: 360 s, so that two calls (a rerun) and a machine start fit in 15 minutes
    assert sum(limits.values()) == 360


def summarise(results: Path, step: str, rc: int, seconds: int = 90, limit: int = 95) -> str:
    command = [sys.executable, str(ROOT / "scripts" / "gpu_checks.py"), "summarise", "--step", step]
    command += ["--rc", str(rc), "--seconds", str(seconds), "--limit", str(limit), "--results", str(results)]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def test_summary_line_of_a_step_stopped_after_its_warm_up(tmp_path):
    """A bench_step killed by its limit during the timed step: the line says so and quotes the warm-up, which
    the benchmark had written before (the figures below are planted, the line worked out by hand)."""
    warmup = {
        "completion_length": 16,
        "seconds": {"generate": 1.25, "score": 0.01, "old_ref_logprobs": 0.5, "policy_update": 2.0,
                    "optimizer": 0.125, "sync": 0.0},
        "step_seconds": 3.885,
        "generate_tokens_per_second": 76.8,
        "peak_memory_gib": 9.5,
    }  # fmt: skip
    record = {"compute_dtype": "bfloat16", "status": "timing", "steps_timed": 0, "warmup": warmup}
    record |= {"weights_memory_gib": 2.25, "load_seconds": 21.4}
    (tmp_path / "bench_step_bf16.json").write_text(json.dumps(record))
    (tmp_path / "bench_step_bf16.log").write_text("loading\ngenerating ...\n\n")
    line = summarise(tmp_path, "bench_step_bf16", rc=124, seconds=95)
    assert line == (
        "bench_step_bf16: TIMED OUT in 95 of 95 s; bfloat16: warm-up only (16 tokens): step 3.88 s "
        "(generate 1.25, old/ref 0.5, update 2, optim 0.125, sync 0), 76.8 tok/s, peak 9.5 GiB; "
        "weights 2.25 GiB, load 21 s; log ends: generating ..."
    )
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [(s["step"], s["rc"], s["line"]) for s in summary["steps"]] == [("bench_step_bf16", 124, line)]


def test_summary_line_of_a_step_that_left_nothing(tmp_path):
    (tmp_path / "bench_logprobs.log").write_text("Traceback ...\nRuntimeError: CUDA out of memory\n")
    line = summarise(tmp_path, "bench_logprobs", rc=1, seconds=7, limit=60)
    assert (
        line
        == "bench_logprobs: FAILED (exit 1) in 7 of 60 s; no JSON; log ends: RuntimeError: CUDA out of memory"
    )


@pytest.mark.slow
def test_smoke_run_leaves_one_archive_with_every_log_and_json(tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PY=sys.executable)
    run = subprocess.run(
        ["bash", str(SCRIPT), "--smoke"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    # What a device call brings back: at most 8 files, here the archive and the two summaries.
    assert sorted(p.name for p in out.iterdir()) == ["gpu_checks.tar.gz", "summary.json", "summary.txt"]
    with tarfile.open(out / "gpu_checks.tar.gz") as archive:
        members = {m.name: m for m in archive.getmembers() if m.isfile()}
        files = {name: archive.extractfile(m).read().decode() for name, m in members.items()}
    expected = {f"gpu_checks/{step}.log" for step in STEPS}
    expected |= {f"gpu_checks/{name}.json" for name in ["prepare", "bench_logprobs", "bench_step_bf16",
                                                         "bench_step_fp32", "summary"]}  # fmt: skip
    expected |= {"gpu_checks/test_logprobs.xml", "gpu_checks/summary.txt"}
    assert set(files) == expected, run.stdout[-3000:]
    records = {Path(name).stem: json.loads(text) for name, text in files.items() if name.endswith(".json")}

    # Every step ended well, one line each, in order, and the summary in $OUT is the archive's.
    lines = files["gpu_checks/summary.txt"].splitlines()
    assert [line.split(":")[0] for line in lines] == [*STEPS, "all steps"]
    assert all(": ok in " in line for line in lines[:-1]), lines
    assert (out / "summary.txt").read_text() == files["gpu_checks/summary.txt"]
    assert [s["step"] for s in records["summary"]["steps"]] == STEPS

    assert records["prepare"]["torch"] and Path(records["prepare"]["model_dir"], "config.json").is_file()
    assert re.search(r"testsuite .*failures=\"0\"", files["gpu_checks/test_logprobs.xml"])
    assert re.search(r"\b[1-9]\d* passed", lines[1])

    # The kernel comparison: triton against torch in bf16, with its tolerances, within them.
    logprobs = records["bench_logprobs"]
    compare = logprobs["compare"]
    assert (compare["candidate"], compare["reference"], compare["dtype"]) == ("triton", "torch", "bfloat16")
    assert compare["tolerance"] == {"logp_max_abs": 6e-2, "grad_max_rel": 3e-2}
    assert compare["passed"] and compare["logp_max_abs_diff"] <= 6e-2 and compare["grad_max_rel_diff"] <= 3e-2
    assert set(compare["vs_fp32"]) == {"triton", "torch"}
    # ... then each backend timed in both dtypes; TFLOP/s = 4 M H V / time, M = 40, H = 48, V = 600.
    rows = logprobs["rows"]
    assert sorted((r["backend"], r["dtype"]) for r in rows) == sorted(
        (b, d) for b in ("naive", "torch", "triton") for d in ("bfloat16", "float32")
    )
    for row in rows:
        assert "error" not in row, row
        assert row["tflops"] == pytest.approx(4 * 40 * 48 * 600 / row["time_s"] / 1e12)

    # One GRPO step in each dtype: phase split, the config's dtype, the warm-up's short completions.
    for name, dtype, compute in [
        ("bench_step_bf16", "bf16", "bfloat16"),
        ("bench_step_fp32", "fp32", "float32"),
    ]:
        step = records[name]
        assert (step["status"], step["steps_timed"], step["config"]["dtype"]) == ("done", 1, dtype)
        assert step["compute_dtype"] == compute
        assert set(step["seconds"]) == PHASES
        assert step["step_seconds"] == pytest.approx(sum(step["seconds"].values()))
        assert step["warmup"]["completion_length"] == 4
        # G = 4 completions of at most 16 tokens (the tiny preset)
        assert 4 <= step["completion_tokens_per_step"] <= 4 * 16
