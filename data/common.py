"""What the three loaders share: finding local files, reading them, and turning raw rows into prompt rows.

A loader (``data.gsm8k.load``, ``data.pubmedqa.load``, ``data.health_benchmarks.load``) is two steps:

1. The raw load. From the hub: ``datasets.load_dataset(repo, config, ...)``. From local files
   (``data_files=...``): ``read_local_files`` calls ``datasets.load_dataset("json" | "parquet", ...)``.
   Both give a ``datasets.Dataset`` in the hub schema, so everything after this step is shared.
2. ``rows_to_dataset``: every raw row goes through the source's ``parse_row(row) -> (user, answer)``.
   A malformed row raises ``BadRow(reason)``: it is skipped, counted per reason, and reported in one
   warning per source. A row left out on purpose (a held-out question, a context that is too long)
   raises ``SkipRow(reason)``: counted and logged at info level. A source with no row left is a
   ``DataError`` naming the source and where its rows came from.

The result always has the columns ``prompt`` (system + user message), ``answer`` (str) and ``db_set``.
"""

from __future__ import annotations

import glob
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, Union

import datasets

from data.prompts import make_prompt

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}

# data_files: a path/glob/folder, a list of them, or {split: path(s)}; "{split}" in a path is replaced.
DataFiles = Union[str, list, dict]

# The features of every loader's output, spelled out so the three sources always line up for
# interleave_datasets (which needs identical features).
ROW_FEATURES = datasets.Features(
    {
        "prompt": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "answer": datasets.Value("string"),
        "db_set": datasets.Value("string"),
    }
)


class DataError(ValueError):
    """A data problem that stops loading: the message names the source and the file (or hub id)."""


class SkipRow(Exception):
    """A valid row left out on purpose (held out, too long, not in the requested split)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class BadRow(SkipRow):
    """A malformed row: skipped, counted and reported in one warning per source."""


# ---------------------------------------------------------------------------- local files


def _resolve_path(path: str) -> str:
    """A relative path is looked up in the working directory first, then in the project root
    (so the shipped fixtures are found from anywhere)."""
    if os.path.isabs(path) or glob.glob(path):
        return path
    fallback = str(PROJECT_ROOT / path)
    return fallback if glob.glob(fallback) else path


def resolve_data_files(data_files: DataFiles, split: str, source: str) -> list[str]:
    """The sorted list of local files for one split.

    ``data_files`` may be a path, a glob or a folder (every .json/.jsonl/.parquet inside), a list of
    those, or a dict ``{split: path(s)}``. A literal ``{split}`` in a path is replaced by the split
    name, so one config string serves both splits: ``data/fixtures/gsm8k_{split}.jsonl``.
    """
    if isinstance(data_files, dict):
        if split not in data_files:
            raise DataError(
                f"{source}: data_files has no entry for split {split!r} (keys: {sorted(data_files)})"
            )
        data_files = data_files[split]
    patterns = [data_files] if isinstance(data_files, (str, os.PathLike)) else list(data_files)
    files: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, (str, os.PathLike)):
            raise DataError(f"{source}: data_files entry {pattern!r} is not a path")
        path = _resolve_path(str(pattern).replace("{split}", split))
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name) for name in os.listdir(path) if Path(name).suffix in LOCAL_FORMATS
            )
        else:
            found = sorted(glob.glob(path))
        if not found:
            raise DataError(f"{source}: no data file matches {path!r} (split {split!r})")
        files.extend(found)
    for file in files:
        if Path(file).suffix not in LOCAL_FORMATS:
            raise DataError(f"{source}: {file!r}: unsupported format (use .json, .jsonl or .parquet)")
    return files


def read_local_files(files: list[str], source: str) -> datasets.Dataset:
    """Read local files in the hub schema with ``datasets`` (json/jsonl or parquet, not mixed)."""
    builders = {LOCAL_FORMATS[Path(f).suffix] for f in files}
    if len(builders) != 1:
        raise DataError(f"{source}: mix of json and parquet files in {files}: convert them to one format")
    try:
        return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as err:  # a file datasets cannot parse at all (not a bad row: a bad file)
        raise DataError(f"{source}: could not read {', '.join(files)}: {type(err).__name__}: {err}") from err


def load_split(
    source: str, repo: str, split: str, data_files: DataFiles | None, config: str | None = None
) -> tuple[datasets.Dataset, str]:
    """The raw rows of one split and a description of where they came from (for messages).

    ``data_files`` None: ``datasets.load_dataset(repo, config, split=split)`` from the hub; else the
    local files ``data_files`` names for that split, in the same schema.
    """
    if data_files is None:
        raw = (
            datasets.load_dataset(repo, config, split=split)
            if config
            else datasets.load_dataset(repo, split=split)
        )
        return raw, f"{repo} ({config + ', ' if config else ''}split {split})"
    files = resolve_data_files(data_files, split, source=source)
    return read_local_files(files, source=source), ", ".join(files)


# ---------------------------------------------------------------------------- raw rows -> prompt rows


def rows_to_dataset(
    raw_rows: Iterable[dict],
    parse_row: Callable[[dict], tuple[str, str]],
    *,
    source: str,
    db_set: str,
    origin: str,
) -> datasets.Dataset:
    """Turn raw hub-schema rows into ``{prompt, answer, db_set}`` rows.

    ``parse_row(row)`` returns ``(user_content, answer)`` or raises ``BadRow``/``SkipRow``. Malformed
    rows are counted per reason and reported in one warning (with the index of the first such row);
    if no row is left, ``DataError`` names ``source`` and ``origin`` (the files or the hub id).
    """
    kept: list[dict[str, Any]] = []
    bad: Counter = Counter()
    skipped: Counter = Counter()
    first_bad: dict[str, int] = {}
    n_rows = 0
    for index, row in enumerate(raw_rows):
        n_rows += 1
        try:
            if not isinstance(row, dict):
                raise BadRow("row is not an object")
            user_content, answer = parse_row(row)
        except BadRow as err:
            bad[err.reason] += 1
            first_bad.setdefault(err.reason, index)
            continue
        except SkipRow as err:
            skipped[err.reason] += 1
            continue
        kept.append({"prompt": make_prompt(user_content), "answer": answer, "db_set": db_set})

    if bad:
        details = "; ".join(f"{reason}: {n} (first at row {first_bad[reason]})" for reason, n in bad.items())
        logger.warning(
            "%s: skipped %d malformed row(s) of %d in %s [%s]",
            source,
            sum(bad.values()),
            n_rows,
            origin,
            details,
        )
    if skipped:
        logger.info(
            "%s: left out %d row(s) of %d in %s [%s]",
            source,
            sum(skipped.values()),
            n_rows,
            origin,
            "; ".join(f"{reason}: {n}" for reason, n in skipped.items()),
        )
    if not kept:
        raise DataError(
            f"{source}: no valid row left in {origin} ({n_rows} row(s) read; malformed: {dict(bad) or 'none'}; "
            f"left out: {dict(skipped) or 'none'})"
        )
    return datasets.Dataset.from_list(kept, features=ROW_FEATURES)


def is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
