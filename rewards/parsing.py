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
    """A GSM8K-style answer as an exact number, ignoring ``$``, thousands separators and what
    ``normalize_answer`` removes (trailing punctuation; a Unicode minus reads as ``-``); None if it is
    not a number.

    >>> parse_number("$1,080."), parse_number("\u22127"), parse_number("18.50"), parse_number("18 dollars")
    (Fraction(1080, 1), Fraction(-7, 1), Fraction(37, 2), None)
    """
    text = normalize_answer(text).replace("$", "").strip()
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


# ---------------------------------------------------------------------------- answer normalisation
# The same rules for every source (docs/REWARDS.md, "Answer normalisation", lists them with examples).

# Minus signs other than "-": U+2212 minus, U+2012 figure dash, U+2013 en dash, U+FE63 small and U+FF0D
# fullwidth hyphen-minus. Read as "-" only directly before a digit ("−5"); elsewhere they are dashes.
_UNICODE_MINUS_BEFORE_DIGIT = re.compile(r"[\u2212\u2012\u2013\ufe63\uff0d](?=\d)")
# Sentence punctuation that may close an answer without changing it: "Yes.", "18!", "B:".
TRAILING_PUNCTUATION = frozenset(".!?,;:")
# A lone option letter, any case, with at most a bracket before and after: "B", "b", "(B)", "a)", "[C]".
_OPTION_LETTER = re.compile(r"[(\[]?([A-Da-d])[)\]]?")

# "B)", "(B)", "[b]", "B.", "B:" at the very start (any case): the answer names an option by its label,
# then maybe its text ("b) Insulin").
LEADING_OPTION_LABEL = re.compile(r"^[(\[]?([A-D])(?:[)\]][.:]?|[.:])", re.IGNORECASE)
# A capital A-D standing alone ("The answer is B", "B or C"); "Vitamin C" counts too (it is ambiguous).
# Capitals only: a lowercase "a" in free text is the article.
STANDALONE_LETTER = re.compile(r"(?<![A-Za-z])[A-D](?![A-Za-z])")


def read_unicode_minus(text: str) -> str:
    """Every Unicode minus or dash directly before a digit becomes ``-``; other dashes stay.

    >>> read_unicode_minus("\u22125"), read_unicode_minus("18\u201320")
    ('-5', '18-20')
    >>> read_unicode_minus("\u2013 3 degrees")
    '\u2013 3 degrees'
    """
    return _UNICODE_MINUS_BEFORE_DIGIT.sub("-", text)


def strip_trailing_punctuation(text: str) -> str:
    """``text`` without the whitespace and sentence punctuation (``. ! ? , ; :``) at its end.

    A scan from the end, not a regex: ``[.!?]+$`` would try every start inside a long run of dots (quadratic).

    >>> [strip_trailing_punctuation(text) for text in ("Yes.", "18 !?", "2.50", "B:")]
    ['Yes', '18', '2.50', 'B']
    """
    end = len(text)
    while end > 0 and (text[end - 1] in TRAILING_PUNCTUATION or text[end - 1].isspace()):
        end -= 1
    return text[:end]


def normalize_answer(text: Any) -> str:
    """An answer (or a gold) as every source compares it: surrounding whitespace and trailing sentence
    punctuation removed, a Unicode minus before a digit read as ``-``. Letter case and inner text stay.

    >>> [normalize_answer(text) for text in ("  Yes. ", "\u22125.", "(B)!", None)]
    ['Yes', '-5', '(B)', '']
    """
    if not isinstance(text, str):
        return ""
    return strip_trailing_punctuation(read_unicode_minus(text).strip())


def option_letter(text: str) -> Optional[str]:
    """The capital A-D that ``text`` is, alone or with brackets (``"b"``, ``"(B)"``, ``"a)"``, ``"[C]"``);
    None for anything else. Normalise first (``normalize_answer``) to also read ``"B."`` and ``"B:"``.

    >>> [option_letter(text) for text in ("a)", "(B)", "[c]", "D", "B) Insulin", "E")]
    ['A', 'B', 'C', 'D', None, None]
    """
    match = _OPTION_LETTER.fullmatch(text)
    return match.group(1).upper() if match else None
