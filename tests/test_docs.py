"""docs/TRAINING.md's walk through one step names files and the functions a reader opens in them, in order.
Each name must be defined in the file named (a function, a class or a method), so the walk cannot go stale."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEP_SECTION = "## One GRPO step, file by file"


def step_path(markdown: str) -> list[tuple[str, list[str]]]:
    """The numbered items of the step section: (the item's first file, the plain names that follow it).

    >>> step_path(STEP_SECTION + "\\n\\n1. `a/b.py` `f`, `g`: text `h.i`\\n2. `c.py` `k`\\n\\n## next")
    [('a/b.py', ['f', 'g']), ('c.py', ['k'])]
    """
    section = markdown.split(STEP_SECTION, 1)[1].split("\n## ", 1)[0]
    items = re.split(r"\n(?=\d+\. )", section)
    found = []
    for item in items:
        if not re.match(r"\d+\. ", item.strip()):
            continue
        quoted = re.findall(r"`([^`]+)`", item.split(":", 1)[0] if "`:" in item else item)
        path, names = quoted[0], [q for q in quoted[1:] if q.isidentifier()]
        found.append((path, names))
    return found


def defined_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names |= {m.name for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return names


def test_every_function_on_the_step_path_is_in_the_file_named():
    path = step_path((ROOT / "docs" / "TRAINING.md").read_text())
    assert len(path) >= 6, path
    for file, names in path:
        assert (ROOT / file).is_file(), f"docs/TRAINING.md names {file}, which does not exist"
        missing = set(names) - defined_names(ROOT / file)
        assert not missing, f"docs/TRAINING.md says {file} defines {sorted(missing)}; it does not"


def test_the_count_of_files_the_docs_give_is_the_count_of_items():
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    section = text.split(STEP_SECTION, 1)[1].split("\n## ", 1)[0]
    words = {"six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10}
    (count,) = re.findall(r"\((\w+) files", section)
    assert words[count] == len(step_path(text))


def test_the_parser_reads_a_walk_and_a_missing_name_fails(tmp_path):
    (tmp_path / "m.py").write_text("def f():\n    pass\n\nclass C:\n    def g(self):\n        pass\n")
    assert defined_names(tmp_path / "m.py") == {"f", "C", "g"}
    walk = step_path(f"{STEP_SECTION}\n\n1. `m.py` `f`, `g`, `gone`: prose\n")
    assert walk == [("m.py", ["f", "g", "gone"])]
    assert set(walk[0][1]) - defined_names(tmp_path / "m.py") == {"gone"}
