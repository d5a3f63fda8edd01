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

The reference writes the two layout rewards as regular expressions with lazy ``.*?`` parts; Python's
backtracking engine takes time quadratic in the completion length on them (seconds for a 64 KB
completion with many tags and no closing one). ``has_soft_format`` and ``has_strict_format`` decide the
same language with a few linear scans (``str.find``, ``str.startswith``); tests/test_rewards.py checks
them against the reference patterns on thousands of random strings.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from rewards.parsing import completion_text

# The reference patterns, kept for the reader (and as the tests' oracle); not used to score.
SOFT_FORMAT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>", re.DOTALL)
STRICT_FORMAT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$", re.DOTALL)

# "</reasoning>", whitespace, "<answer>": only one way to match at each start ("\s*" cannot take the "<"),
# and the whitespace runs after different "</reasoning>" are disjoint, so a search is linear.
_REASONING_THEN_ANSWER = re.compile(r"</reasoning>\s*<answer>")
_STRICT_OPENING = "<reasoning>\n"
_STRICT_MIDDLE = "\n</reasoning>\n<answer>\n"
# "$" matches at the very end or just before one final "\n": the two ways the strict layout may end.
_STRICT_ENDINGS = ("\n</answer>\n", "\n</answer>\n\n")


def count_xml(text: str) -> float:
    """Partial credit for each tag line, minus a small penalty for text after the answer.

    +0.125 for each of ``"<reasoning>\\n"``, ``"\\n</reasoning>\\n"``, ``"\\n<answer>\\n"``,
    ``"\\n</answer>"`` that occurs exactly once. When ``"\\n<answer>\\n"`` counts, subtract 0.001 x the
    length of what follows the last ``"\\n</answer>\\n"`` (the whole text when that is absent:
    ``str.split`` semantics); when ``"\\n</answer>"`` counts, subtract 0.001 x (length after the last
    ``"\\n</answer>"`` - 1).

    Worked example: ``"<reasoning>\\nr\\n</reasoning>\\n<answer>\\n5\\n</answer>\\nxyz"`` earns
    4 x 0.125 - 0.001 x 3 (``"xyz"``) - 0.001 x (4 - 1) (``"\\nxyz"``) = 0.494.

    >>> round(count_xml("<reasoning>\\nr\\n</reasoning>\\n<answer>\\n5\\n</answer>\\nxyz"), 6)
    0.494
    """
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    # split(x)[-1], not rpartition(x)[2]: they differ when occurrences overlap ("\n</answer>\n</answer>\n"):
    # split cuts at non-overlapping occurrences from the left, as the reference does.
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def has_soft_format(text: str) -> bool:
    """``SOFT_FORMAT.match(text)``, in linear time.

    The pattern matches iff the text starts with ``<reasoning>``; some ``</reasoning>`` after that
    opening tag is followed by whitespace only and then ``<answer>``; and a ``</answer>`` comes after that
    ``<answer>``. If any ``</reasoning>\\s*<answer>`` works, the first one does (a later ``</answer>`` is
    also after the first), so one search and one find decide it.

    >>> has_soft_format("<reasoning>a</reasoning> \\n<answer>b</answer> more")
    True
    >>> has_soft_format("Sure! <reasoning>a</reasoning><answer>b</answer>")
    False
    >>> has_soft_format("<reasoning>a</reasoning> x <answer>b</answer>")
    False
    """
    if not text.startswith("<reasoning>"):
        return False
    between = _REASONING_THEN_ANSWER.search(text, len("<reasoning>"))
    return between is not None and text.find("</answer>", between.end()) != -1


def has_strict_format(text: str) -> bool:
    """``STRICT_FORMAT.match(text)``, in linear time.

    The pattern matches iff

        text = ``"<reasoning>\\n"`` + A + ``"\\n</reasoning>\\n<answer>\\n"`` + C + ending

    with A and C anything (tags included) and the ending ``"\\n</answer>\\n"``, or that plus one ``"\\n"``
    (``$`` also matches before a final newline). So: the opening, one of the two endings, and the
    middle separator lying wholly between them.

    >>> has_strict_format("<reasoning>\\nr\\n</reasoning>\\n<answer>\\n7\\n</answer>\\n")
    True
    >>> has_strict_format("<reasoning>\\nr\\n</reasoning>\\n<answer>\\n7\\n</answer>")  # no final newline
    False
    """
    if not text.startswith(_STRICT_OPENING):
        return False
    for ending in _STRICT_ENDINGS:
        if text.endswith(ending):
            middle_end = len(text) - len(ending)
            if text.find(_STRICT_MIDDLE, len(_STRICT_OPENING), middle_end) != -1:
                return True
    return False


def xmlcount_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """``count_xml`` of each completion: at most 0.5."""
    return [count_xml(completion_text(c)) for c in completions]


def soft_format_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.5 when the completion starts with ``<reasoning>...</reasoning>``, then (after optional
    whitespace) ``<answer>...</answer>``; anything may follow. ``re.match``: anchored at the start only.
    """
    return [0.5 if has_soft_format(completion_text(c)) else 0.0 for c in completions]


def strict_format_reward_func(completions: Sequence[Any], **columns: Any) -> list[float]:
    """0.5 when the completion is exactly the layout above, each tag on its own line, ending in a
    newline. (``$`` also matches before one final newline, so one extra trailing ``"\\n"`` passes too.)
    """
    return [0.5 if has_strict_format(completion_text(c)) else 0.0 for c in completions]
