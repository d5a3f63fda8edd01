"""The three format rewards of the recipe: did the completion use the ``<reasoning>``/``<answer>`` layout?

The target layout (the system prompt asks for it) is::

    <reasoning>
    ...
    </reasoning>
    <answer>
    ...
    </answer>

These follow the reference definitions exactly, quirks included (see docs/REWARDS.md), so that runs
can be compared with the recipe. Each takes ``completions`` (strings or TRL conversational messages)
and ignores the other columns.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.parsing import completion_text

SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)


def count_xml(text: str) -> float:
    """Partial credit for each tag line, minus a small penalty for text after the answer.

    +0.125 for each of ``"<reasoning>\\n"``, ``"\\n</reasoning>\\n"``, ``"\\n<answer>\\n"``, ``"\\n</answer>"``
    that occurs exactly once. When ``"\\n<answer>\\n"`` counts, subtract 0.001 x the length of what
    follows the last ``"\\n</answer>\\n"`` (the whole text when that is absent: ``str.split`` semantics);
    when ``"\\n</answer>"`` counts, subtract 0.001 x (length after the last ``"\\n</answer>"`` - 1).

    Worked example: ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\n5\\n</answer>\\nxyz"`` earns
    4 x 0.125 - 0.001 x 3 (``"xyz"``) - 0.001 x (4 - 1) (``"\\nxyz"``) = 0.494.
    """
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xmlcount_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """``count_xml`` of each completion: at most 0.5."""
    return [count_xml(completion_text(c)) for c in completions]


def soft_format_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.5 when the completion starts with ``<reasoning>...</reasoning>``, then (after optional
    whitespace) ``<answer>...</answer>``; anything may follow. ``re.match``: anchored at the start only.
    """
    return [0.5 if SOFT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]


def strict_format_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.5 when the completion is exactly the layout above, each tag on its own line, ending in a
    newline. (``$`` also matches before one final newline, so one extra trailing ``"\\n"`` passes too.)
    """
    return [0.5 if STRICT_FORMAT.match(completion_text(c)) else 0.0 for c in completions]
