"""MedMCQA (openlifescienceai/medmcqa): four-option questions from Indian medical entrance exams.

An evaluation-only source. Hub schema: ``id`` (str), ``question`` (str), ``opa``, ``opb``, ``opc``,
``opd`` (str: the options A-D), ``cop`` (int 0-3: the right option), plus ``choice_type``, ``exp``
(an explanation), ``subject_name``, ``topic_name``, which we do not use. The answers of split ``test``
are hidden (``cop`` is -1 there), so we evaluate on split ``validation`` (4,183 questions), as the
published MedMCQA numbers do.

Rows become ``med_mc`` prompts with ``data.medqa.multiple_choice_user_prompt`` (options "A. ..." to
"D. ..." written into the question); the gold answer is the letter of ``cop``: 0 -> "A", ..., 3 -> "D".

Local files (``data_files``): json/jsonl/parquet in the same schema; ``"{split}"`` in a path is replaced
by the split, e.g. ``data/fixtures/benchmarks/medmcqa_{split}.jsonl``.
"""

from __future__ import annotations

from typing import Optional

import datasets

from data.common import DataError, DataFiles, load_split, rows_to_dataset
from data.medqa import check_options, check_question, label_to_letter, multiple_choice_user_prompt

REPO = "openlifescienceai/medmcqa"
SPLITS = ("train", "validation")  # test: answers hidden
EVAL_SPLIT = "validation"
DB_SET = "med_mc"
OPTION_COLUMNS = ("opa", "opb", "opc", "opd")


def parse_row(row: dict) -> tuple[str, str]:
    """One hub row -> (user prompt, gold letter); raises BadRow naming what is wrong."""
    question = check_question(row.get("question"), "question")
    options = check_options([row.get(c) for c in OPTION_COLUMNS], OPTION_COLUMNS)
    letter = label_to_letter(row.get("cop"), "cop")
    return multiple_choice_user_prompt(question, options), letter


def load(split: str = EVAL_SPLIT, data_files: Optional[DataFiles] = None) -> datasets.Dataset:
    """MedMCQA as ``{prompt, answer, db_set="med_mc"}`` rows (answer: a letter A-D).

    Without ``data_files``: ``datasets.load_dataset("openlifescienceai/medmcqa", split=split)``. With
    it: local json/jsonl/parquet files in the same schema.
    """
    if split == "test":
        raise DataError(
            "medmcqa: split='test' has no answers (cop is -1 there); evaluate on split='validation' "
            "(4,183 questions)"
        )
    if split not in SPLITS:
        raise DataError(f"medmcqa: split={split!r}: must be one of {SPLITS}")
    raw, origin = load_split("medmcqa", REPO, split, data_files)
    return rows_to_dataset(raw, parse_row, source="medmcqa", db_set=DB_SET, origin=origin)
