"""What a GRPO run records: one JSON line per optimiser step, TensorBoard / wandb / trackio if asked, a PNG.

The names follow TRL 1.16's, which users already know: ``reward``, ``reward_std``, ``rewards/<fn>/mean``
and ``/std``, ``kl``, ``entropy``, ``clip_ratio/region_mean``, ``frac_reward_zero_std``,
``completions/mean_length``, ``learning_rate``, ``num_tokens``, ``sampling/*``; plus ``reward/<db_set>`` and
``accuracy/<db_set>`` per data source, and the first names of this project that DESIGN.md promises
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

from grpo.advantages import frac_zero_std_groups
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

    Example: rewards [1, 3, 2, 2] with G = 2 -> reward 2.0, reward_std std(1, 3, 2, 2) = 0.8165,
    reward_std_within_group mean(1.414, 0) = 0.707, frac_reward_zero_std 0.5.
    """
    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    out = {
        "reward": rewards.mean().item(),
        "reward_std": rewards.std().item() if rewards.numel() > 1 else 0.0,
        "reward_std_within_group": grouped.std(dim=1).mean().item(),
        "frac_reward_zero_std": frac_zero_std_groups(rewards, group_size),
    }
    for name, values in rewards_per_func.items():
        out[f"rewards/{name}/mean"] = values.mean().item()
        out[f"rewards/{name}/std"] = values.std().item() if values.numel() > 1 else 0.0
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


def sampler_metrics(
    batch: dict[str, Any], trainer_logp: torch.Tensor, cfg: Any, accelerator: Any
) -> dict[str, float]:
    """TRL's ``sampling/*`` metrics of the whole step (all processes): how far the sampler's log-probs are
    from the trainer's for the same tokens, and the importance weights that follow."""
    old_logp = batch.get("old_logp", trainer_logp)  # the policy that sampled, as the trainer computes it
    mask = batch["completion_mask"]
    weights = sampler_importance_weights(
        old_logp,
        batch["sampler_logp"],
        mask,
        cfg.vllm_importance_sampling_mode,
        cfg.vllm_importance_sampling_clip_min,
        cfg.effective_clip_max,
    )
    if weights.shape[1] == 1:  # one weight per sequence: spread it over the tokens to gather like the rest
        weights = weights.expand_as(mask)
    tensors = [old_logp, batch["sampler_logp"], mask, weights]
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
        "reward": float(group.rewards_per_func[0] @ weights),
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


