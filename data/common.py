"""What the three loaders share: finding local files, reading them, and turning raw rows into prompt rows.

A loader (``data.gsm8k.load``, ``data.pubmedqa.load``, ``data.health_benchmarks.load``) is two steps:

1. The raw load. From the hub: ``load_hub`` calls ``datasets.load_dataset(repo, config, ...)``. From
   local files (``data_files=...``): ``read_local_files`` calls ``datasets.load_dataset("json" |
   "parquet", ...)``. Both give a ``datasets.Dataset`` in the hub schema, so everything after this
   step is shared. A file that cannot be read is one ``DataError`` naming the file and, for JSON, the
   line (``find_file_problem`` looks for it only after ``datasets`` failed, so a good file costs nothing
   extra); a hub dataset that cannot be loaded (offline, a wrong id) is one ``DataError`` naming the
   ``--<source>_data_files`` flag that reads local files instead.
2. ``rows_to_dataset``: every raw row goes through the source's ``parse_row(row) -> (user, answer)``
   (``collect_rows`` with any ``make_row(row) -> {prompt, answer, db_set}``: a user's own dataset).
   A malformed row raises ``BadRow(reason)``: it is skipped, counted per reason, and reported in one
   warning per source. A row left out on purpose (a held-out question, a context that is too long)
   raises ``SkipRow(reason)``: counted and logged at info level. A source with no row left is a
   ``DataError`` naming the source and where its rows came from.

The result always has the columns ``prompt`` (system + user message), ``answer`` (str) and ``db_set``.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Union

import datasets

from data.prompts import make_prompt

logger = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parent.parent
FIXTURES_DIR = Path(__file__).resolve().parent / "fixtures"
# file suffix -> the datasets builder that reads it. The built-in sources read these; data.custom (a
# user's own dataset) also reads CSV (CUSTOM_FORMATS).
LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
CUSTOM_FORMATS = {**LOCAL_FORMATS, ".csv": "csv"}

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


def resolve_local_path(path: str) -> str:
    """A relative path is looked up in the working directory first, then in the project root
    (so the shipped fixtures are found from anywhere)."""
    if os.path.isabs(path) or glob.glob(path):
        return path
    fallback = str(PROJECT_ROOT / path)
    return fallback if glob.glob(fallback) else path


def resolve_data_files(
    data_files: DataFiles, split: str, source: str, formats: dict[str, str] = LOCAL_FORMATS
) -> list[str]:
    """The sorted list of local files for one split.

    ``data_files`` may be a path, a glob or a folder (every file with a suffix of ``formats`` inside), a
    list of those, or a dict ``{split: path(s)}``. A literal ``{split}`` in a path is replaced by the
    split name, so one config string serves both splits: ``data/fixtures/gsm8k_{split}.jsonl``.
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
        path = resolve_local_path(str(pattern).replace("{split}", split))
        if os.path.isdir(path):
            found = sorted(
                os.path.join(path, name) for name in os.listdir(path) if Path(name).suffix in formats
            )
            if not found:
                raise DataError(
                    f"{source}: the folder {path!r} holds no {'/'.join(sorted(formats))} file (split {split!r})"
                )
        else:
            found = sorted(glob.glob(path))
        if not found:
            raise DataError(f"{source}: no data file matches {path!r} (split {split!r})")
        files.extend(found)
    suffixes = ", ".join(sorted(formats))
    for file in files:
        if Path(file).suffix not in formats:
            raise DataError(f"{source}: {file!r}: unsupported format (use {suffixes})")
        if os.path.isdir(file):
            raise DataError(f"{source}: {file!r} is a folder, not a data file")
    return files


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _datasets_logs_silenced() -> Iterator[None]:
    """datasets logs its own ERROR line ("Failed to load JSON from file ...") before raising; our
    DataError says it better, in one line, so that log is held back while a file is read."""
    datasets_logger = logging.getLogger("datasets")
    level = datasets_logger.level
    datasets_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        datasets_logger.setLevel(level)


