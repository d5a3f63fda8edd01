"""What a GRPO run records: one JSON line per optimiser step, TensorBoard / wandb / trackio if asked, a PNG.

The names follow TRL 1.16's, which users already know: ``reward``, ``reward_std``, ``rewards/<fn>/mean``
and ``/std``, ``kl``, ``entropy``, ``clip_ratio/region_mean``, ``frac_reward_zero_std``,
``completions/mean_length``, ``learning_rate``, ``num_tokens``, ``sampling/*``; plus ``reward/<db_set>`` and
``accuracy/<db_set>`` per data source, and the first names of this project that its users read (README)
(``completion_length``, ``lr``, ``clip_ratio``).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from einops import rearrange

from grpo.advantages import frac_zero_std_groups, nan_std, weighted_reward_sum
from grpo.loss import importance_sampling_metrics, metric_count_key, sampler_importance_weights
from rewards.answer import FULL_CREDIT


def reward_metrics(
    rewards: torch.Tensor,
    rewards_per_func: dict[str, torch.Tensor],
    db_sets: list[str],
    group_size: int,
) -> dict[str, float]:
    """Reward statistics of one batch of N completions, with TRL 1.16's names and meanings.

    rewards: [N] weighted total; rewards_per_func: name -> [N] unweighted; db_sets: N source names.
    ``reward_std`` is the std of all N rewards (TRL); ``reward_std_within_group`` the mean over groups of
    the within-group std (the spread GRPO learns from); both unbiased.

    NaN is a reward that does not apply (the function returned None), left out as TRL does:
    ``rewards/<fn>/mean`` and ``/std`` are over the completions that function scored (absent when it scored
    none of the batch), ``accuracy/<db_set>`` over those correctness scored.

    Example: rewards [1, 3, 2, 2] with G = 2 -> reward 2.0, reward_std std(1, 3, 2, 2) = 0.8165,
    reward_std_within_group mean(1.414, 0) = 0.707, frac_reward_zero_std 0.5. A function that gave
    [1, None, 0, None] logs mean 0.5 (over two completions), not 0.25.
    """
    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    out = {
        "reward": torch.nanmean(rewards).item(),
        "reward_std": nan_std(rewards).item() if rewards.numel() > 1 else 0.0,
        "reward_std_within_group": torch.nanmean(nan_std(grouped, dim=1)).item(),
        "frac_reward_zero_std": frac_zero_std_groups(rewards, group_size),
    }
    for name, values in rewards_per_func.items():
        scored = values[~torch.isnan(values)]
        if scored.numel() == 0:
            continue
        out[f"rewards/{name}/mean"] = scored.mean().item()
        out[f"rewards/{name}/std"] = scored.std().item() if scored.numel() > 1 else 0.0
    by_source: dict[str, list[int]] = defaultdict(list)
    for i, source in enumerate(db_sets):
        by_source[source].append(i)
    correctness = rewards_per_func.get("correctness_reward_func")
    for source, idx in sorted(by_source.items()):
        index = torch.tensor(idx)
        out[f"reward/{source}"] = torch.nanmean(rewards[index]).item()
        scored = correctness[index][~torch.isnan(correctness[index])] if correctness is not None else None
        if scored is not None and scored.numel() > 0:
            out[f"accuracy/{source}"] = (scored == FULL_CREDIT).float().mean().item()
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
    """Completion lengths with TRL 1.16's names. lengths: [N] tokens; truncated: [N] bool (cut at
    max_completion_length). ``*_terminated_length`` are over the completions that stopped by themselves
    (0 when none did). ``completion_length`` repeats the mean under this project's first name.

    Example: lengths [3, 5, 8], truncated [False, False, True] -> mean 5.333, clipped_ratio 0.333,
    mean_terminated_length 4.0.
    """
    lengths = lengths.float()
    finished = lengths[~truncated]
    out = {
        "completion_length": lengths.mean().item(),
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/clipped_ratio": truncated.float().mean().item(),
    }
    for name, fn in (("mean", torch.mean), ("min", torch.min), ("max", torch.max)):
        out[f"completions/{name}_terminated_length"] = fn(finished).item() if finished.numel() else 0.0
    return out


# ============================================================================ whole-batch metrics (all processes)


def add_metric_sums(
    sums: dict[str, float], loss: torch.Tensor, metrics: dict[str, float], level: str
) -> None:
    """Accumulate a micro-batch's metrics as (value x count, count), so that the whole batch's mean is one
    division at the end, whatever the micro-batch size; the loss, already normalised, is summed."""
    sums["loss"] = sums.get("loss", 0.0) + loss.item()
    for key, value in metrics.items():
        if key.startswith("num_"):
            continue
        count = metrics[metric_count_key(key, level)]
        sums[key] = sums.get(key, 0.0) + value * count
        sums[f"{key}/count"] = sums.get(f"{key}/count", 0.0) + count


def metric_means(accelerator: Any, sums: dict[str, float]) -> dict[str, float]:
    """The whole batch's metrics from every process's (sum, count) pairs: one all-reduce."""
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    total = dict(zip(keys, totals.tolist(), strict=True))
    out = {"loss": total["loss"]}
    for key in keys:
        if key != "loss" and not key.endswith("/count"):
            out[key] = total[key] / max(total[f"{key}/count"], 1.0)
    return out


def reduce_sum(accelerator: Any, value: torch.Tensor) -> float:
    if accelerator.num_processes > 1:
        value = accelerator.reduce(value.detach().to(accelerator.device).float(), reduction="sum")
    return float(value)


def sampler_metrics(batch: Any, trainer_logp: torch.Tensor, cfg: Any, accelerator: Any) -> dict[str, float]:
    """TRL's ``sampling/*`` metrics of the whole step (all processes): how far the sampler's log-probs are
    from the trainer's for the same tokens, and the importance weights that follow. batch: a
    ``grpo.rollout.StepBatch`` (old_logp, sampler_logp, completion_mask [n, T]); trainer_logp: [n, T]."""
    old_logp = (
        trainer_logp if batch.old_logp is None else batch.old_logp
    )  # the policy that sampled (trainer's numbers)
    mask = batch.completion_mask
    weights = sampler_importance_weights(
        old_logp,
        batch.sampler_logp,
        mask,
        cfg.vllm_importance_sampling_mode,
        cfg.vllm_importance_sampling_clip_min,
        cfg.effective_clip_max,
    )
    if weights.shape[1] == 1:  # one weight per sequence: spread it over the tokens to gather like the rest
        weights = weights.expand_as(mask)
    tensors = [old_logp, batch.sampler_logp, mask, weights]
    if accelerator.num_processes > 1:
        tensors = [accelerator.gather(accelerator.pad_across_processes(x, dim=1)) for x in tensors]
    old, sampled, mask, weights = tensors
    sequence_level = cfg.vllm_importance_sampling_mode.startswith("sequence")
    return importance_sampling_metrics(weights[:, :1] if sequence_level else weights, old, sampled, mask)


def gather_flat(accelerator: Any, values: torch.Tensor) -> torch.Tensor:
    """The 1-D tensors of every process, concatenated (different lengths allowed). values: [m] -> [sum m]."""
    if accelerator.num_processes == 1:
        return values
    padded = accelerator.pad_across_processes(values.float(), dim=0, pad_index=math.nan)
    gathered = accelerator.gather(padded)
    return gathered[~torch.isnan(gathered)]


# ============================================================================ printing and timing


class PhaseTimer:
    """Seconds spent in each phase of a step, as ``time/<phase>`` metrics.

    >>> timer = PhaseTimer()
    >>> with timer("generate"):
    ...     pass
    >>> list(timer.seconds)
    ['time/generate']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