# The best score of each built-in reward function (the table in rewards/__init__.py). The plot draws
# functions with different maxima on different axes, so the 0.5-point format rewards are not flattened
# under the 2-point correctness reward. A function not listed gets its scale from the data (_nice_ceiling).
_REWARD_FUNC_MAX = {
    "xmlcount_reward_func": 0.5,
    "soft_format_reward_func": 0.5,
    "strict_format_reward_func": 0.5,
    "int_reward_func": 0.5,
    "correctness_reward_func": FULL_CREDIT,
    "soft_overlong_punishment": 0.0,  # a penalty: 0 at best, -1 at worst
}
# One quantity, two names (TRL 1.16's first, then ours before the rename): the first one logged is drawn.
_COMPLETION_LENGTH_KEYS = ("completions/mean_length", "completion_length")
_CLIP_RATIO_KEYS = ("clip_ratio/region_mean", "clip_ratio/region", "clip_ratio")


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average: each value becomes the mean of itself and the ``window - 1`` values before it.

    The first points average what there is (no zero padding), so the curve is as long as ``values`` and
    starts at the first value. ``window`` 1 returns the values unchanged.

    Example: smooth([0, 2, 4, 10], window=2) -> [0.0, 1.0, 3.0, 7.0]  (0, (0+2)/2, (2+4)/2, (4+10)/2);
             smooth([0, 2, 4, 10], window=3) -> [0.0, 1.0, 2.0, 5.333]  (0, (0+2)/2, (0+2+4)/3, (2+4+10)/3).
    """
    if window < 1:
        raise ValueError(f"smooth: window must be at least 1, got {window}")
    averages = []
    for i in range(len(values)):
        recent = values[max(0, i - window + 1) : i + 1]
        averages.append(sum(recent) / len(recent))
    return averages


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, a string, None, NaN or inf): the values a curve can show."""
    is_numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    return is_numeric and float("-inf") < value < float("inf")  # False for NaN too


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the records that logged ``key`` as a finite number, in step order.

    Sparse keys (``eval/*``, logged every ``eval_steps``) give only the steps that have them.
    """
    points = sorted((r["step"], r[key]) for r in records if _is_number(r.get(key)))
    return [step for step, _ in points], [value for _, value in points]


def _nice_ceiling(value: float) -> float:
    """The smallest of 0.1, 0.2, 0.5, 1, 2, 5, 10, ... at or above ``value`` (0 when value <= 0).

    Example: 0.37 -> 0.5, 1.08 -> 2, 3 -> 5, 0.5 -> 0.5.
    """
    if value <= 0:
        return 0.0
    scale = 10.0 ** int(f"{value:e}".split("e")[1])  # the power of ten of the leading digit
    for step in (1, 2, 5, 10):
        if step * scale >= value * (1 - 1e-9):  # tolerance: 0.5 must not become 1 through rounding
            return float(f"{step * scale:.6g}")
    raise AssertionError("unreachable: 10 x scale > value")


def _reward_funcs_by_max(records: list[dict[str, Any]], logged: set[str]) -> dict[float, list[str]]:
    """The ``rewards/<fn>/mean`` keys grouped by the function's best score, highest first.

    Built-in functions take their documented maximum (``_REWARD_FUNC_MAX``); any other function the
    nice ceiling of the highest mean it logged (0.8 -> 1), so similar scales share an axis.
    """
    groups: dict[float, list[str]] = defaultdict(list)
    for key in sorted(logged):
        if not (key.startswith("rewards/") and key.endswith("/mean")):
            continue
        name = key.removeprefix("rewards/").removesuffix("/mean")
        maximum = _REWARD_FUNC_MAX.get(name)
        if maximum is None:
            maximum = _nice_ceiling(max(_series(records, key)[1]))
        groups[maximum].append(key)
    return dict(sorted(groups.items(), reverse=True))


def _metric_panels(records: list[dict[str, Any]]) -> list[tuple[str, list[str]]]:
    """(title, metric keys) of each panel to draw, in order; a panel with nothing logged is left out.

    Panels: total reward; reward functions, one panel per maximum; accuracy per source; reward per
    source; KL; completion length; entropy; clip ratio. ``eval/*`` keys join the panel of the quantity
    they evaluate (drawn as dots). Unknown keys are ignored.
    """
    logged = {key for r in records for key, value in r.items() if key != "step" and _is_number(value)}

    def first_logged(*names: str) -> list[str]:  # [] or [the first name logged]
        return [name for name in names if name in logged][:1]

    def starting_with(prefix: str) -> list[str]:
        return sorted(key for key in logged if key.startswith(prefix))

    panels = [("total reward", first_logged("reward") + first_logged("eval/reward"))]
    for maximum, keys in _reward_funcs_by_max(records, logged).items():
        panels.append((f"reward functions scored up to {maximum:g} (unweighted means)", keys))
    panels += [
        ("accuracy per source", starting_with("accuracy/") + starting_with("eval/accuracy")),
        ("reward per source", starting_with("reward/")),
        ("KL to reference", first_logged("kl")),
        (
            "completion length (tokens)",
            first_logged(*_COMPLETION_LENGTH_KEYS) + first_logged("eval/completion_length"),
        ),
        ("entropy (nats per token)", first_logged("entropy")),
        ("clip ratio (fraction of tokens clipped)", first_logged(*_CLIP_RATIO_KEYS)),
    ]
    return [(title, keys) for title, keys in panels if keys]


def _label(key: str) -> str:
    """The legend name of a metric key: what it is without its family prefix (an eval key keeps the
    name of the training curve it evaluates, so both get one colour).

    Example: "rewards/int_reward_func/mean" -> "int_reward_func", "eval/accuracy/gsm8k" -> "gsm8k",
    "eval/accuracy" -> "all sources".
    """
    name = key.removeprefix("eval/")
    if name == "accuracy":
        return "all sources"
    if name in _COMPLETION_LENGTH_KEYS:
        return "completion length"
    for prefix in ("rewards/", "accuracy/", "reward/"):
        name = name.removeprefix(prefix)
    name = name.removesuffix("/mean")
    if key.startswith("rewards/") and name not in _REWARD_FUNC_MAX:
        name += " (scale from data)"
    return name


def _draw_panel(ax: Any, title: str, keys: list[str], records: list[dict[str, Any]], window: int) -> None:
    """One panel: each training key as a thin raw line under a bold smoothed one, each eval key as dots."""
    colours: dict[str, str] = {}  # legend name -> colour, so accuracy/gsm8k and eval/accuracy/gsm8k match
    for key in keys:
        steps, values = _series(records, key)
        label = _label(key)
        colour = colours.setdefault(label, f"C{len(colours)}")
        if key.startswith("eval/"):
            eval_style = dict(color=colour, markeredgecolor="black", markersize=5)
            ax.plot(steps, values, "o", label=f"{label} (eval)", **eval_style)
        elif len(steps) == 1:  # one point draws no line: show it as a dot
            ax.plot(steps, values, "o", color=colour, label=label)
        else:
            if window > 1:
                ax.plot(steps, values, color=colour, linewidth=0.7, alpha=0.3)
            ax.plot(steps, smooth(values, window), color=colour, linewidth=2, label=label)
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.get_major_locator().set_params(integer=True)  # steps are whole numbers, even in a 1-step run
    ax.grid(alpha=0.3)
    if len(keys) > 1 or title.startswith("reward functions"):  # else the title names the one curve
        ax.legend(fontsize=7, ncol=2 if len(keys) > 4 else 1)


def _metrics_figure(records: list[dict[str, Any]], window: int | None = None, heading: str = "") -> Any:
    """The matplotlib Figure of ``records`` (the rows of a metrics.jsonl), one panel per ``_metric_panels``,
    under the title ``heading`` (the run's name).

    ``window``: values per moving average; by default a tenth of the run (1, no smoothing, below 20
    steps). Rows that are not objects or lack a numeric ``step`` are skipped, as are non-numeric values.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, CI)
    import matplotlib.pyplot as plt

    records = [r for r in records if isinstance(r, dict) and _is_number(r.get("step"))]
    panels = _metric_panels(records)
    num_steps = len({r["step"] for r in records})
    window = window if window is not None else max(1, num_steps // 10)
    if not panels:
        fig, ax = plt.subplots(figsize=(6, 3))
        ax.set_title("no metrics logged yet")
        ax.text(0.5, 0.5, "no step with a numeric metric", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        fig.suptitle(heading)
        fig.tight_layout()
        return fig
    columns = 1 if len(panels) == 1 else 2 if len(panels) <= 4 else 3
    rows = -(-len(panels) // columns)  # ceiling division
    fig, axes = plt.subplots(rows, columns, figsize=(5.5 * columns, 3.6 * rows), squeeze=False)
    cells = list(axes.flat)
    for ax, (title, keys) in zip(cells[: len(panels)], panels, strict=True):
        _draw_panel(ax, title, keys, records, window)
    for ax in cells[len(panels) :]:
        fig.delaxes(ax)  # the empty cells of the last row
    how = f"thin: each step, bold: mean of the last {window} values" if window > 1 else "lines: each step"
    run = f"{heading}: " if heading else ""
    steps = f"{num_steps} step" + ("s" if num_steps != 1 else "")
    fig.suptitle(f"{run}{steps}   ({how}, dots: evaluation)", fontsize=11)
    fig.tight_layout()
    return fig


def plot_metrics(
    metrics_path: str | os.PathLike, png_path: str | os.PathLike, window: int | None = None
) -> Path:
    """Write a PNG of a run's metrics.jsonl against step: total reward, the reward functions (one axis per
    maximum score), accuracy per source, reward per source, KL, completion length, entropy, clip ratio.

    Noisy per-step curves are drawn thin and light under their moving average of the last ``window``
    values (``smooth``; default a tenth of the run); ``eval/*`` points as dots. Missing keys leave their
    panel out (old files, runs without KL). Raises FileNotFoundError when ``metrics_path`` does not exist.
    """
    metrics_path = Path(metrics_path)
    if not metrics_path.is_file():
        raise FileNotFoundError(f"plot_metrics: no metrics file at {metrics_path}")
    fig = _metrics_figure(read_metrics(metrics_path), window, heading=metrics_path.parent.name)
    import matplotlib.pyplot as plt  # after _metrics_figure chose the file-only Agg backend

    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path
