"""MedQA-USMLE, four options (GBaker/MedQA-USMLE-4-options-hf): US medical licensing exam questions.

An evaluation-only source (never in the training mixture). Hub schema (the "swag" layout of the
``-hf`` variant): ``id`` (str), ``sent1`` (str: the question, usually a clinical vignette), ``sent2``
(str: usually empty), ``ending0`` .. ``ending3`` (str: the options A-D), ``label`` (int 0-3: the index
of the right ending). We evaluate on split ``test`` (1,273 questions).

Every row becomes a ``med_mc`` prompt, like Health_Benchmarks: the question, the four options written
as ``"A. ...\\nB. ...\\nC. ...\\nD. ..."``, and the recipe's instruction to answer with 'A', 'B', 'C' or 'D'
(``multiple_choice_user_prompt``, shared with ``data.medmcqa`` and ``data.mmlu_medical``). The gold
answer is the letter of ``label``: 0 -> "A", ..., 3 -> "D".

Local files (``data_files``): json/jsonl/parquet in the same schema; ``"{split}"`` in a path is replaced
by the split, e.g. ``data/fixtures/benchmarks/medqa_{split}.jsonl``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import datasets

from data.common import (
    BadRow,
    DataError,
    DataFiles,
    is_nonempty_str,
    load_split,
    rows_to_dataset,
)
from data.prompts import health_benchmarks_user_prompt

REPO = "GBaker/MedQA-USMLE-4-options-hf"
SPLITS = ("train", "validation", "test")
EVAL_SPLIT = "test"
DB_SET = "med_mc"
LETTERS = ("A", "B", "C", "D")
OPTION_COLUMNS = ("ending0", "ending1", "ending2", "ending3")


# ---------------------------------------------------------------------------- shared by the MC benchmarks


def multiple_choice_user_prompt(question: str, options: Sequence[str]) -> str:
    """The user message of a four-option question: question, options "A. ..." to "D. ...", instruction.

    It is the Health_Benchmarks prompt (``data.prompts.health_benchmarks_user_prompt``) around the
    question with its options written in, so every ``med_mc`` source reads the same to the model.

    >>> multiple_choice_user_prompt("Which is a bone?", ["femur", "aorta", "liver", "skin"]).split("\\n")[3:8]
    ['Which is a bone?', 'A. femur', 'B. aorta', 'C. liver', 'D. skin']
    """
    lines = [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, options, strict=True)]
    return health_benchmarks_user_prompt(question.strip() + "\n" + "\n".join(lines))


def label_to_letter(value: Any, field: str) -> str:
    """An option index 0-3 (int, or a string of one digit) as its letter; raises BadRow naming ``field``.

    A letter "A"-"D" is accepted too (an export that wrote the class names instead of the indices).

    >>> label_to_letter(0, "label"), label_to_letter("3", "label"), label_to_letter("b", "answer")
    ('A', 'D', 'B')
    """
    if isinstance(value, bool):  # True is an int in Python, never a label
        raise BadRow(f"{field} is not an option index 0-3")
    if isinstance(value, str) and value.strip().upper() in LETTERS:
        return value.strip().upper()
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, int):
        if 0 <= value < len(LETTERS):
            return LETTERS[value]
        raise BadRow(f"{field} out of range 0-3")
    raise BadRow(f"{field} is not an option index 0-3")


def check_options(options: Sequence[Any], fields: Sequence[str]) -> list[str]:
    """The four option texts, or BadRow naming the first option that is missing or empty."""
    for option, field in zip(options, fields, strict=True):
        if not is_nonempty_str(option):
            raise BadRow(f"{field} missing, empty or not a string")
    return list(options)


def check_question(question: Any, field: str) -> str:
    if not isinstance(question, str):
        raise BadRow(f"{field} missing or not a string")
    if not question.strip():
        raise BadRow(f"empty {field}")
    return question


# ---------------------------------------------------------------------------- MedQA


def parse_row(row: dict) -> tuple[str, str]:
    """One hub row -> (user prompt, gold letter); raises BadRow naming what is wrong."""
    question = check_question(row.get("sent1"), "sent1")
    extra = row.get("sent2")
    if is_nonempty_str(extra):  # empty in MedQA; kept if a row has it (it continues the question)
        question = question.strip() + "\n" + extra.strip()
    options = check_options([row.get(c) for c in OPTION_COLUMNS], OPTION_COLUMNS)
    letter = label_to_letter(row.get("label"), "label")
    return multiple_choice_user_prompt(question, options), letter


def load(split: str = EVAL_SPLIT, data_files: Optional[DataFiles] = None) -> datasets.Dataset:
    """MedQA-USMLE (4 options) as ``{prompt, answer, db_set="med_mc"}`` rows (answer: a letter A-D).

    Without ``data_files``: ``datasets.load_dataset("GBaker/MedQA-USMLE-4-options-hf", split=split)``.
    With it: local json/jsonl/parquet files in the same schema.
    """
    if split not in SPLITS:
        raise DataError(f"medqa: split={split!r}: must be one of {SPLITS}")
    raw, origin = load_split("medqa", REPO, split, data_files)
    return rows_to_dataset(raw, parse_row, source="medqa", db_set=DB_SET, origin=origin)
