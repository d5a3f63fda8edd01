"""Evaluation: how often the model is right, per source, before and after training.

Two callers use this module:

- ``scripts/evaluate.py`` (a thin CLI): ``evaluate(sampler, datasets, samples, seed, settings)`` generates
  on whole evaluation splits and returns a report dict; ``format_table(report)`` prints it as markdown,
  ``format_comparison(a, b)`` puts two reports side by side with the difference.
- the trainer: ``eval_subset(config, tokenizer, size)`` draws a small fixed subset once, and
  ``evaluate_rows(sampler, rows, seed)`` scores it greedily every ``eval_steps`` as flat ``eval/...``
  metrics for metrics.jsonl and the plot.

Every completion is scored by the recipe's own reward functions (``rewards/``), so "right" means
here exactly what it means to the trainer. Per source, over all completions (K = ``samples`` per prompt):

=====================  =============================================================================
accuracy               share of completions with correctness 2.0 (the full credit); with K > 1 the mean
                       over all K samples of every prompt, i.e. the unbiased pass@1
accuracy_se            standard error of accuracy over prompts: std(per-prompt accuracy) / sqrt(P)
partial_rate           share with correctness 1.0 (the gold is in the answer, but not alone)
strict_format_rate     share that earn strict_format_reward_func (exactly the four-tag layout)
answer_type_rate       share that earn int_reward_func (an integer, yes/no/maybe or a letter A-D)
mean_reward            mean total reward (the five functions, weight 1 each: at most 4.0)
mean_completion_length mean number of completion tokens (the stop token included)
truncation_rate        share cut at max_completion_length before the stop token
pass@k                 mean over prompts of 1 - C(n - c, k) / C(n, k), n = K samples, c correct ones
=====================  =============================================================================

The source names (``SOURCES``) are those of ``--sources``: the three training sources' evaluation splits
(``data.mixture.build_eval_datasets``) and three standard medical benchmarks that are never trained on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from rewards import REWARD_FUNCS, combine_rewards
from rewards.answer import FULL_CREDIT, PARTIAL_CREDIT

# name -> (module under data/, the split we evaluate on, its hub id), in the order reports list them.
SOURCES = {
    "gsm8k": ("gsm8k", "test", "openai/gsm8k (main)"),
    "pubmedqa": ("pubmedqa", "test", "qiaojin/PubMedQA (pqa_labeled, the 500 official test pubids)"),
    "health_benchmarks": ("health_benchmarks", "test", "yesilhealth/Health_Benchmarks (held-out 10%)"),
    "medqa": ("medqa", "test", "GBaker/MedQA-USMLE-4-options-hf"),
    "medmcqa": ("medmcqa", "validation", "openlifescienceai/medmcqa"),
    "mmlu_medical": ("mmlu_medical", "test", "cais/mmlu (6 medical subjects)"),
}
TRAINING_SOURCES = ("gsm8k", "pubmedqa", "health_benchmarks")  # those with a *_data_files config field
ALL = "all"  # the report row over every completion of every source


class EvaluationError(ValueError):
    """A bad evaluation request (unknown source, missing adapter, ...): the message names the flag or file."""


# ============================================================================ pure metric functions


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c are correct (Chen et al. 2021).

    pass@k = 1 - C(n - c, k) / C(n, k): one minus the chance that k of the n samples, drawn without
    replacement, are all wrong. Computed as the product 1 - prod_{i = n-c+1}^{n} (1 - k / i), which
    never forms the huge binomials. Example: n = 5, c = 2, k = 2 -> 1 - C(3, 2) / C(5, 2) = 1 - 3/10 =
    0.7; the product: 1 - (1 - 2/4)(1 - 2/5) = 1 - 0.5 * 0.6 = 0.7. And c = 0 -> 0.0; n - c < k -> 1.0.

    >>> round(pass_at_k(5, 2, 1), 12), round(pass_at_k(5, 2, 2), 12), pass_at_k(5, 0, 3), pass_at_k(5, 4, 2)
    (0.4, 0.7, 0.0, 1.0)
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: c={c} correct out of n={n} samples: need 0 <= c <= n")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k}: need 1 <= k <= n={n}")
    if n - c < k:  # every draw of k samples holds a correct one
        return 1.0
    return 1.0 - float(np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def pass_at_k_values(samples: int) -> list[int]:
    """The k reported for K samples: the powers of two below K, and K. Example: 6 -> [1, 2, 4, 6]."""
    ks = [2**i for i in range(samples.bit_length()) if 2**i < samples]
    return ks + [samples]


def score_completions(
    texts: Sequence[str],
    answers: Sequence[str],
    db_sets: Sequence[str],
    reward_funcs: Optional[Sequence[str]] = None,
    reward_weights: Optional[Sequence[float]] = None,
) -> list[dict[str, float]]:
    """Per-completion scores from the recipe's reward functions.

    Returns one dict per completion: ``correctness`` (0.0, 1.0 or 2.0), ``strict_format`` (0.0 or
    0.5), ``answer_type`` (int_reward_func: 0.0 or 0.5) and ``reward`` (the weighted sum of
    ``reward_funcs``; default the five, weight 1 each, as in the recipe).

    Example: ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\nB\\n</answer>\\n"`` with gold "B", db_set
    "med_mc" -> correctness 2.0, strict_format 0.5, answer_type 0.5, reward 4.0.
    """
    funcs = list(reward_funcs or REWARD_FUNCS)
    weights = [1.0] * len(funcs) if reward_weights is None else list(reward_weights)
    if len(weights) != len(funcs):
        raise ValueError(f"{len(weights)} reward weights for {len(funcs)} reward functions")
    # All five always: accuracy and format rates must not depend on which rewards a run trained with.
    _, per_func = combine_rewards(list(texts), {"answer": list(answers), "db_set": list(db_sets)})
    total = sum(w * per_func[name] for name, w in zip(funcs, weights, strict=True))
    return [
        {
            "correctness": float(per_func["correctness_reward_func"][i]),
            "strict_format": float(per_func["strict_format_reward_func"][i]),
            "answer_type": float(per_func["int_reward_func"][i]),
            "reward": float(total[i]),
        }
        for i in range(len(texts))
    ]


def summarize(records: Sequence[Mapping[str, Any]], samples: int) -> dict[str, Any]:
    """Per-source metrics (module docstring) from per-completion records.

    records: one per completion with keys ``prompt`` (any hashable id of its prompt), ``correctness``,
    ``strict_format``, ``answer_type``, ``reward``, ``length`` (tokens) and ``truncated`` (bool);
    every prompt must have exactly ``samples`` records.

    Example: 2 prompts x 2 samples with correctness [2, 0] and [1, 2] -> accuracy 2/4 = 0.5,
    partial_rate 1/4, per-prompt accuracies [0.5, 0.5] so accuracy_se 0.0, pass@2 = mean(1, 1) = 1.0.
    """
    if samples < 1:
        raise ValueError(f"samples={samples}: must be >= 1")
    if not records:
        raise ValueError("summarize: no completions to summarize")
    by_prompt: dict[Any, list[Mapping[str, Any]]] = {}
    for record in records:
        by_prompt.setdefault(record["prompt"], []).append(record)
    for prompt, group in by_prompt.items():
        if len(group) != samples:
            raise ValueError(f"prompt {prompt!r} has {len(group)} completions, expected samples={samples}")

    def share(test: Callable[[Mapping[str, Any]], bool]) -> float:
        return sum(1 for r in records if test(r)) / len(records)

    per_prompt_correct = [sum(r["correctness"] == FULL_CREDIT for r in g) for g in by_prompt.values()]
    per_prompt_accuracy = np.array(per_prompt_correct, dtype=np.float64) / samples
    n_prompts = len(by_prompt)
    metrics: dict[str, Any] = {
        "n_prompts": n_prompts,
        "n_completions": len(records),
        "accuracy": share(lambda r: r["correctness"] == FULL_CREDIT),
        # spread over prompts, not completions: the K samples of one prompt are not independent
        "accuracy_se": (
            float(per_prompt_accuracy.std(ddof=1) / math.sqrt(n_prompts)) if n_prompts > 1 else None
        ),
        "partial_rate": share(lambda r: r["correctness"] == PARTIAL_CREDIT),
        "strict_format_rate": share(lambda r: r["strict_format"] > 0),
        "answer_type_rate": share(lambda r: r["answer_type"] > 0),
        "mean_reward": sum(r["reward"] for r in records) / len(records),
        "mean_completion_length": sum(r["length"] for r in records) / len(records),
        "truncation_rate": share(lambda r: bool(r["truncated"])),
    }
    for k in pass_at_k_values(samples):
        metrics[f"pass@{k}"] = float(np.mean([pass_at_k(samples, c, k) for c in per_prompt_correct]))
    return metrics


# ============================================================================ generating and scoring


def _call_seed(seed: int, source: str, start: int) -> int:
    """The seed of one generate call: a hash of (run seed, source name, first row), so each batch of
    each source has its own stream and adding a source changes no other source's samples."""
    return int(np.random.SeedSequence([seed, zlib.crc32(source.encode()), start]).generate_state(1)[0]) >> 1