def group_sample(group: Any, weights: torch.Tensor) -> dict[str, Any]:
    """A group's first completion, to print: what the model is actually writing."""
    prompt = group.row["prompt"]
    question = prompt[-1]["content"] if prompt and isinstance(prompt[-1], dict) else str(prompt)
    return {
        "question": question[-300:],
        "answer": group.row.get("answer"),
        "db_set": group.row.get("db_set"),
        "completion": group.completions[0].text,
        "reward": float(weighted_reward_sum(group.rewards_per_func[:1], weights)[0]),
    }


def format_sample(step: int, sample: dict[str, Any]) -> str:
    return (
        f"--- step {step} sample ({sample['db_set']}, gold {sample['answer']!r}, reward {sample['reward']:.3f})\n"
        f"{sample['completion'].strip()}\n---"
    )


class MetricsLogger:
    """Appends one JSON object per optimiser step to ``metrics.jsonl``, and every ``logging_steps`` steps sends
    the numbers to the ``report_to`` sink (tensorboard, wandb or trackio, as TRL's ``logging_steps`` does).

    On resume from step s, lines for steps > s (written after that checkpoint by the killed run) are
    dropped first, so the file reads as if the run had never stopped. A fresh run never finds a metrics
    file here: ``grpo.checkpoint.check_output_dir`` refused the folder or removed the old run's first.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        report_to: str = "none",
        resume_step: int = 0,
        logging_steps: int = 1,
        config: dict[str, Any] | None = None,
    ):
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.path) if r["step"] <= resume_step] if resume_step else []
        self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self.logging_steps = logging_steps
        self.report_to = report_to
        self.sink: Any = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.sink = SummaryWriter(log_dir=str(Path(output_dir) / "runs"), purge_step=resume_step + 1)
        elif report_to in ("wandb", "trackio"):  # the same init / log / finish API
            import importlib

            self.sink = importlib.import_module(report_to)
            project = os.environ.get(f"{report_to.upper()}_PROJECT", "grpo-medical")
            self.sink.init(project=project, name=Path(output_dir).name, config=config or {})

    def log(self, record: dict[str, Any]) -> None:
        with self.path.open("a") as fh:
            fh.write(json.dumps(record) + "\n")
        if self.sink is None or record["step"] % self.logging_steps:
            return
        numbers = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
        if self.report_to == "tensorboard":
            for key, value in numbers.items():
                self.sink.add_scalar(key, value, record["step"])
        else:
            self.sink.log(numbers, step=record["step"])

    def close(self) -> None:
        if self.report_to == "tensorboard" and self.sink is not None:
            self.sink.close()
        elif self.sink is not None:
            self.sink.finish()


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
