"""PubMedQA (qiaojin/PubMedQA): yes/no/maybe questions about a PubMed abstract.

Hub schema (every config has a single ``train`` split): ``pubid`` (int), ``question`` (str),
``context`` (a dict of lists: ``contexts`` [str], ``labels`` [str], ``meshes`` [str]; pqa_labeled also
has ``reasoning_required_pred`` / ``reasoning_free_pred``), ``long_answer`` (str), ``final_decision``
(``"yes"``/``"no"``/``"maybe"``).

Our splits:

- ``split="train"``: config ``pqa_artificial`` (211,269 generated rows, yes/no only), keeping rows whose
  joined context (``"\\n".join(contexts)``) is shorter than ``max_context_chars`` (1,024 by default, as
  in the recipe: short prompts, short traces), and never a pubid of the official test set.
- ``split="test"``: config ``pqa_labeled`` (1,000 expert rows) restricted to the official 500 test
  questions, whose pubids ship in ``data/pubmedqa_test_pubids.json`` (the list of the PubMedQA authors).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Optional

import datasets

from data.common import (
    BadRow,
    DataError,
    DataFiles,
    SkipRow,
    is_nonempty_str,
    load_hub,
    read_local_files,
    resolve_data_files,
    rows_to_dataset,
)
from data.prompts import pubmedqa_user_prompt

REPO = "qiaojin/PubMedQA"
TRAIN_CONFIG = "pqa_artificial"
TEST_CONFIG = "pqa_labeled"
CONFIGS = {"train": TRAIN_CONFIG, "test": TEST_CONFIG}
LABELS = ("yes", "no", "maybe")
DB_SET = "pubmedqa"
TEST_PUBIDS_FILE = Path(__file__).resolve().parent / "pubmedqa_test_pubids.json"


@functools.lru_cache(maxsize=1)
def official_test_pubids() -> frozenset[int]:
    """The 500 pubids of the official PubMedQA test set (pqa_labeled)."""
    with open(TEST_PUBIDS_FILE) as fh:
        return frozenset(int(p) for p in json.load(fh))


def _pubid(value) -> int:
    if isinstance(value, bool):
        raise BadRow("pubid missing or not an integer")
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.strip().isdigit():
        return int(value)
    raise BadRow("pubid missing or not an integer")


def parse_row(
    row: dict, *, split: str, max_context_chars: int, test_pubids: frozenset[int]
) -> tuple[str, str]:
    """One hub row -> (user prompt, gold label); raises BadRow (malformed) or SkipRow (not in this split)."""
    pubid = _pubid(row.get("pubid"))
    question = row.get("question")
    if not isinstance(question, str):
        raise BadRow("question missing or not a string")
    if not question.strip():
        raise BadRow("empty question")
    context = row.get("context")
    contexts = context.get("contexts") if isinstance(context, dict) else None
    if not isinstance(contexts, list) or not all(isinstance(c, str) for c in contexts):
        raise BadRow("context.contexts missing or not a list of strings")
    joined = "\n".join(contexts)
    if not joined.strip():
        raise BadRow("empty context")
    decision = row.get("final_decision")
    if not is_nonempty_str(decision) or decision.strip().lower() not in LABELS:
        raise BadRow("final_decision missing or not yes/no/maybe")

    if split == "train":
        if pubid in test_pubids:
            raise SkipRow("official test pubid (kept out of training)")
        if len(joined) >= max_context_chars:
            raise SkipRow(f"context of {max_context_chars} characters or more")
    elif pubid not in test_pubids:
        raise SkipRow("not an official test pubid")
    return pubmedqa_user_prompt(contexts, question), decision.strip().lower()


def load(
    split: str = "train",
    data_files: Optional[DataFiles] = None,
    *,
    max_context_chars: int = 1024,
    test_pubids: Optional[Iterable[int]] = None,
) -> datasets.Dataset:
    """PubMedQA as ``{prompt, answer, db_set="pubmedqa"}`` rows (answer: yes/no/maybe).

    Without ``data_files``: ``datasets.load_dataset("qiaojin/PubMedQA", "pqa_artificial" | "pqa_labeled",
    split="train")``. With it: local files in that schema; ``"{split}"`` in a path is replaced by
    ``train``/``test``, so ``data/fixtures/pubmedqa_{split}.jsonl`` names a pqa_artificial-schema file
    for training and a pqa_labeled-schema file for testing. ``test_pubids`` overrides the official list
    (tests use it to check real rows that are not among the 500).
    """
    if split not in CONFIGS:
        raise DataError(f"pubmedqa: split={split!r}: must be one of {tuple(CONFIGS)}")
    if max_context_chars <= 0:
        raise DataError(f"pubmedqa: max_context_chars={max_context_chars}: must be > 0")
    ids = official_test_pubids() if test_pubids is None else frozenset(int(p) for p in test_pubids)
    config = CONFIGS[split]
    if data_files is None:
        raw = load_hub("pubmedqa", REPO, config, split="train")  # each config has only a train split
        origin = f"{REPO} ({config})"
    else:
        files = resolve_data_files(data_files, split, source="pubmedqa")
        raw = read_local_files(files, source="pubmedqa")
        origin = ", ".join(files)
    parse = functools.partial(parse_row, split=split, max_context_chars=max_context_chars, test_pubids=ids)
    return rows_to_dataset(raw, parse, source="pubmedqa", db_set=DB_SET, origin=origin)
