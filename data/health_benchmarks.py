"""Health_Benchmarks (yesilhealth/Health_Benchmarks): four-option medical questions in 52 specialties.

Hub schema: ``Questions`` (str, the four options written inside the text), ``Answers`` (str). One config
per specialty, each with a single split of the same name, loaded as ``load_dataset(repo, name)[name]``.
The 52 names below are the recipe's list; they equal the 52 subsets of the hub viewer (7,535 rows).

The exact format of ``Answers`` is not documented, so the gold letter is parsed tolerantly
(``parse_answer_letter``): ``"B"``, ``"(B)"``, ``"B) Vitamin C"``, ``"Answer: B"``, ``"The correct answer
is B."``, or the text of exactly one of the options. A row whose answer gives no letter is malformed.

There is no test split, so we hold one out: in each specialty, the questions are ordered by the
SHA-256 of their (stripped) text and the first ``ceil(10%)`` are the evaluation set. Deterministic,
independent of row order and of the seed; a question text held out in any specialty is never trained on.

Local files (``data_files``): each file is one specialty, in the hub schema (``Questions``,
``Answers``), and 10% of each file is held out. A single file is therefore treated as one specialty;
name the files after the specialties (``health_benchmarks_Cardiology.jsonl``) to keep them apart.
In the malformed-row warning, row numbers count through the files in (sorted) order.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
from collections.abc import Iterable, Sequence
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
from data.prompts import health_benchmarks_user_prompt

REPO = "yesilhealth/Health_Benchmarks"
DB_SET = "med_mc"
SPLITS = ("train", "test")
LETTERS = ("A", "B", "C", "D")
EVAL_FRACTION = 0.1

# The recipe's 52 configs (its order), cross-checked with the subsets of the dataset viewer.
SPECIALTIES = (
    "Lab_Medicine", "Wearables", "Dermatology", "Gastroenterology", "Internal_Medicine", "Oncology",
    "Orthopedics", "General_Surgery", "Ophthalmology", "Audiology", "Head_Neck_Surgery", "Elderly_Care",
    "Pediatrics", "Allergy_Immunology", "Rheumatology", "Pharmacy", "Obstetrics_Gynecology", "Microbiology",
    "Dentistry", "Physical_Medicine_and_Rehabilitation", "Neurology", "Psychiatry", "Pathology", "Genetics",
    "Rare_Diseases", "Hematology", "Emergency", "Endocrinology", "Radiology", "Cardiology", "Pulmonology",
    "Infectious_Diseases", "Critical_Care", "Pediatric_Surgery", "Neuroscience", "Epidemiology",
    "Fitness_Sports", "Health_Education", "Health_Economics", "Health_Entrepreneurship",
    "Hospital_Management", "Mental_Health", "Nutrition", "Palliative_Care", "Preventive_Medicine",
    "Public_Health", "Social_Media_Addiction", "Sleep", "Supplements", "Vaccination", "Work_Health",
    "Wellbeing",
)  # fmt: skip

# "B", "(B)", "B)", "B.", "B:", "B) text", "b) text" -- a letter alone or followed by a delimiter
# (so the article in "A patient with ..." is not read as option A).
_LEADING_LETTER = re.compile(r"^\(?([A-Da-d])(?:\)?$|\)?[.):])")
# "Answer: B", "The correct answer is C.", "Option (D)": keyword in any case, capital letter after it.
_KEYWORD_LETTER = re.compile(r"(?i:answer|option|choice)(?:\s+is)?\s*[:\-]?\s*\(?([A-D])(?![A-Za-z])")
# An option line inside the question: "A) text", "(B) text", "C. text", "D: text".
_OPTION_LINE = re.compile(r"^\s*\(?([A-D])[.):]\s*(.+?)\s*$", re.MULTILINE)


def _normalise_text(text: str) -> str:
    return " ".join(text.lower().split()).rstrip(".")


def parse_options(question: str) -> dict[str, str]:
    """The options written in a question, ``{"A": "text", ...}`` (lines like ``A) text``)."""
    return {letter: text for letter, text in _OPTION_LINE.findall(question)}


def parse_answer_letter(answer: str, question: str = "") -> Optional[str]:
    """The gold letter A-D of a Health_Benchmarks answer, or None if it cannot be told.

    >>> parse_answer_letter("B"), parse_answer_letter("(c) Insulin"), parse_answer_letter("Answer: D")
    ('B', 'C', 'D')
    >>> parse_answer_letter("Insulin", "Which hormone?\\nA) Renin\\nB) Insulin\\nC) Gastrin\\nD) Leptin")
    'B'
    >>> parse_answer_letter("A patient should rest.") is None
    True
    """
    text = answer.strip()
    match = _LEADING_LETTER.match(text) or _KEYWORD_LETTER.search(text)
    if match:
        return match.group(1).upper()
    # The answer may be the text of an option: accept it when it names exactly one option.
    wanted = _normalise_text(text)
    letters = [
        letter for letter, option in parse_options(question).items() if _normalise_text(option) == wanted
    ]
    return letters[0] if wanted and len(set(letters)) == 1 else None


def question_hash(question: str) -> str:
    """The deterministic key that decides the held-out set: SHA-256 of the stripped question text."""
    return hashlib.sha256(question.strip().encode("utf-8")).hexdigest()


def held_out_questions(questions: Iterable[str], fraction: float = EVAL_FRACTION) -> set[str]:
    """The stripped question texts of one specialty that form its evaluation set.

    Unique texts sorted by ``question_hash``; the first ``ceil(fraction * n_unique)`` are held out.
    Example: 78 distinct questions -> 8 held out, 180 -> 18.
    """
    unique = sorted({q.strip() for q in questions}, key=question_hash)
    return set(unique[: math.ceil(fraction * len(unique))])


def _validate(row: dict) -> tuple[str, str]:
    """(question, gold letter) of a row, or BadRow."""
    question, answer = row.get("Questions"), row.get("Answers")
    if not isinstance(question, str):
        raise BadRow("Questions missing or not a string")
    if not question.strip():
        raise BadRow("empty Questions")
    if not isinstance(answer, str) or not answer.strip():
        raise BadRow("Answers missing, empty or not a string")
    letter = parse_answer_letter(answer, question)
    if letter is None:
        raise BadRow("Answers does not give a letter A-D")
    return question, letter


def parse_row(row: dict, *, split: str, held_out: set[str]) -> tuple[str, str]:
    """One hub row -> (user prompt, gold letter); SkipRow when the row belongs to the other split."""
    question, letter = _validate(row)
    in_eval = question.strip() in held_out
    if split == "train" and in_eval:
        raise SkipRow("held out for evaluation")
    if split == "test" and not in_eval:
        raise SkipRow("training question")
    return health_benchmarks_user_prompt(question), letter


def _valid_questions(rows: Iterable[dict]) -> list[str]:
    """The question texts of the rows that are not malformed (the held-out rule counts only these)."""
    questions = []
    for row in rows:
        try:
            questions.append(_validate(row)[0])
        except (BadRow, AttributeError):  # AttributeError: a row that is not an object
            continue
    return questions


def _specialty_files(data_files: DataFiles) -> list[str]:
    """The local files, one per specialty; {split} and per-split dicts make no sense for this source."""
    patterns = data_files if isinstance(data_files, list) else [data_files]
    if isinstance(data_files, dict) or any("{split}" in str(p) for p in patterns):
        raise DataError(
            "health_benchmarks: data_files must list specialty files (no '{split}', no per-split dict): "
            "the source has one split per specialty and holds out its evaluation questions itself"
        )
    return resolve_data_files(data_files, "train", source="health_benchmarks")


def load(
    split: str = "train",
    data_files: Optional[DataFiles] = None,
    *,
    specialties: Optional[Sequence[str]] = None,
    eval_fraction: float = EVAL_FRACTION,
) -> datasets.Dataset:
    """Health_Benchmarks as ``{prompt, answer, db_set="med_mc"}`` rows (answer: one letter A-D).

    ``split="test"`` is the held-out ``eval_fraction`` of every specialty, ``split="train"`` the rest.
    Without ``data_files``: ``load_dataset(REPO, name)[name]`` for each name of ``specialties`` (all 52
    by default). With it: one local file per specialty (paths, globs or a folder; e.g.
    ``data/fixtures/health_benchmarks_*.jsonl``).
    """
    if split not in SPLITS:
        raise DataError(f"health_benchmarks: split={split!r}: must be one of {SPLITS}")
    if not 0 < eval_fraction < 1:
        raise DataError(f"health_benchmarks: eval_fraction={eval_fraction}: must be in (0, 1)")
    if data_files is None:
        names = list(SPECIALTIES if specialties is None else specialties)
        parts = [load_hub("health_benchmarks", REPO, name)[name] for name in names]
        origin = f"{REPO} ({len(names)} specialties)"
    else:
        files = _specialty_files(data_files)
        parts = [read_local_files([f], source="health_benchmarks") for f in files]
        origin = ", ".join(files)

    # Held-out set first (it needs every valid question of a specialty), then the shared row pipeline.
    held_out: set[str] = set()
    for part in parts:
        held_out |= held_out_questions(_valid_questions(part), eval_fraction)
    parse = functools.partial(parse_row, split=split, held_out=held_out)
    return rows_to_dataset(
        itertools.chain.from_iterable(parts), parse, source="health_benchmarks", db_set=DB_SET, origin=origin
    )
