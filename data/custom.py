"""A user's own dataset (the TRL habit): any local file or hub dataset with a ``prompt`` and an ``answer`` column.

    python scripts/train.py --config scripts/configs/tiny-cpu.yaml --dataset_name my_rows_{split}.jsonl

Columns of a row:

- ``prompt``: TRL's conversational format, a list of ``{"role", "content"}`` messages (roles system,
  user, assistant; content a string; the last message from the user), or a plain string, which
  becomes one user message. When the first message is not a system message, the recipe's system
  prompt (``data.prompts.SYSTEM_PROMPT``: answer in the XML format that the format rewards check) is
  put in front. A system message of your own is kept as it is: then the format rewards pay only if it
  asks for that format too.
- ``answer``: the gold answer that ``correctness_reward_func`` compares with, a string (a number, as a
  CSV or parquet column may hold, is written as a string: ``42`` -> ``"42"``).
- ``db_set`` (optional): how the correctness reward compares answers: ``"gsm8k"`` (as numbers),
  ``"pubmedqa"`` (yes/no/maybe), ``"med_mc"`` (option letters), or any other name; rows without it get
  ``db_set`` (``"custom"`` by default). It is also the name of the row's ``reward/<db_set>`` metric.

Any other column is dropped. Where the rows come from (``path_or_hub_id``):

- local files: a path, glob or folder of .json / .jsonl / .parquet / .csv files (one format). A
  ``{split}`` in the path is replaced by the split (``rows_{split}.jsonl`` -> ``rows_train.jsonl``,
  ``rows_test.jsonl``); a path without ``{split}`` holds the ``train`` split only, as
  ``datasets.load_dataset("json", data_files=path)`` reads it.
- anything else is a hub dataset id: ``datasets.load_dataset(path_or_hub_id, config_name, split=split)``.

Errors name the file and what is wrong: a file that cannot be read (its line, for JSON), a missing
column (with the columns that are there), no valid row left (each reason, and the first row it
happened at). Malformed rows among good ones are skipped with one warning, as for the built-in sources.
"""

from __future__ import annotations

import glob
import math
import os
from pathlib import Path
from typing import Any, Optional

import datasets

from data.common import (
    CUSTOM_FORMATS,
    BadRow,
    DataError,
    collect_rows,
    load_hub,
    read_local_files,
    resolve_data_files,
    resolve_local_path,
)
from data.prompts import SYSTEM_PROMPT

SOURCE = "dataset_name"  # how messages name this source: after the config field that sets it
DEFAULT_DB_SET = "custom"
ROLES = ("system", "user", "assistant")
REQUIRED_COLUMNS = ("prompt", "answer")


def is_local(path_or_hub_id: str) -> bool:
    """Whether ``path_or_hub_id`` names local files rather than a hub dataset.

    Local: it has ``{split}``, a data-file suffix (.json, .jsonl, .parquet, .csv), starts like a path
    (``/``, ``.``, ``~``), or an existing file, folder or glob match (in the working directory or the
    project root). Anything else (``"org/name"``) is a hub id.

    >>> is_local("rows_{split}.jsonl"), is_local("mine.csv"), is_local("./x"), is_local("trl-lib/tldr")
    (True, True, True, False)
    """
    if "{split}" in path_or_hub_id or Path(path_or_hub_id).suffix in CUSTOM_FORMATS:
        return True
    if path_or_hub_id.startswith(("/", ".", "~")):
        return True
    return bool(glob.glob(resolve_local_path(os.path.expanduser(path_or_hub_id))))


def to_messages(prompt: Any) -> list[dict[str, str]]:
    """A row's ``prompt`` as chat messages with a system message first; BadRow naming what is wrong.

    >>> to_messages("What is 2 + 2?")[1]
    {'role': 'user', 'content': 'What is 2 + 2?'}
    >>> [m["role"] for m in to_messages([{"role": "user", "content": "Hi"}])]
    ['system', 'user']
    >>> to_messages([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])[0]
    {'role': 'system', 'content': 'Be brief.'}
    """
    if prompt is None:
        raise BadRow("prompt missing (null)")
    if isinstance(prompt, str):
        if not prompt.strip():
            raise BadRow("prompt is an empty string")
        messages = [{"role": "user", "content": prompt}]
    elif isinstance(prompt, (list, tuple)):
        if not prompt:
            raise BadRow("prompt is an empty list of messages")
        messages = []
        for message in prompt:
            if not isinstance(message, dict) or "role" not in message or "content" not in message:
                raise BadRow("prompt: a message is not a {role, content} object")
            role, content = message["role"], message["content"]
            if role not in ROLES:
                raise BadRow(f"prompt: a message has a role other than {', '.join(ROLES)}")
            if not isinstance(content, str):
                raise BadRow("prompt: a message's content is not a string")
            messages.append({"role": role, "content": content})
        if messages[-1]["role"] != "user":
            raise BadRow("prompt: the last message is not from the user (the model answers it)")
        if not messages[-1]["content"].strip():
            raise BadRow("prompt: the last user message is empty")
    else:
        raise BadRow("prompt is neither a string nor a list of {role, content} messages")
    if messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": SYSTEM_PROMPT})
    return messages


