"""Rebuild data/real/ (real PubMedQA and GSM8K rows, shipped with the project) from the upstream repositories.

    git clone https://github.com/pubmedqa/pubmedqa
    git clone https://github.com/openai/grade-school-math
    python scripts/build_real_data.py --pubmedqa pubmedqa --gsm8k grade-school-math [--output data/real]

What it writes, in the hub schemas the loaders read (``data.pubmedqa.load`` / ``data.gsm8k.load`` with
``data_files="data/real/<source>_{split}.jsonl"``), so that no network is needed to train or evaluate on them:

- ``pubmedqa_test.jsonl``: the 500 official test questions of PubMedQA's expert-labelled set (PQA-L, 1,000
  questions): the pubids of the authors' ``data/test_ground_truth.json``, which are also the list the loader
  guards with (``data/pubmedqa_test_pubids.json``; the build stops if the two differ).
- ``pubmedqa_train.jsonl``: the other 500 PQA-L questions (the authors' 10-fold train/dev pool), never a test one.
  Both in the ``qiaojin/PubMedQA`` ``pqa_labeled`` schema: ``pubid`` (int), ``question``, ``context`` {``contexts``,
  ``labels``, ``meshes``, ``reasoning_required_pred``, ``reasoning_free_pred``}, ``long_answer``,
  ``final_decision``. As on the hub, the two ``reasoning_*_pred`` labels are lists of characters
  (``["y", "e", "s"]``). The upstream ``YEAR`` field is not in the hub schema and is left out. Rows keep
  the upstream file's order.
- ``gsm8k_train.jsonl`` / ``gsm8k_test.jsonl``: the first ``--gsm8k_train_rows`` (500) rows of GSM8K's
  ``train.jsonl`` and the first ``--gsm8k_test_rows`` (200) of ``test.jsonl``, in the ``openai/gsm8k``
  ``main`` schema (``question``, ``answer`` = worked solution ending ``#### <number>``), unchanged.
- ``LICENSE.pubmedqa``, ``LICENSE.gsm8k``: the repositories' MIT licences, copied.
- ``MANIFEST.json``: the sha256 of every input and output file and the row counts (a test checks that the
  shipped files still match it).

Checks that stop the build (one line naming the file): an input missing, a test pubid absent from
``ori_pqal.json``, a ground-truth label that disagrees with ``final_decision``, a GSM8K test question also
among the chosen training rows.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "data" / "real"
LOADER_TEST_PUBIDS = ROOT / "data" / "pubmedqa_test_pubids.json"
# Where the files sit inside each upstream repository.
PUBMEDQA_FILES = {"rows": "data/ori_pqal.json", "test": "data/test_ground_truth.json", "license": "LICENSE"}
GSM8K_FILES = {
    "train": "grade_school_math/data/train.jsonl",
    "test": "grade_school_math/data/test.jsonl",
    "license": "LICENSE",
}
LABELS = ("yes", "no", "maybe")


class BuildError(ValueError):
    """An upstream file that is missing or does not say what this script expects; the message names it."""


# ---------------------------------------------------------------------------- PubMedQA


def pqal_to_hub_row(pubid: str, row: dict[str, Any]) -> dict[str, Any]:
    """One ``ori_pqal.json`` entry -> the ``qiaojin/PubMedQA`` ``pqa_labeled`` schema.

    >>> r = {"QUESTION": "Q?", "CONTEXTS": ["c1"], "LABELS": ["RESULTS"], "MESHES": ["Humans"], "YEAR": "2001",
    ...      "reasoning_required_pred": "yes", "reasoning_free_pred": "no", "final_decision": "yes",
    ...      "LONG_ANSWER": "Yes, it does."}
    >>> pqal_to_hub_row("123", r)["context"]["reasoning_free_pred"], pqal_to_hub_row("123", r)["pubid"]
    (['n', 'o'], 123)
    """
    return {
        "pubid": int(pubid),
        "question": row["QUESTION"],
        "context": {
            "contexts": list(row["CONTEXTS"]),
            "labels": list(row["LABELS"]),
            "meshes": list(row.get("MESHES") or []),
            "reasoning_required_pred": list(row["reasoning_required_pred"]),
            "reasoning_free_pred": list(row["reasoning_free_pred"]),
        },
        "long_answer": row["LONG_ANSWER"],
        "final_decision": row["final_decision"],
    }


def split_pubmedqa(
    rows: dict[str, dict], ground_truth: dict[str, str], loader_test_ids: Optional[set[int]] = None
) -> tuple[list[dict], list[dict]]:
    """(train rows, test rows) of PQA-L in the hub schema: test = the ground truth's pubids, train = the rest.

    Raises BuildError when a test pubid is not among the rows, a ground-truth label disagrees with the
    row's ``final_decision``, or (``loader_test_ids`` given) the test ids are not exactly the loader's list.
    """
    missing = sorted(set(ground_truth) - set(rows))
    if missing:
        raise BuildError(
            f"test_ground_truth.json: {len(missing)} pubid(s) not in ori_pqal.json, e.g. {missing[0]}"
        )
    for pubid, label in ground_truth.items():
        if rows[pubid]["final_decision"] != label:
            raise BuildError(
                f"test_ground_truth.json: pubid {pubid} is {label!r} but ori_pqal.json says "
                f"{rows[pubid]['final_decision']!r}"
            )
    if loader_test_ids is not None and {int(p) for p in ground_truth} != loader_test_ids:
        raise BuildError(
            f"test_ground_truth.json: its {len(ground_truth)} pubids differ from the loader's "
            f"{LOADER_TEST_PUBIDS.name} ({len(loader_test_ids)} ids)"
        )
    for pubid, row in rows.items():
        if row["final_decision"] not in LABELS:
            raise BuildError(f"ori_pqal.json: pubid {pubid}: final_decision {row['final_decision']!r}")
    train = [pqal_to_hub_row(p, r) for p, r in rows.items() if p not in ground_truth]
    test = [pqal_to_hub_row(p, r) for p, r in rows.items() if p in ground_truth]
    return train, test


# ---------------------------------------------------------------------------- GSM8K


def gsm8k_subset(
    train: list[dict], test: list[dict], n_train: int, n_test: int
) -> tuple[list[dict], list[dict]]:
    """The first ``n_train`` / ``n_test`` rows, ``question`` and ``answer`` only; BuildError if a chosen test
    question is also a chosen training question (GSM8K has none: the check guards a mis-pointed file)."""
    if n_train > len(train) or n_test > len(test):
        raise BuildError(f"gsm8k: asked for {n_train} / {n_test} rows of {len(train)} / {len(test)}")
    chosen_train = [{"question": r["question"], "answer": r["answer"]} for r in train[:n_train]]
    chosen_test = [{"question": r["question"], "answer": r["answer"]} for r in test[:n_test]]
    shared = {r["question"] for r in chosen_train} & {r["question"] for r in chosen_test}
    if shared:
        raise BuildError(f"gsm8k: {len(shared)} test question(s) also among the training rows")
    return chosen_train, chosen_test


# ---------------------------------------------------------------------------- files


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise BuildError(f"{path}: not found (is the argument the repository's folder?)")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        raise BuildError(f"{path}: not found (is the argument the repository's folder?)")
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row) + "\n")  # ASCII: no Unicode line break inside a row (str.splitlines)


def build(pubmedqa_repo: Path, gsm8k_repo: Path, output: Path, n_train: int, n_test: int) -> dict[str, Any]:
    """Write data/real/ (module docstring); returns the manifest."""
    inputs = {f"pubmedqa/{v}": pubmedqa_repo / v for v in PUBMEDQA_FILES.values()}
    inputs |= {f"grade-school-math/{v}": gsm8k_repo / v for v in GSM8K_FILES.values()}
    for path in inputs.values():
        if not path.is_file():
            raise BuildError(f"{path}: not found (is the argument the repository's folder?)")
    loader_ids = {int(p) for p in read_json(LOADER_TEST_PUBIDS)}
    pubmedqa_train, pubmedqa_test = split_pubmedqa(
        read_json(pubmedqa_repo / PUBMEDQA_FILES["rows"]),
        read_json(pubmedqa_repo / PUBMEDQA_FILES["test"]),
        loader_ids,
    )
    gsm8k_train, gsm8k_test = gsm8k_subset(
        read_jsonl(gsm8k_repo / GSM8K_FILES["train"]),
        read_jsonl(gsm8k_repo / GSM8K_FILES["test"]),
        n_train,
        n_test,
    )
    output.mkdir(parents=True, exist_ok=True)
    outputs = {
        "pubmedqa_train.jsonl": pubmedqa_train,
        "pubmedqa_test.jsonl": pubmedqa_test,
        "gsm8k_train.jsonl": gsm8k_train,
        "gsm8k_test.jsonl": gsm8k_test,
    }
    for name, rows in outputs.items():
        write_jsonl(output / name, rows)
    shutil.copyfile(pubmedqa_repo / PUBMEDQA_FILES["license"], output / "LICENSE.pubmedqa")
    shutil.copyfile(gsm8k_repo / GSM8K_FILES["license"], output / "LICENSE.gsm8k")
    manifest = {
        "command": "python scripts/build_real_data.py --pubmedqa PUBMEDQA_REPO --gsm8k GSM8K_REPO "
        f"--gsm8k_train_rows {n_train} --gsm8k_test_rows {n_test}",
        "inputs": {name: sha256(path) for name, path in inputs.items()},
        "outputs": {
            name: {"rows": len(rows), "sha256": sha256(output / name)} for name, rows in outputs.items()
        },
    }
    (output / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--pubmedqa", required=True, type=Path, help="a checkout of github.com/pubmedqa/pubmedqa"
    )
    parser.add_argument(
        "--gsm8k", required=True, type=Path, help="a checkout of github.com/openai/grade-school-math"
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="default: data/real")
    parser.add_argument("--gsm8k_train_rows", type=int, default=500)
    parser.add_argument("--gsm8k_test_rows", type=int, default=200)
    args = parser.parse_args(argv)
    try:
        manifest = build(args.pubmedqa, args.gsm8k, args.output, args.gsm8k_train_rows, args.gsm8k_test_rows)
    except BuildError as err:
        print(f"build_real_data.py: error: {err}", file=sys.stderr)
        return 1
    for name, entry in manifest["outputs"].items():
        print(f"{args.output / name}: {entry['rows']} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
