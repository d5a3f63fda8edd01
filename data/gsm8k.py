"""GSM8K (openai/gsm8k, config "main"): grade-school arithmetic word problems.

Hub schema: ``question`` (str), ``answer`` (str: worked solution whose last line is ``#### <number>``).
Splits: train (7,473) and test (1,319). The gold answer kept is the number after the last ``####``,
without thousands separators: ``"...\\n#### 2,125"`` -> ``"2125"``, ``"#### -3"`` -> ``"-3"``.
"""

from __future__ import annotations

import re
from typing import Optional

import datasets

from data.common import (
    BadRow,
    DataError,
    DataFiles,
    is_nonempty_str,
    load_split,
    rows_to_dataset,
)
from data.prompts import gsm8k_user_prompt

REPO = "openai/gsm8k"
CONFIG = "main"
SPLITS = ("train", "test")
DB_SET = "gsm8k"

# An integer or decimal, commas only as thousands separators: 45, -3, 2,125, 850,000, 1.5
NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")


def parse_final_answer(solution: str) -> Optional[str]:
    """The number after the last ``####`` of a GSM8K solution, normalised; None if there is none.

    >>> parse_final_answer("3 + 4 = <<3+4=7>>7\\n#### 7")
    '7'
    >>> parse_final_answer("...\\n#### 2,125"), parse_final_answer("#### -3"), parse_final_answer("#### ten")
    ('2125', '-3', None)
    """
    if "####" not in solution:
        return None
    tail = solution.rsplit("####", 1)[1].strip()
    if not NUMBER.fullmatch(tail):
        return None
    return tail.replace(",", "").lstrip("+")


def parse_row(row: dict) -> tuple[str, str]:
    """One hub row -> (user prompt, gold answer); raises BadRow naming what is wrong."""
    question, solution = row.get("question"), row.get("answer")
    if not isinstance(question, str):
        raise BadRow("question missing or not a string")
    if not question.strip():
        raise BadRow("empty question")
    if not is_nonempty_str(solution):
        raise BadRow("answer missing, empty or not a string")
    if "####" not in solution:
        raise BadRow("no '####' line in answer")
    gold = parse_final_answer(solution)
    if gold is None:
        raise BadRow("'####' not followed by a number")
    return gsm8k_user_prompt(question), gold


def load(split: str = "train", data_files: Optional[DataFiles] = None) -> datasets.Dataset:
    """GSM8K as ``{prompt, answer, db_set="gsm8k"}`` rows.

    Without ``data_files``: ``datasets.load_dataset("openai/gsm8k", "main", split=split)``. With it:
    local json/jsonl/parquet files in the same schema (``"{split}"`` in a path is replaced by the
    split, e.g. ``data/fixtures/gsm8k_{split}.jsonl``).
    """
    if split not in SPLITS:
        raise DataError(f"gsm8k: split={split!r}: must be one of {SPLITS}")
    raw, origin = load_split("gsm8k", REPO, split, data_files, CONFIG)
    return rows_to_dataset(raw, parse_row, source="gsm8k", db_set=DB_SET, origin=origin)
