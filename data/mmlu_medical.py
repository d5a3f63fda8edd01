"""The medical subjects of MMLU (cais/mmlu): four-option exam questions, one hub config per subject.

An evaluation-only source. Hub schema: ``question`` (str), ``subject`` (str), ``choices`` (a list of
four str: the options A-D), ``answer`` (int 0-3, a ClassLabel whose names are A-D). We evaluate on split
``test`` of the six subjects usually reported for medical models (``SUBJECTS``): anatomy (135
questions), clinical_knowledge (265), college_biology (144), college_medicine (173), medical_genetics
(100), professional_medicine (272): 1,089 in all.

Rows become ``med_mc`` prompts with ``data.medqa.multiple_choice_user_prompt`` (options "A. ..." to
"D. ..." written into the question); the gold answer is the letter of ``answer``: 0 -> "A", ..., 3 -> "D".

Local files (``data_files``): json/jsonl/parquet in the same schema, e.g. one file per subject
``data/fixtures/benchmarks/mmlu_*_{split}.jsonl``. A row whose ``subject`` is not one of the requested
subjects is left out, so a dump of MMLU's ``all`` config works as well; a row without ``subject`` is kept.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Sequence
from typing import Optional

import datasets

from data.common import (
    BadRow,
    DataError,
    DataFiles,
    SkipRow,
    load_hub,
    read_local_files,
    resolve_data_files,
    rows_to_dataset,
)
from data.medqa import check_options, check_question, label_to_letter, multiple_choice_user_prompt

REPO = "cais/mmlu"
SUBJECTS = (
    "anatomy",
    "clinical_knowledge",
    "college_biology",
    "college_medicine",
    "medical_genetics",
    "professional_medicine",
)
SPLITS = ("test", "validation", "dev")
EVAL_SPLIT = "test"
DB_SET = "med_mc"


def parse_row(row: dict, *, subjects: frozenset[str]) -> tuple[str, str]:
    """One hub row -> (user prompt, gold letter); BadRow if malformed, SkipRow if another subject."""
    subject = row.get("subject")
    if isinstance(subject, str) and subject and subject not in subjects:
        raise SkipRow(f"subject {subject!r} not requested")
    question = check_question(row.get("question"), "question")
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) != 4:
        raise BadRow("choices is not a list of 4 options")
    options = check_options(choices, [f"choices[{i}]" for i in range(4)])
    letter = label_to_letter(row.get("answer"), "answer")
    return multiple_choice_user_prompt(question, options), letter


def load(
    split: str = EVAL_SPLIT,
    data_files: Optional[DataFiles] = None,
    *,
    subjects: Sequence[str] = SUBJECTS,
) -> datasets.Dataset:
    """MMLU's medical subjects as ``{prompt, answer, db_set="med_mc"}`` rows (answer: a letter A-D).

    Without ``data_files``: ``datasets.load_dataset("cais/mmlu", subject, split=split)`` for each of
    ``subjects``, in that order. With it: local json/jsonl/parquet files in the same schema.
    """
    if split not in SPLITS:
        raise DataError(f"mmlu_medical: split={split!r}: must be one of {SPLITS}")
    if not subjects or any(not isinstance(s, str) or not s for s in subjects):
        raise DataError(f"mmlu_medical: subjects={list(subjects)!r}: must be non-empty subject names")
    if data_files is None:
        parts = [load_hub("mmlu_medical", REPO, subject, split) for subject in subjects]
        raw = itertools.chain.from_iterable(parts)
        origin = f"{REPO} ({', '.join(subjects)}; split {split})"
    else:
        files = resolve_data_files(data_files, split, source="mmlu_medical")
        raw = read_local_files(files, source="mmlu_medical")
        origin = ", ".join(files)
    parse = functools.partial(parse_row, subjects=frozenset(subjects))
    return rows_to_dataset(raw, parse, source="mmlu_medical", db_set=DB_SET, origin=origin)