def to_answer(answer: Any) -> str:
    """A row's ``answer`` as a non-empty string; numbers are written as strings. BadRow otherwise.

    >>> to_answer(" B "), to_answer(42), to_answer(2.5)
    ('B', '42', '2.5')
    """
    if answer is None:
        raise BadRow("answer missing (null)")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        raise BadRow("answer is not a string or a number")
    if isinstance(answer, float) and not math.isfinite(answer):
        raise BadRow("answer is not a finite number")
    text = str(answer).strip()
    if not text:
        raise BadRow("answer is empty")
    return text


def make_row(row: dict, default_db_set: str = DEFAULT_DB_SET) -> dict[str, Any]:
    """One raw row -> ``{prompt, answer, db_set}``; BadRow naming the column at fault."""
    db_set = row.get("db_set")
    if db_set is None:
        db_set = default_db_set
    elif not isinstance(db_set, str) or not db_set.strip():
        raise BadRow("db_set is not a non-empty string")
    return {
        "prompt": to_messages(row.get("prompt")),
        "answer": to_answer(row.get("answer")),
        "db_set": db_set.strip(),
    }


def _local_files(path: str, split: str) -> list[str]:
    if "{split}" not in path and split != "train":
        raise DataError(
            f"{SOURCE}: {path!r} has no '{{split}}' in it, so it holds the train split only and there is "
            f"no {split!r} split; name the files per split (e.g. rows_{{split}}.jsonl -> rows_train.jsonl, "
            f"rows_{split}.jsonl)"
        )
    return resolve_data_files(os.path.expanduser(path), split, source=SOURCE, formats=CUSTOM_FORMATS)


def load(
    split: str,
    path_or_hub_id: str,
    *,
    config_name: Optional[str] = None,
    db_set: str = DEFAULT_DB_SET,
) -> datasets.Dataset:
    """A user's dataset as ``{prompt, answer, db_set}`` rows (module docstring: columns and sources).

    split: the split to read ("train", "test", or any split of a hub dataset). config_name: the hub
    dataset's config (TRL's ``dataset_config``); must be None for local files. db_set: the ``db_set``
    of rows that have no ``db_set`` column or value.
    """
    if not isinstance(split, str) or not split:
        raise DataError(f"{SOURCE}: split={split!r}: must be a split name")
    if not isinstance(path_or_hub_id, str) or not path_or_hub_id.strip():
        raise DataError(f"{SOURCE}={path_or_hub_id!r}: must name local files or a hub dataset")
    if not db_set:
        raise DataError(f"{SOURCE}: db_set={db_set!r}: must not be empty")
    if is_local(path_or_hub_id):
        if config_name is not None:
            raise DataError(f"{SOURCE}: a dataset config ({config_name!r}) only applies to a hub dataset")
        files = _local_files(path_or_hub_id, split)
        raw = read_local_files(files, source=SOURCE, formats=CUSTOM_FORMATS)
        origin = ", ".join(files)
    else:
        raw = load_hub(
            SOURCE,
            path_or_hub_id,
            config_name,
            split,
            hint="no local file or folder of that name exists either",
        )
        origin = path_or_hub_id + (f" ({config_name})" if config_name else "") + f", split {split}"
    missing = [c for c in REQUIRED_COLUMNS if c not in raw.column_names]
    if missing:
        raise DataError(
            f"{SOURCE}: {origin}: no {' or '.join(repr(c) for c in missing)} column (its columns: "
            f"{', '.join(raw.column_names) or 'none'}); a dataset needs 'prompt' (a string or a list of "
            "{role, content} messages) and 'answer', and may have 'db_set'"
        )
    return collect_rows(raw, lambda row: make_row(row, db_set), source=SOURCE, origin=origin)


def split_by_db_set(dataset: datasets.Dataset) -> dict[str, datasets.Dataset]:
    """``{db_set: its rows}``, names sorted: the evaluation sets of a custom dataset, keyed like
    ``data.mixture.build_eval_datasets`` (each db_set is scored and reported on its own).

    Example: rows with db_set ["custom", "gsm8k", "custom"] -> {"custom": rows 0 and 2, "gsm8k": row 1}.
    """
    names = dataset["db_set"]
    return {
        name: dataset.select([i for i, value in enumerate(names) if value == name])
        for name in sorted(set(names))
    }
