"""Evaluation: how often the model is right, per source, before and after training.

Two callers use this module:

- ``scripts/evaluate.py`` (a thin CLI): ``evaluate(sampler, datasets, samples, seed, settings)`` generates
  on whole evaluation splits and returns a report dict; ``grpo/report.py`` prints it as markdown
  (``format_table``) or puts two reports side by side (``format_comparison``).
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

The source names (``data.eval_sets.SOURCES``) are those of ``--sources``: the three training sources' evaluation splits
(``data.mixture.build_eval_datasets``) and three standard medical benchmarks that are never trained on.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, Optional

import numpy as np

from grpo.config import GRPOConfig
from models.samplers import derive_seed
from rewards import REWARD_FUNCS, combine_rewards
from rewards.answer import FULL_CREDIT, PARTIAL_CREDIT


class EvaluationError(ValueError):
    """A bad evaluation request (a flag of scripts/evaluate.py): the message names the flag or file."""


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
    columns = {"answer": list(answers), "db_set": list(db_sets)}
    # All five always: accuracy and format rates must not depend on which rewards a run trained with.
    total, per_func = combine_rewards(list(texts), columns)
    if funcs != list(REWARD_FUNCS) or weights != [1.0] * len(funcs):  # the run's own rewards (a judge, ...)
        total, _ = combine_rewards(list(texts), columns, funcs, weights)
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


def _prompt_seeds(seed: int, source: str, indices: Sequence[int]) -> list[int]:
    """One seed per prompt: a hash of (run seed, source name, the row's index in its source), so a
    prompt's samples depend neither on the batch it was generated in nor on the other sources."""
    return [derive_seed(seed, zlib.crc32(source.encode()), index) for index in indices]


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
        prompt_ids = sampler.encode([row["prompt"] for row in batch])
        seeds = _prompt_seeds(seed, source, range(start, start + len(batch)))
        completions = sampler.generate(prompt_ids, samples, seeds, settings=settings)
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


# ============================================================================ during training


def eval_subset(config: GRPOConfig, tokenizer: Any, size: int = 16) -> list[dict[str, Any]]:
    """A small fixed evaluation subset for the trainer: ``size`` rows of each evaluation set.

    Drawn once from ``data.mixture.build_eval_datasets(config, tokenizer)`` (so long prompts are already
    dropped), without replacement, with a generator seeded by ``config.seed`` and the set's position:
    the same rows for the whole run and its resumes. Sets are taken in sorted ``db_set`` order
    ("gsm8k", "med_mc", "pubmedqa"); a set smaller than ``size`` is taken whole. config: uses seed and what
    ``build_eval_datasets`` reads.
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
