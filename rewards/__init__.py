"""Reward functions of the medical-reasoning recipe, TRL-style: ``f(completions, **columns) -> list[float]``.

``completions`` are strings or TRL conversational messages (``[{"role": "assistant", "content": ...}]``);
``columns`` are the dataset columns of each completion's prompt, at least ``answer`` and ``db_set``.

=========================== ======= ==========================================================
name                        max     rewards
=========================== ======= ==========================================================
xmlcount_reward_func        0.5     each tag line present once, minus text after ``</answer>``
soft_format_reward_func     0.5     ``<reasoning>...</reasoning> <answer>...</answer>`` at the start
strict_format_reward_func   0.5     exactly the four-line-tag layout, ending in a newline
int_reward_func             0.5     the answer has the right type (integer, yes/no/maybe, A-D)
correctness_reward_func     2.0     the answer is right (1.0: the gold stands alone in it)
=========================== ======= ==========================================================

With the default weights (1.0 each) the best total is 4.0. docs/REWARDS.md gives every rule with examples.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Optional, Union

import torch

from rewards.answer import correctness_reward_func, int_reward_func, is_answer_type, score_answer
from rewards.format import count_xml, soft_format_reward_func, strict_format_reward_func, xmlcount_reward_func
from rewards.parsing import completion_text, extract_answer

RewardFunc = Callable[..., list[float]]

# Keys equal grpo.config.REWARD_FUNC_NAMES, in the same order.
REWARD_FUNCS: dict[str, RewardFunc] = {
    "xmlcount_reward_func": xmlcount_reward_func,
    "soft_format_reward_func": soft_format_reward_func,
    "strict_format_reward_func": strict_format_reward_func,
    "int_reward_func": int_reward_func,
    "correctness_reward_func": correctness_reward_func,
}


def combine_rewards(
    completions: Sequence[Any],
    columns: Mapping[str, Sequence],
    funcs: Sequence[Union[str, RewardFunc]] = tuple(REWARD_FUNCS),
    weights: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Score N completions with every reward function and sum them with weights.

    Returns ``(total: [N] float32, per_func: {name: [N] float32})``; ``per_func`` holds the unweighted
    rewards (what ``rewards/<name>/mean`` logs), ``total = sum_k weights[k] * per_func[k]``
    (``weights=None``: 1.0 each). ``funcs`` are names in ``REWARD_FUNCS`` or callables.

    Example: one completion ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\n7\\n</answer>\\n"`` with
    ``answer=["7"], db_set=["gsm8k"]`` scores 0.5 on each format reward, 0.5 on int and 2.0 on
    correctness: total 4.0 with the default weights.
    """
    resolved: list[tuple[str, RewardFunc]] = []
    for f in funcs:
        if isinstance(f, str):
            if f not in REWARD_FUNCS:
                raise ValueError(f"unknown reward function {f!r}; known: {', '.join(REWARD_FUNCS)}")
            resolved.append((f, REWARD_FUNCS[f]))
        else:
            resolved.append((getattr(f, "__name__", repr(f)), f))
    weights = [1.0] * len(resolved) if weights is None else list(weights)
    if len(weights) != len(resolved):
        raise ValueError(f"{len(weights)} reward weights for {len(resolved)} reward functions")

    n = len(completions)
    total = torch.zeros(n, dtype=torch.float32)
    per_func: dict[str, torch.Tensor] = {}
    for (name, func), weight in zip(resolved, weights, strict=True):
        values = func(list(completions), **dict(columns))
        if len(values) != n:
            raise ValueError(f"reward function {name!r} returned {len(values)} values for {n} completions")
        rewards = torch.tensor([float(v) for v in values], dtype=torch.float32)
        per_func[name] = rewards
        total += weight * rewards
    return total, per_func


__all__ = [
    "REWARD_FUNCS",
    "combine_rewards",
    "completion_text",
    "correctness_reward_func",
    "count_xml",
    "extract_answer",
    "int_reward_func",
    "is_answer_type",
    "score_answer",
    "soft_format_reward_func",
    "strict_format_reward_func",
    "xmlcount_reward_func",
]
