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

With the default weights (1.0 each) the best total is 4.0. Optional: ``soft_overlong_punishment`` (DAPO's
length penalty, 0 to -1, rewards/length.py). ``combine_rewards`` also runs TRL-style functions
``f(prompts, completions, completion_ids, **kwargs)`` and a user's own by import path
(``"mypkg.rewards:fn"``): rewards/registry.py. Every reward takes time linear in the completion length.
docs/REWARDS.md gives every rule with examples.
"""

from __future__ import annotations

from rewards.answer import correctness_reward_func, int_reward_func, is_answer_type, score_answer
from rewards.format import count_xml, soft_format_reward_func, strict_format_reward_func, xmlcount_reward_func
from rewards.length import overlong_penalty, soft_overlong_punishment, soft_overlong_punishment_reward_func
from rewards.parsing import completion_text, extract_answer, normalize_answer, option_letter
from rewards.registry import (
    OPTIONAL_REWARD_FUNCS,
    REWARD_FUNCS,
    RewardFunc,
    RewardFuncError,
    combine_rewards,
    resolve_reward_func,
    reward_func_name,
)

__all__ = [
    "OPTIONAL_REWARD_FUNCS",
    "REWARD_FUNCS",
    "RewardFunc",
    "RewardFuncError",
    "combine_rewards",
    "completion_text",
    "correctness_reward_func",
    "count_xml",
    "extract_answer",
    "int_reward_func",
    "is_answer_type",
    "normalize_answer",
    "option_letter",
    "overlong_penalty",
    "resolve_reward_func",
    "reward_func_name",
    "score_answer",
    "soft_format_reward_func",
    "soft_overlong_punishment",
    "soft_overlong_punishment_reward_func",
    "strict_format_reward_func",
    "xmlcount_reward_func",
]
