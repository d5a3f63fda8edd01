"""The evaluation report as markdown: one table per report, and two reports side by side.

``grpo/evaluation.py`` computes the numbers; this module only prints them. ``COLUMNS`` is the one list of
metrics both tables show: what each is called in the report dict, in a table header and in a comparison.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Optional

import numpy as np

from rewards.answer import FULL_CREDIT

ALL = "all"  # the report row over every completion of every source


class Column(NamedTuple):
    """One metric of the reports: its key in a source's metrics, the table header, the label in a
    comparison (None: not compared, e.g. counts and standard errors) and how it is printed."""

    key: str
    header: str
    compared_as: Optional[str]
    kind: str  # "pct", "float3", "float1" or "int" (format_value)


# The columns of format_table, in order (pass@k columns follow), and the rows of format_comparison.
COLUMNS = (
    Column("n_prompts", "prompts", None, "int"),
    Column("accuracy", "accuracy %", "accuracy", "pct"),
    Column("accuracy_se", "± SE", None, "pct"),
    Column("partial_rate", "partial %", "partial", "pct"),
    Column("strict_format_rate", "strict format %", "strict format", "pct"),
    Column("answer_type_rate", "answer type %", "answer type", "pct"),
    Column("mean_reward", "mean reward", "mean reward", "float3"),
    Column("mean_completion_length", "mean length", "mean length", "float1"),
    Column("truncation_rate", "truncated %", "truncated", "pct"),
)
COMPARED = tuple(c for c in COLUMNS if c.compared_as is not None)


def format_value(value: Any, kind: str) -> str:
    """A metric as the tables print it: ``pct`` -> percent with one decimal, ``float3``/``float1`` ->
    that many decimals, ``int`` as is; None (undefined, e.g. a standard error of one prompt) -> "-".

    >>> format_value(0.4567, "pct"), format_value(3.14159, "float3"), format_value(None, "pct")
    ('45.7', '3.142', '-')
    """
    if value is None:
        return "-"
    if kind == "pct":
        return f"{100 * value:.1f}"
    if kind == "float3":
        return f"{value:.3f}"
    if kind == "float1":
        return f"{value:.1f}"
    return str(value)


def _markdown(header: Sequence[str], rows: Sequence[Sequence[str]], align_left: int = 1) -> str:
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("|" + "|".join(":---" if i < align_left else "---:" for i in range(len(header))) + "|")
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pass_keys(metrics: Mapping[str, Any]) -> list[str]:
    """The pass@k keys with k >= 2, in order (pass@1 is the accuracy: the tables do not repeat it)."""
    return sorted((k for k in metrics if k.startswith("pass@") and k != "pass@1"), key=lambda k: int(k[5:]))


def format_table(report: Mapping[str, Any]) -> str:
    """The report as a markdown table: one row per source and one for all completions together.

    Rates are percentages (one decimal), ``± SE`` is the standard error of accuracy in percentage
    points; pass@k columns for k = 2, 4, ..., K follow (pass@1 is the accuracy). A line under the
    table says K, the temperature and what accuracy means with K samples.
    """
    rows_by_name = {**report["sources"], ALL: report["all"]}
    pass_keys = _pass_keys(report["all"])
    header = ["source", *[c.header for c in COLUMNS], *[f"{k} %" for k in pass_keys]]
    rows = [
        [name, *[format_value(m[c.key], c.kind) for c in COLUMNS]]
        + [format_value(m[k], "pct") for k in pass_keys]
        for name, m in rows_by_name.items()
    ]
    return _markdown(header, rows) + "\n\n" + _footnote(report)


def _footnote(report: Mapping[str, Any]) -> str:
    settings = report.get("settings") or {}
    temperature = settings.get("temperature")
    how = "greedy" if temperature == 0 else f"temperature {temperature}"
    samples = report["samples"]
    note = (
        f"K = {samples} sample(s) per prompt ({how}, max {settings.get('max_completion_length')} new tokens, "
        f"sampler {report.get('sampler')}, seed {report.get('seed')})."
    )
    if samples > 1:
        note += f" Accuracy is the mean over all {samples} samples of every prompt (= pass@1)."
    else:
        note += " With one sample, accuracy is pass@1; --samples K adds pass@k."
    return note


def paired_accuracy_se(a_prompts: Sequence[Mapping], b_prompts: Sequence[Mapping]) -> Optional[float]:
    """Standard error of (accuracy B - accuracy A) from the per-prompt differences, or None when the
    two reports did not score the same prompts (or only one).

    Pairing removes the spread between easy and hard questions, which both sides share: the
    difference of two accuracies on the same prompts is far less noisy than each accuracy alone.
    Example: per-prompt accuracies A [1, 0, 0], B [1, 1, 0] -> differences [0, 1, 0], std 0.577,
    SE 0.577 / sqrt(3) = 0.333.
    """
    if len(a_prompts) != len(b_prompts) or len(a_prompts) < 2:
        return None
    if any(
        pa["answer"] != pb["answer"] or pa["index"] != pb["index"]
        for pa, pb in zip(a_prompts, b_prompts, strict=True)
    ):
        return None

    def accuracy(p: Mapping) -> float:
        return sum(c == FULL_CREDIT for c in p["correctness"]) / len(p["correctness"])

    diffs = np.array([accuracy(pb) - accuracy(pa) for pa, pb in zip(a_prompts, b_prompts, strict=True)])
    return float(diffs.std(ddof=1) / math.sqrt(len(diffs)))


def compare_reports(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, dict[str, dict[str, Any]]]:
    """``{source: {metric: {"a", "b", "difference" (b - a)}}}`` over the sources both reports have
    (and "all"); the accuracy entry also holds ``difference_se`` (``paired_accuracy_se``)."""
    names = [n for n in a["sources"] if n in b["sources"]] + [ALL]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for name in names:
        ma = a["all"] if name == ALL else a["sources"][name]
        mb = b["all"] if name == ALL else b["sources"][name]
        keys = [c.key for c in COMPARED] + [k for k in _pass_keys(ma) if k in mb]
        out[name] = {key: {"a": ma[key], "b": mb[key], "difference": mb[key] - ma[key]} for key in keys}
        if name == ALL:
            pa = [dict(p, index=(s, p["index"])) for s in names[:-1] for p in a["prompts"].get(s, [])]
            pb = [dict(p, index=(s, p["index"])) for s in names[:-1] for p in b["prompts"].get(s, [])]
        else:
            pa, pb = a["prompts"].get(name, []), b["prompts"].get(name, [])
        out[name]["accuracy"]["difference_se"] = paired_accuracy_se(pa, pb)
    return out


def format_comparison(
    a: Mapping[str, Any], b: Mapping[str, Any], labels: tuple[str, str] = ("A", "B")
) -> str:
    """Two reports side by side: one row per (source, metric) with A, B and B - A.

    Rates and differences are in percent / percentage points. For accuracy, ``SE`` is the paired
    standard error of the difference (``paired_accuracy_se``): a difference of less than about two SE
    is within the noise of this many questions.
    """
    comparison = compare_reports(a, b)
    kinds = {c.key: c.kind for c in COMPARED}
    names = {c.key: c.compared_as for c in COMPARED}
    header = ["source", "metric", labels[0], labels[1], f"{labels[1]} − {labels[0]}", "SE of difference"]
    rows = []
    for source, metrics in comparison.items():
        for key, values in metrics.items():
            kind = kinds.get(key, "pct")
            diff = format_value(values["difference"], kind)
            if values["difference"] is not None and values["difference"] >= 0 and diff != "-":
                diff = "+" + diff
            se = format_value(values["difference_se"], "pct") if "difference_se" in values else ""
            label = names.get(key, key) + (" %" if kind == "pct" else "")
            rows.append(
                [source, label, format_value(values["a"], kind), format_value(values["b"], kind), diff, se]
            )
    return _markdown(header, rows, align_left=2) + "\n\n" + _footnote(b)