def _json_kind(value: Any) -> str:
    return {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def find_json_problem(text: str) -> str | None:
    """The first problem of a JSON / JSON Lines file's text, naming its line; None if none is found.

    A file whose first character is ``[`` is one JSON array of row objects; anything else is read as
    JSON Lines (one object per line, blank lines allowed), or one object over several lines.

    >>> find_json_problem('{"a": 1}\\n{"a": 2\\n')
    "line 2: not valid JSON (Expecting ',' delimiter, column 8)"
    >>> find_json_problem('{"a": 1}\\n[1, 2]\\n'), find_json_problem("  \\n")
    ('line 2: an array, expected one JSON object per line', 'the file is empty')
    >>> find_json_problem('[{"a": 1}, 7]'), find_json_problem('{"a": 1}\\n\\n{"a": 2}') is None
    ('element 1 of the top-level array is a number, expected an object', True)
    """
    if not text.strip():
        return "the file is empty"
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            return f"line {err.lineno}: not valid JSON ({err.msg}, column {err.colno})"
        for index, row in enumerate(rows):
            if not isinstance(row, dict):
                return f"element {index} of the top-level array is {_json_kind(row)}, expected an object"
        return None if rows else "the file is an empty array (no rows)"
    first_line = True
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as err:
            if first_line and _is_one_json_object(text):
                return None  # one object written over several lines: one row
            return f"line {number}: not valid JSON ({err.msg}, column {err.colno})"
        if not isinstance(value, dict):
            return f"line {number}: {_json_kind(value)}, expected one JSON object per line"
        first_line = False
    return None


def _is_one_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except json.JSONDecodeError:
        return False


def find_file_problem(file: str) -> str | None:
    """Why one local data file cannot be read (naming the line for JSON), or None if no reason is found.

    Only called after ``datasets`` failed on the files, so a good file is never read twice.
    """
    builder = CUSTOM_FORMATS.get(Path(file).suffix)
    try:
        if os.path.getsize(file) == 0:
            return "the file is empty"
        if builder == "json":
            with open(file, encoding="utf-8-sig") as fh:  # -sig: a byte-order mark is not an error
                return find_json_problem(fh.read())
        if builder == "parquet":
            import pyarrow.parquet

            pyarrow.parquet.read_table(file)
        elif builder == "csv":
            import pandas

            if pandas.read_csv(file).empty:
                return "no rows below the header"
    except UnicodeDecodeError as err:
        return f"not UTF-8 text (byte {err.start}: {err.reason})"
    except Exception as err:  # the reader's own message (pandas names the line of a bad CSV row)
        return f"{type(err).__name__}: {_first_line(err)}"
    return None


def read_local_files(
    files: list[str], source: str, formats: dict[str, str] = LOCAL_FORMATS
) -> datasets.Dataset:
    """Read local files in the hub schema with ``datasets`` (json/jsonl or parquet, not mixed).

    Raises DataError naming the file (and line) that cannot be read: an empty file, a broken JSON line.
    """
    builders = {formats[Path(f).suffix] for f in files}
    if len(builders) != 1:
        raise DataError(
            f"{source}: files of different formats ({', '.join(files)}): convert them to one format"
        )
    try:
        with _datasets_logs_silenced():
            return datasets.load_dataset(builders.pop(), data_files=files, split="train")
    except Exception as err:  # a file datasets cannot parse at all (not a bad row: a bad file)
        for file in files:
            problem = find_file_problem(file)
            if problem is not None:
                raise DataError(f"{source}: could not read {file}: {problem}") from err
        cause = err.__cause__ or err  # datasets wraps the parser's error in DatasetGenerationError
        raise DataError(
            f"{source}: could not read {', '.join(files)}: {type(cause).__name__}: {_first_line(cause)}"
        ) from err


def load_hub(
    source: str, repo: str, config: str | None = None, split: str | None = None, hint: str | None = None
):
    """``datasets.load_dataset(repo, config, split=split)``; a failure (offline, a wrong id or split, no
    access) is one DataError ending with ``hint`` (default: the ``--<source>_data_files`` flag that reads
    local files instead)."""
    try:
        return datasets.load_dataset(repo, config, split=split)
    except Exception as err:
        where = repo + (f" ({config})" if config else "") + (f", split {split}" if split else "")
        hint = hint or f"offline, give local files in its hub schema with --{source}_data_files"
        raise DataError(
            f"{source}: cannot load {where} from the hub ({type(err).__name__}: {_first_line(err)}); {hint}"
        ) from err


def load_split(
    source: str, repo: str, split: str, data_files: DataFiles | None, config: str | None = None
) -> tuple[datasets.Dataset, str]:
    """The raw rows of one split and a description of where they came from (for messages).

    ``data_files`` None: ``datasets.load_dataset(repo, config, split=split)`` from the hub; else the
    local files ``data_files`` names for that split, in the same schema.
    """
    if data_files is None:
        raw = load_hub(source, repo, config, split)
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

    ``parse_row(row)`` returns ``(user_content, answer)`` or raises ``BadRow``/``SkipRow``; the prompt is
    the recipe's system prompt and that user message. See ``collect_rows`` for what happens to bad rows.
    """

    def make_row(row: dict) -> dict[str, Any]:
        user_content, answer = parse_row(row)
        return {"prompt": make_prompt(user_content), "answer": answer, "db_set": db_set}

    return collect_rows(raw_rows, make_row, source=source, origin=origin)


def collect_rows(
    raw_rows: Iterable[dict],
    make_row: Callable[[dict], dict[str, Any]],
    *,
    source: str,
    origin: str,
) -> datasets.Dataset:
    """The ``{prompt, answer, db_set}`` rows that ``make_row`` builds from the raw rows.

    ``make_row(row)`` raises ``BadRow``/``SkipRow`` for a row it cannot or should not use. Malformed
    rows are counted per reason and reported in one warning (with the index of the first such row,
    counting from 0 through the files in order); if no row is left, ``DataError`` names ``source``,
    ``origin`` (the files or the hub id) and the reasons.
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
            kept.append(make_row(row))
        except BadRow as err:
            bad[err.reason] += 1
            first_bad.setdefault(err.reason, index)
        except SkipRow as err:
            skipped[err.reason] += 1

    malformed = "; ".join(f"{reason}: {n} (first at row {first_bad[reason]})" for reason, n in bad.items())
    if not kept:  # the error says it all: no warning before it
        raise DataError(
            f"{source}: no valid row left in {origin} ({n_rows} row(s) read; malformed: {malformed or 'none'}; "
            f"left out: {dict(skipped) or 'none'})"
        )
    if bad:
        logger.warning(
            "%s: skipped %d malformed row(s) of %d in %s [%s]",
            source,
            sum(bad.values()),
            n_rows,
            origin,
            malformed,
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
    return datasets.Dataset.from_list(kept, features=ROW_FEATURES)


def is_nonempty_str(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())
