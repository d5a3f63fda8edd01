"""The two answer rewards: is the answer of the right type (``int_reward_func``), is it right
(``correctness_reward_func``)?

Both read the answer with ``extract_answer`` (text between the last ``<answer>`` and the next
``</answer>``) and need the dataset columns ``answer`` (the gold, a string) and ``db_set`` (``"gsm8k"``,
``"pubmedqa"`` or ``"med_mc"``), one entry per completion. Any other db_set (a user's own dataset) scores
FULL_CREDIT when the normalised answer equals the gold, ignoring case.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

from rewards.parsing import (
    INTEGER,
    LEADING_OPTION_LABEL,
    MC_LETTERS,
    PUBMEDQA_LABELS,
    STANDALONE_LETTER,
    extract_answer,
    normalize_answer,
    number_tokens,
    option_letter,
    parse_number,
    read_unicode_minus,
    words,
)

FULL_CREDIT = 2.0
PARTIAL_CREDIT = 1.0
TYPE_CREDIT = 0.5


def _column(values: Optional[Sequence], name: str, n: int, who: str) -> list[str]:
    """A dataset column, checked (present, one entry per completion), entries as strings (None -> "")."""
    if values is None:
        raise ValueError(f"{who}: needs the dataset column {name!r} (one entry per completion)")
    if len(values) != n:
        raise ValueError(f"{who}: {n} completions but {len(values)} {name!r} entries")
    return [v if isinstance(v, str) else ("" if v is None else str(v)) for v in values]


# ---------------------------------------------------------------------------- answer type


def is_answer_type(predicted: str, db_set: str) -> bool:
    """Is ``predicted`` an answer of the kind ``db_set`` asks for, in its bare form?

    gsm8k: an integer (sign and thousands separators allowed: ``-3``, ``1,080``; a Unicode minus counts
    as a minus: ``\u22123``); pubmedqa: yes, no or maybe; med_mc: one letter A-D (any case). Surrounding
    whitespace is ignored; punctuation or brackets are not (``"yes."``, ``"B)"``: False): this 0.5 is
    what still rewards the clean form once ``correctness_reward_func`` forgives them.

    >>> is_answer_type("1,080", "gsm8k"), is_answer_type("18 dollars", "gsm8k")
    (True, False)
    >>> is_answer_type("Maybe", "pubmedqa"), is_answer_type("b", "med_mc")
    (True, True)
    >>> is_answer_type("\u22125", "gsm8k"), is_answer_type("B)", "med_mc"), is_answer_type("yes.", "pubmedqa")
    (True, False, False)
    """
    predicted = read_unicode_minus(predicted.strip())
    if db_set == "gsm8k":
        return INTEGER.fullmatch(predicted) is not None
    if db_set == "pubmedqa":
        return predicted.lower() in PUBMEDQA_LABELS
    if db_set == "med_mc":
        return predicted.upper() in MC_LETTERS
    return False


def int_reward_func(
    completions: Sequence[Any], db_set: Optional[Sequence] = None, **columns: Any
) -> list[float]:
    """0.5 when the extracted answer has the right type for its source (``is_answer_type``), else 0.0."""
    sets = _column(db_set, "db_set", len(completions), "int_reward_func")
    return [
        TYPE_CREDIT if is_answer_type(extract_answer(c), d) else 0.0
        for c, d in zip(completions, sets, strict=True)
    ]


# ---------------------------------------------------------------------------- correctness


def score_answer(predicted: str, gold: str, db_set: str) -> float:
    """2.0 if ``predicted`` equals ``gold`` after normalisation, 1.0 if the gold stands in it alone,
    else 0.0.

    Both sides first go through ``normalize_answer`` (every source: whitespace and trailing ``. ! ? , ; :``
    removed, a Unicode minus before a digit read as ``-``). Then equality: gsm8k numerically, ignoring
    ``$`` and thousands separators (``"$1,080."`` = ``"1080"``); pubmedqa case-insensitively (``"Yes."`` =
    ``"yes"``); med_mc as option letters, any case, brackets allowed (``"a)"`` = ``"(A)"`` = ``"A"``).
    Partial (1.0): not equal, but the gold appears as a standalone token and no other label does:
    gsm8k, the only number in the answer is the gold (``"18 dollars"``); pubmedqa, the gold is the
    only one of yes/no/maybe among the words (``"maybe, the evidence is mixed"``); med_mc, the answer
    starts with the gold's option label, any case (``"b) Insulin"``) or the gold is the only standalone
    capital A-D (``"The answer is B"``).

    >>> [score_answer(answer, "18", "gsm8k") for answer in ("18", "18.", "18 dollars", "18 or 20")]
    [2.0, 2.0, 1.0, 0.0]
    >>> score_answer("Yes.", "yes", "pubmedqa"), score_answer("a)", "A", "med_mc")
    (2.0, 2.0)
    >>> score_answer("\u22125", "-5", "gsm8k"), score_answer("\u22125 degrees", "-5", "gsm8k")
    (2.0, 1.0)
    """
    predicted, gold = normalize_answer(predicted), normalize_answer(gold)
    if not predicted or not gold:
        return 0.0
    if db_set == "gsm8k":
        gold_value, value = parse_number(gold), parse_number(predicted)
        if gold_value is None:
            return 0.0
        if value is not None:
            return FULL_CREDIT if value == gold_value else 0.0
        return PARTIAL_CREDIT if number_tokens(predicted) == {gold_value} else 0.0
    if db_set == "pubmedqa":
        gold = gold.lower()
        if predicted.lower() == gold:
            return FULL_CREDIT
        found = words(predicted) & set(PUBMEDQA_LABELS)
        return PARTIAL_CREDIT if found == {gold} else 0.0
    if db_set == "med_mc":
        gold = option_letter(gold) or gold.upper()
        if (option_letter(predicted) or predicted.upper()) == gold:
            return FULL_CREDIT
        label = LEADING_OPTION_LABEL.match(predicted)
        if label:
            return PARTIAL_CREDIT if label.group(1).upper() == gold else 0.0
        found = set(STANDALONE_LETTER.findall(predicted))
        return PARTIAL_CREDIT if found == {gold} else 0.0
    # any other db_set (a user's own dataset, data/custom.py): the normalised answers must match, any case;
    # no partial credit, since we do not know what its labels look like
    return FULL_CREDIT if predicted.casefold() == gold.casefold() else 0.0


def correctness_reward_func(
    completions: Sequence[Any],
    answer: Optional[Sequence] = None,
    db_set: Optional[Sequence] = None,
    **columns: Any,
) -> list[float]:
    """``score_answer(extract_answer(completion), gold, db_set)`` for each completion: 2.0, 1.0 or 0.0."""
    golds = _column(answer, "answer", len(completions), "correctness_reward_func")
    sets = _column(db_set, "db_set", len(completions), "correctness_reward_func")
    return [score_answer(extract_answer(c), g, d) for c, g, d in zip(completions, golds, sets, strict=True)]
