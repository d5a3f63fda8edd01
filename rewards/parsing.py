"""Reading completions: their text, the answer inside ``<answer>...</answer>``, numbers and labels.

Everything here accepts any input without raising: a reward function must score whatever the model
wrote (and whatever a caller passes, None included) with a number.
"""

from __future__ import annotations

import re
from fractions import Fraction
from typing import Any, Optional

# An integer or decimal, commas only as thousands separators: 45, -3, 2,125, 1.5.
_NUMBER = r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?"
INTEGER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)")
NUMBER = re.compile(_NUMBER)
# A number standing on its own in free text ("18 dollars", "$18", "is -5."), not part of a word or id.
NUMBER_TOKEN = re.compile(r"(?<![\w.,])" + _NUMBER + r"(?![\w]|[.,]\d)")

# Longer numbers are not read as numbers (Python refuses int() of over 4,300 digits; no answer is that long).
MAX_NUMBER_CHARS = 100
PUBMEDQA_LABELS = ("yes", "no", "maybe")
MC_LETTERS = ("A", "B", "C", "D")


def completion_text(completion: Any) -> str:
    """The text of one completion: a plain string, or the TRL conversational form
    ``[{"role": "assistant", "content": "..."}]`` (the contents of all messages, joined). Anything else
    (None, a number, a malformed message) reads as the empty string.
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        content = completion.get("content")
        return content if isinstance(content, str) else ""
    if isinstance(completion, (list, tuple)):
        return "".join(completion_text(message) for message in completion if isinstance(message, dict))
    return ""


def extract_answer(text: Any) -> str:
    """The text between the last ``<answer>`` and the next ``</answer>``, stripped.

    No ``<answer>`` at all: ``""`` (no answer given). An ``<answer>`` with no closing tag (a completion
    cut at max_completion_length): the rest of the text, stripped, so a cut-off answer can still be read.

    >>> extract_answer("<reasoning>\\n...\\n</reasoning>\\n<answer>\\n 42 \\n</answer>\\n")
    '42'
    >>> extract_answer("<answer>A</answer> then <answer>B</answer>"), extract_answer("<answer>\\nyes")
    ('B', 'yes')
    >>> extract_answer("The answer is 42.")
    ''
    """
    text = completion_text(text)
    if "<answer>" not in text:
        return ""
    return text.rsplit("<answer>", 1)[1].split("</answer>", 1)[0].strip()


def parse_number(text: Any) -> Optional[Fraction]:
    """A GSM8K-style answer as an exact number, ignoring ``$``, thousands separators and one trailing
    period; None if it is not a number.

    >>> parse_number("$1,080."), parse_number("-7"), parse_number("18.50"), parse_number("18 dollars")
    (Fraction(1080, 1), Fraction(-7, 1), Fraction(37, 2), None)
    """
    if not isinstance(text, str):
        return None
    text = text.replace("$", "").strip()
    if text.endswith("."):
        text = text[:-1]
    if len(text) > MAX_NUMBER_CHARS or not NUMBER.fullmatch(text):
        return None
    return Fraction(text.replace(",", ""))


def number_tokens(text: str) -> set:
    """The distinct values of the numbers standing on their own in a text (a number too long to read
    stays in the set as its text, so it still counts as "another number").

    >>> sorted(number_tokens("18 dollars, so 18 - 2 = 16"))
    [Fraction(2, 1), Fraction(16, 1), Fraction(18, 1)]
    """
    return {
        Fraction(m.replace(",", "")) if len(m) <= MAX_NUMBER_CHARS else m for m in NUMBER_TOKEN.findall(text)
    }


def words(text: str) -> set[str]:
    """The lowercase alphabetic words of a text: ``"Maybe, the evidence..."`` -> {"maybe", "the", ...}."""
    return set(re.findall(r"[a-z]+", text.lower()))


# "B)", "(B)", "B.", "B:" at the very start: the answer names an option by its label, then maybe its text.
LEADING_OPTION_LABEL = re.compile(r"^\(?([A-D])(?:\)[.:]?|[.:])")
# A capital A-D standing alone ("The answer is B", "B or C"); "Vitamin C" counts too (it is ambiguous).
STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])[A-D](?![A-Za-z])")