def generate_and_score(
    sampler: Any,
    rows: Sequence[Mapping[str, Any]],
    samples: int,
    seed: int,
    settings: Any = None,
    batch_size: int = 32,
    source: str = "",
    reward_funcs: Optional[Sequence[str]] = None,
    reward_weights: Optional[Sequence[float]] = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Generate ``samples`` completions for each row and score them, ``batch_size`` prompts per call.

    Returns ``(records, prompts)``: the per-completion records of ``summarize`` (``prompt`` = the row's
    position) and one entry per row with its gold answer, completions and their scores (for the JSON).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be >= 1")
    records: list[dict[str, Any]] = []
    prompts: list[dict[str, Any]] = []
    for start in range(0, len(rows), batch_size):
        batch = [rows[i] for i in range(start, min(start + batch_size, len(rows)))]
        completions = sampler.generate(
            [row["prompt"] for row in batch], samples, seed=_call_seed(seed, source, start), settings=settings
        )
        owners = [batch[c.prompt_index] for c in completions]
        scores = score_completions(
            [c.text for c in completions],
            [row["answer"] for row in owners],
            [row["db_set"] for row in owners],
            reward_funcs,
            reward_weights,
        )
        for offset, row in enumerate(batch):
            prompts.append(
                {
                    "index": start + offset,
                    "answer": row["answer"],
                    "db_set": row["db_set"],
                    "completions": [],
                    "correctness": [],
                    "lengths": [],
                    "truncated": [],
                }
            )
        for completion, score in zip(completions, scores, strict=True):
            index = start + completion.prompt_index
            records.append(
                {
                    "prompt": index,
                    **score,
                    "length": len(completion.token_ids),
                    "truncated": completion.truncated,
                }
            )
            entry = prompts[index]
            entry["completions"].append(completion.text)
            entry["correctness"].append(score["correctness"])
            entry["lengths"].append(len(completion.token_ids))
            entry["truncated"].append(completion.truncated)
    return records, prompts


def evaluate(
    sampler: Any,
    datasets: Mapping[str, Sequence[Mapping[str, Any]]],
    samples: int = 1,
    seed: int = 0,
    settings: Any = None,
    batch_size: int = 32,
    reward_funcs: Optional[Sequence[str]] = None,
    reward_weights: Optional[Sequence[float]] = None,
    progress: Optional[Callable[[str], None]] = None,
) -> dict[str, Any]:
    """Generate on every evaluation set and report the metrics per source.

    sampler: a ``models.samplers.Sampler``. datasets: ``{source name: rows}`` (a ``datasets.Dataset`` or
    a list of dicts with ``prompt``, ``answer``, ``db_set``). samples: K completions per prompt.
    settings: ``SamplingSettings`` for every call (None = the sampler's own). Reproducible for the same
    seed, batch_size, sampler and settings.

    Returns ``{"samples", "seed", "batch_size", "sampler", "settings", "sources": {name: metrics},
    "all": metrics over every completion, "prompts": {name: [per-prompt completions and scores]}}``.
    """
    if samples < 1:
        raise ValueError(f"samples={samples}: must be >= 1")
    report: dict[str, Any] = {
        "samples": samples,
        "seed": seed,
        "batch_size": batch_size,
        "sampler": getattr(sampler, "name", type(sampler).__name__),
        "settings": _settings_dict(settings if settings is not None else getattr(sampler, "settings", None)),
        "accuracy_definition": "share of all completions (K per prompt) whose correctness reward is 2.0",
        "sources": {},
        "all": None,
        "prompts": {},
    }
    everything: list[dict[str, Any]] = []
    for name, rows in datasets.items():
        if len(rows) == 0:
            raise ValueError(f"evaluation set {name!r} has no rows")
        if progress is not None:
            progress(f"{name}: {len(rows)} prompts x {samples} sample(s)")
        records, prompts = generate_and_score(
            sampler, rows, samples, seed, settings, batch_size, name, reward_funcs, reward_weights
        )
        report["sources"][name] = summarize(records, samples)
        report["prompts"][name] = prompts
        everything += [{**r, "prompt": (name, r["prompt"])} for r in records]
    report["all"] = summarize(everything, samples)
    return report


def _settings_dict(settings: Any) -> Optional[dict[str, Any]]:
    if settings is None:
        return None
    return {key: getattr(settings, key) for key in ("temperature", "top_p", "top_k", "max_completion_length")}


# ============================================================================ data and models


def load_eval_set(name: str, config: Any, data_files: Optional[Any] = None):
    """The evaluation split of source ``name`` as a ``datasets.Dataset`` (``SOURCES`` says which split).

    data_files: local files in the source's hub schema (None = the hub, or for the three training
    sources the ``<name>_data_files`` of ``config``, a GRPOConfig).
    """
    import importlib

    if name not in SOURCES:
        raise EvaluationError(f"unknown source {name!r}; known: {', '.join(SOURCES)}")
    module_name, split, _ = SOURCES[name]
    module = importlib.import_module(f"data.{module_name}")
    if name in TRAINING_SOURCES and data_files is None:
        data_files = getattr(config, f"{name}_data_files", None)
    if data_files is not None:
        return module.load(split, data_files)
    try:
        return module.load(split)
    except Exception as err:  # offline, a wrong hub id, no access: one line naming the way out
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise EvaluationError(
            f"{name}: cannot load {SOURCES[name][2]} from the hub ({type(err).__name__}: {first_line}); "
            f"offline, give local files in its hub schema with --{name}_data_files"
        ) from err


def evenly_spaced(n_rows: int, limit: Optional[int]) -> list[int]:
    """Indices of ``limit`` rows spread evenly over ``n_rows`` (all of them when limit is None or larger).

    Evenly spaced rather than the first ``limit``: a source stored in blocks (Health_Benchmarks by
    specialty, MMLU by subject) is then sampled across its blocks. Example: (10, 4) -> [0, 2, 5, 7].
    """
    if limit is None or limit >= n_rows:
        return list(range(n_rows))
    if limit < 1:
        raise EvaluationError(f"--limit {limit}: must be >= 1")
    return [i * n_rows // limit for i in range(limit)]


ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def read_adapter_config(path: str, flag: str = "--adapter") -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved PEFT LoRA adapter, checked; EvaluationError naming
    ``flag`` and the file otherwise."""
    import json
    import os

    if not os.path.isdir(path):
        raise EvaluationError(f"{flag} {path!r}: no such folder (expected a saved LoRA adapter)")
    missing = [f for f in ADAPTER_FILES if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise EvaluationError(
            f"{flag} {path!r}: not a saved LoRA adapter (missing {', '.join(missing)}; a checkpoint-<step> "
            "folder of scripts/train.py or models.policy.save_adapter writes both)"
        )
    config_file = os.path.join(path, ADAPTER_FILES[0])
    try:
        with open(config_file) as fh:
            saved = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise EvaluationError(f"{flag} {config_file!r}: cannot be read ({err})") from None
    if saved.get("peft_type", "LORA") != "LORA":
        raise EvaluationError(f"{flag} {config_file!r}: peft_type {saved.get('peft_type')!r}, expected LORA")
    targets = saved.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise EvaluationError(
            f"{flag} {config_file!r}: target_modules={targets!r}; expected a list of module names"
        )
    unsupported = [
        k
        for k in (
            "use_rslora",
            "use_dora",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
        )
        if saved.get(k)
    ]
    if unsupported:
        raise EvaluationError(
            f"{flag} {config_file!r}: {', '.join(unsupported)} set; this project's LoRA has none of them"
        )
    for key in ("r", "lora_alpha"):
        value = saved.get(key)
        if not isinstance(value, (int, float)) or value <= 0 or float(value) != int(value):
            raise EvaluationError(f"{flag} {config_file!r}: {key}={value!r}; expected a positive integer")
    return saved


def load_for_evaluation(config: Any, adapter: Optional[str] = None, device: Any = None):
    """``(model, tokenizer)`` to evaluate: the policy of ``config`` with the LoRA adapter at ``adapter``,
    or the base model when ``adapter`` is None.

    Both go through the trainer's own loading (``models.policy.load_policy``, 4-bit unless
    ``load_in_4bit: false``), so evaluation sees the weights as training did. The base is that policy
    with a fresh LoRA, whose B matrices are zero: it adds exactly 0, the base model's outputs, and both
    samplers (vLLM follows a policy through its adapter) treat base and adapter alike. An adapter's
    rank, alpha and target modules come from its ``adapter_config.json``; its weights are loaded with
    ``models.policy.load_adapter``.
    """
    from models.policy import load_adapter, load_policy

    overrides: dict[str, Any] = {"gradient_checkpointing": False, "lora_dropout": 0.0}
    if adapter is not None:
        saved = read_adapter_config(adapter)
        overrides.update(
            lora_r=int(saved["r"]),
            lora_alpha=int(saved["lora_alpha"]),
            lora_target_modules=sorted(saved["target_modules"]),
        )
    model, tokenizer = load_policy(replace(config, **overrides), device)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


# ============================================================================ markdown


# (header, metric key, format): the columns of format_table, in order; pass@k columns follow.
TABLE_COLUMNS = (
    ("prompts", "n_prompts", "int"),
    ("accuracy %", "accuracy", "pct"),
    ("± SE", "accuracy_se", "pct"),
    ("partial %", "partial_rate", "pct"),
    ("strict format %", "strict_format_rate", "pct"),
    ("answer type %", "answer_type_rate", "pct"),
    ("mean reward", "mean_reward", "float3"),
    ("mean length", "mean_completion_length", "float1"),
    ("truncated %", "truncation_rate", "pct"),
)


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
    header = ["source", *[h for h, _, _ in TABLE_COLUMNS], *[f"{k} %" for k in pass_keys]]
    rows = [
        [name, *[format_value(m[key], kind) for _, key, kind in TABLE_COLUMNS]]
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


METRICS_COMPARED = (
    ("accuracy", "accuracy", "pct"),
    ("partial", "partial_rate", "pct"),
    ("strict format", "strict_format_rate", "pct"),
    ("answer type", "answer_type_rate", "pct"),
    ("mean reward", "mean_reward", "float3"),
    ("mean length", "mean_completion_length", "float1"),
    ("truncated", "truncation_rate", "pct"),
)


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
        keys = [key for _, key, _ in METRICS_COMPARED] + [k for k in _pass_keys(ma) if k in mb]
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
    kinds = {key: kind for _, key, kind in METRICS_COMPARED}
    names = {key: name for name, key, _ in METRICS_COMPARED}
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


# ============================================================================ during training


def eval_subset(config: Any, tokenizer: Any, size: int = 16) -> list[dict[str, Any]]:
    """A small fixed evaluation subset for the trainer: ``size`` rows of each evaluation set.

    Drawn once from ``data.mixture.build_eval_datasets(config, tokenizer)`` (so long prompts are already
    dropped), without replacement, with a generator seeded by ``config.seed`` and the set's position:
    the same rows for the whole run and its resumes. Sets are taken in sorted ``db_set`` order
    ("gsm8k", "med_mc", "pubmedqa"); a set smaller than ``size`` is taken whole.
    """
    from data.mixture import build_eval_datasets

    if size < 1:
        raise ValueError(f"eval subset size={size}: must be >= 1")
    sets = build_eval_datasets(config, tokenizer)
    rows: list[dict[str, Any]] = []
    for position, db_set in enumerate(sorted(sets)):
        dataset = sets[db_set]
        rng = np.random.default_rng([config.seed, position])
        chosen = sorted(rng.choice(len(dataset), size=min(size, len(dataset)), replace=False).tolist())
        rows += [dataset[i] for i in chosen]
    return rows


def evaluate_rows(
    sampler: Any,
    rows: Sequence[Mapping[str, Any]],
    seed: int,
    reward_funcs: Optional[Sequence[str]] = None,
    reward_weights: Optional[Sequence[float]] = None,
    batch_size: int = 64,
) -> dict[str, float]:
    """Score ``rows`` greedily (one completion each, temperature 0) as flat metrics for metrics.jsonl.

    Keys: ``eval/reward`` (mean total reward; pass the run's reward_funcs / reward_weights to match
    its ``reward``), ``eval/accuracy``, ``eval/accuracy/<db_set>``, ``eval/strict_format``,
    ``eval/answer_type``, ``eval/completion_length``, ``eval/truncated``. The settings are the sampler's
    own (its max_completion_length) with temperature 0.
    """
    if not rows:
        raise ValueError("evaluate_rows: no rows")
    settings = replace(sampler.settings, temperature=0.0)
    records, _ = generate_and_score(
        sampler, rows, 1, seed, settings, batch_size, "eval", reward_funcs, reward_weights
    )
    overall = summarize(records, 1)
    metrics = {
        "eval/reward": overall["mean_reward"],
        "eval/accuracy": overall["accuracy"],
        "eval/strict_format": overall["strict_format_rate"],
        "eval/answer_type": overall["answer_type_rate"],
        "eval/completion_length": overall["mean_completion_length"],
        "eval/truncated": overall["truncation_rate"],
    }
    for db_set in sorted({row["db_set"] for row in rows}):
        mine = [r for r in records if rows[r["prompt"]]["db_set"] == db_set]
        metrics[f"eval/accuracy/{db_set}"] = summarize(mine, 1)["accuracy"]
    return metrics
