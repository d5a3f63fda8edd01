"""Run every row of docs/OBJECTIVES.md on the embedded default and fill in its measured columns.

    python scripts/run_objectives.py                       # every row, 60 steps each, then update the doc
    python scripts/run_objectives.py --rows grpo dapo gspo --steps 100 --no-update-doc

Each row is ``scripts/train.py --config scripts/configs/tiny-cpu.yaml --steps_per_generation 4`` with that row's
fields (the table's "config" column, as ``ROWS`` below spells them) and ``--max_steps``. Columns: final reward (mean reward of
the last quarter of the steps), KL (mean of the last quarter) and clip ratio (``clip_ratio/region_mean``
over every step; ``cispo_clip_ratio`` for cispo). Prints a table and writes JSON; with the doc update (the
default) the three last cells of each row of docs/OBJECTIVES.md are replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.metrics import read_metrics  # noqa: E402

# Every row: a rollout of 4 x 6 prompts feeds 4 optimiser steps, so from the second step on the data is
# off-policy and the clipped, capped and masked objectives differ (on-policy, grpo, bnpo, dapo and cispo
# have the same gradient).
BASE = ["--steps_per_generation", "4"]
# bold name in the table -> the fields of its row (on top of scripts/configs/tiny-cpu.yaml and BASE)
ROWS = {
    "grpo": [],
    "bnpo": ["--loss_type", "bnpo"],
    "dr_grpo": ["--loss_type", "dr_grpo", "--scale_rewards", "none"],
    "dapo": ["--loss_type", "dapo", "--epsilon_high", "0.28"],
    "cispo": ["--loss_type", "cispo", "--epsilon_high", "5.0"],
    "sapo": ["--loss_type", "sapo"],
    "luspo": ["--loss_type", "luspo", "--importance_sampling_level", "sequence"],
    "vespo": ["--loss_type", "vespo"],
    "gmpo": ["--loss_type", "gmpo", "--epsilon", "0.4", "--epsilon_high", "0.4"],
    "GSPO": [
        "--importance_sampling_level",
        "sequence",
        "--epsilon",
        "3e-4",
        "--epsilon_high",
        "4e-4",
        "--beta",
        "0.0",
    ],
    "dual-clip": ["--clip_ratio_c", "3.0"],
    "delta": ["--delta", "4.0"],
    "entropy mask": ["--top_entropy_quantile", "0.2"],
    "entropy bonus": ["--entropy_coef", "0.01"],
    "OPSM": ["--off_policy_mask_threshold", "0.5"],
    "bias-corrected KL": ["--use_bias_correction_kl", "true"],
    "IS correction": ["--sampler", "vllm", "--vllm_importance_sampling_mode", "sequence_mask"],
    "GDPO": ["--multi_objective_aggregation", "normalize_then_sum"],
    "dynamic sampling": ["--dynamic_sampling", "true", "--max_sampling_rounds", "4"],
}


def summarise(records: list[dict], loss_type: str) -> dict[str, float]:
    """Final reward and KL (means of the last quarter of the steps) and the mean clip ratio."""
    quarter = records[-max(len(records) // 4, 1) :]
    clip_key = "cispo_clip_ratio" if loss_type == "cispo" else "clip_ratio/region_mean"
    return {
        "steps": len(records),
        "final_reward": sum(r["reward"] for r in quarter) / len(quarter),
        "first_reward": sum(r["reward"] for r in records[: len(quarter)]) / len(quarter),
        "kl": sum(r["kl"] for r in quarter) / len(quarter),
        "clip_ratio": sum(r.get(clip_key, 0.0) for r in records) / len(records),
        "seconds": sum(r["step_time"] for r in records),
    }


def run_row(name: str, steps: int, out_root: Path) -> dict:
    fields = ROWS[name]
    output_dir = out_root / re.sub(r"[^a-z0-9]+", "_", name.lower())
    cmd = [
        sys.executable, str(ROOT / "scripts" / "train.py"), "--config", str(ROOT / "scripts/configs/tiny-cpu.yaml"),
        *BASE, *fields, "--max_steps", str(steps), "--save_steps", str(steps), "--output_dir", str(output_dir),
        "--overwrite_output_dir", "true",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["?"])[-1], "fields": fields}
    loss_type = fields[fields.index("--loss_type") + 1] if "--loss_type" in fields else "grpo"
    result = summarise(read_metrics(output_dir / "metrics.jsonl"), loss_type)
    return {**result, "wall_seconds": time.perf_counter() - started, "fields": fields}


def ratio(x: float) -> str:
    """A clip ratio for the table: three decimals, or two significant digits when below 0.01 (but zero)."""
    return f"{x:.3f}" if x == 0 or x >= 0.01 else f"{x:.1e}"


def update_doc(doc: Path, results: dict[str, dict], steps: int) -> None:
    """Replace the last three cells of each measured row of the table."""
    lines = doc.read_text().splitlines()
    for i, line in enumerate(lines):
        match = re.match(r"\| \*\*(.+?)\*\*", line)
        if not match or match.group(1) not in results or "error" in results[match.group(1)]:
            continue
        r = results[match.group(1)]
        cells = line.split(" | ")
        cells[-3:] = [
            f"{r['final_reward']:.2f} (from {r['first_reward']:.2f})",
            f"{r['kl']:.4f}",
            f"{ratio(r['clip_ratio'])} |",
        ]
        lines[i] = " | ".join(cells)
    doc.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS), metavar="ROW")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--output", default="outputs/objectives.json")
    parser.add_argument("--no-update-doc", action="store_true", help="leave docs/OBJECTIVES.md as it is")
    args = parser.parse_args()
    results = {}
    for name in args.rows:
        results[name] = run_row(name, args.steps, ROOT / "outputs" / "objectives")
        r = results[name]
        if "error" in r:
            print(f"{name:<18} error: {r['error']}", flush=True)
        else:
            print(
                f"{name:<18} reward {r['first_reward']:.3f} -> {r['final_reward']:.3f}  kl {r['kl']:.4f}  "
                f"clip {ratio(r['clip_ratio'])}  ({r['wall_seconds']:.0f} s)",
                flush=True,
            )
    report = {
        "command": "python scripts/run_objectives.py " + " ".join(sys.argv[1:]),
        "machine": f"{platform.machine()} x{os.cpu_count()} ({platform.platform()})",
        "steps": args.steps,
        "results": results,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=2))
    print(f"wrote {output}")
    if not args.no_update_doc:
        update_doc(ROOT / "docs" / "OBJECTIVES.md", results, args.steps)
        print("updated docs/OBJECTIVES.md")


if __name__ == "__main__":
    main()
