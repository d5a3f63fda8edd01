"""The plot at the end of a run: metrics.jsonl as one PNG a reader understands at a glance.

Raw curves thin, a moving average bold, evaluation points as dots; the reward functions on one axis per
maximum score (correctness 2.0, the format rewards 0.5), accuracy per source, KL, length, entropy, clip ratio.
Panels with nothing logged are left out, so old files and runs without KL still plot.
"""

from __future__ import annotations

import os
from collections import defaultdict
from pathlib import Path
from typing import Any

from grpo.metrics import read_metrics
from rewards.answer import FULL_CREDIT

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
