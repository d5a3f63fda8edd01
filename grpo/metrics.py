"""What a GRPO run records: one JSON line per optimiser step, TensorBoard if asked, a PNG at the end.

The names follow TRL's, which users already know: ``reward``, ``reward_std``, ``rewards/<fn>/mean``,
``kl``, ``clip_ratio``, ``frac_reward_zero_std``, ``completion_length``, plus ``reward/<db_set>`` and
``accuracy/<db_set>`` per data source.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from grpo.advantages import frac_zero_std_groups
from rewards.answer import FULL_CREDIT


def reward_metrics(
    rewards: torch.Tensor,
    rewards_per_func: dict[str, torch.Tensor],
    db_sets: list[str],
    group_size: int,
) -> dict[str, float]:
    """Reward statistics of one batch of N completions.

    rewards: [N] weighted total; rewards_per_func: name -> [N] unweighted; db_sets: N source names.
    ``reward_std`` is the mean over groups of the within-group std (the spread GRPO learns from).

    Example: rewards [1, 3, 2, 2] with G = 2 -> reward 2.0, reward_std mean(1.414, 0) = 0.707,
    frac_reward_zero_std 0.5.
    """
    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    out = {
        "reward": rewards.mean().item(),
        "reward_std": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": frac_zero_std_groups(rewards, group_size),
    }
    for name, values in rewards_per_func.items():
        out[f"rewards/{name}/mean"] = values.mean().item()
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(db_sets):
        by_source[source].append(i)
    correctness = rewards_per_func.get("correctness_reward_func")
    for source, idx in sorted(by_source.items()):
        index = torch.tensor(idx)
        out[f"reward/{source}"] = rewards[index].mean().item()
        if correctness is not None:
            out[f"accuracy/{source}"] = (correctness[index] == FULL_CREDIT).float().mean().item()
    return out


def sampler_mismatch(
    sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's for the same tokens.

    sampler_logp, trainer_logp, mask: [N, T]. Returns
      ``mismatch/logp_abs_diff`` mean over real tokens of |trainer - sampler|,
      ``mismatch/logp_abs_diff_max`` its max, and for the sequence-level importance ratio
      ``exp(sum_t (trainer - sampler))`` (the factor by which the trainer's policy is more likely to
      produce the whole completion than the sampler was) its ``mismatch/seq_ratio_mean``, ``_min``, ``_max``.

    Both sides are log-probs of the sampled token at temperature T (see the module docstring). The two
    differ because vLLM runs other kernels (and, with a 4-bit trainer, a 16-bit base: docs/SAMPLING.md).

    Example: sampler [[-1.0, -2.0]], trainer [[-1.1, -1.8]], mask [[1, 1]] -> abs diff mean 0.15,
    max 0.2, sequence ratio exp(-0.1 + 0.2) = exp(0.1) = 1.105.
    """
    if not (sampler_logp.shape == trainer_logp.shape == mask.shape):
        raise ValueError(
            f"shapes differ: sampler_logp {tuple(sampler_logp.shape)}, trainer_logp "
            f"{tuple(trainer_logp.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.detach().double()
    diff = (trainer_logp.detach().double() - sampler_logp.detach().double()) * mask
    tokens = mask.sum().clamp(min=1)
    seq_ratio = torch.exp(diff.sum(dim=1))  # float64: sums over long completions stay finite far longer
    abs_diff = diff.abs()
    return {
        "mismatch/logp_abs_diff": (abs_diff.sum() / tokens).item(),
        "mismatch/logp_abs_diff_max": abs_diff.max().item(),
        "mismatch/seq_ratio_mean": seq_ratio.mean().item(),
        "mismatch/seq_ratio_min": seq_ratio.min().item(),
        "mismatch/seq_ratio_max": seq_ratio.max().item(),
    }


def length_metrics(lengths: torch.Tensor, truncated: torch.Tensor) -> dict[str, float]:
    """lengths: [N] completion lengths in tokens; truncated: [N] bool (hit max_completion_length)."""
    lengths = lengths.float()
    return {
        "completion_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
    }


class MetricsLogger:
    """Appends one JSON object per step to ``metrics.jsonl`` (and TensorBoard when asked).

    On resume from step s, lines for steps > s (written after that checkpoint by the killed run)
    are dropped first, so the file reads as if the run had never stopped.
    """

    def __init__(self, output_dir: str | os.PathLike, report_to: str = "none", resume_step: int = 0):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.writer = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(Path(output_dir) / "runs"), purge_step=resume_step + 1)

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl ([] if it does not exist); a torn last line is ignored."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut by a kill
    return records


def plot_metrics(metrics_path: str | os.PathLike, png_path: str | os.PathLike) -> Path:
    """PNG of total reward, each reward function, per-source reward and KL against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)

    def series(key):  # only the steps that logged the key (eval/* comes every eval_steps)
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    keys = sorted({k for r in records for k in r})
    panels = [
        ("total reward", ["reward"] + [k for k in keys if k.startswith("eval/reward")]),
        ("reward functions (unweighted means)", [k for k in keys if k.startswith("rewards/")]),
        ("reward per source", [k for k in keys if k.startswith("reward/")]),
        ("KL to reference", ["kl"]),
    ]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for ax, (title, names) in zip(axes.flat, panels, strict=True):
        for name in names:
            xs, ys = series(name)
            sparse = len(xs) < len(records)  # evaluation points: mark them
            label = name.replace("rewards/", "").replace("/mean", "")
            ax.plot(xs, ys, label=label, marker="o" if sparse else None, markersize=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        if names:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
