"""No dead code in the library: every function, class and method defined at the top level of grpo/, models/,
data/, rewards/ and logprob_kernels/ is used somewhere else (the library, scripts/ or tests/).

"Used" means some Python file refers to the name (a call, an attribute, an import, or a string equal to it, as
registries and configs name functions), or a YAML/TOML file names it. Mentions in docs or comments do not
count: a function that only a document talks about is not a feature. A public name that the project's users
call but its own code does not goes in ALLOWED with the reason.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("grpo", "models", "data", "rewards", "logprob_kernels")
SKIP = {".venv", ".git", "outputs", "build", "__pycache__"}

# name -> why it stays although nothing in this repository uses it
ALLOWED: dict[str, str] = {}


def _files() -> list[Path]:
    return [
        p
        for p in ROOT.rglob("*")
        if p.is_file() and not SKIP & set(p.relative_to(ROOT).parts) and not p.name.startswith(".")
    ]


def definitions(tree: ast.Module) -> list[ast.AST]:
    """Top-level functions and classes of a module, and the methods of its classes."""
    found: list[ast.AST] = []
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            found.append(node)
        if isinstance(node, ast.ClassDef):
            found += [m for m in node.body if isinstance(m, (ast.FunctionDef, ast.AsyncFunctionDef))]
    return found


def used_names(tree: ast.AST) -> list[str]:
    """Every name a module refers to: names, attributes, imported names, identifier-like strings."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [alias.name.split(".")[-1] for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            # "module:function" specs and plain identifiers (registries, configs)
            names += re.findall(r"[A-Za-z_][A-Za-z0-9_]*", node.value) if len(node.value) < 200 else []
    return names


def unused_definitions(root: Path = ROOT) -> list[str]:
    used: dict[str, int] = {}
    defined: list[tuple[Path, ast.AST]] = []
    for path in _files():
        if path.suffix in (".yaml", ".yml", ".toml"):
            for word in re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path.read_text(errors="replace")):
                used[word] = used.get(word, 0) + 1
        if path.suffix != ".py":
            continue
        tree = ast.parse(path.read_text(errors="replace"))
        if path.relative_to(root).parts[0] in PACKAGES:
            defined += [(path, node) for node in definitions(tree)]
        for name in used_names(tree):
            used[name] = used.get(name, 0) + 1
    return [
        f"{path.relative_to(root)}:{node.lineno}: {node.name}"
        for path, node in defined
        if not node.name.startswith("__") and used.get(node.name, 0) == 0 and node.name not in ALLOWED
    ]


def test_every_library_function_is_used_somewhere():
    unused = unused_definitions()
    assert not unused, "defined and used nowhere (delete, use, or add to ALLOWED with a reason):\n" + "\n".join(
        unused
    )


def test_the_check_catches_a_function_nothing_calls():
    tree = ast.parse("def used():\n    pass\n\ndef orphan():\n    pass\n\nused()\n")
    names = set(used_names(tree))
    assert [n.name for n in definitions(tree) if n.name not in names] == ["orphan"]


def test_a_name_in_a_string_or_a_method_counts_as_used():
    tree = ast.parse(
        "class A:\n    def method(self):\n        pass\n\ndef by_name():\n    pass\n\n"
        "REGISTRY = ['my_module:by_name']\nA().method()\n"
    )
    names = set(used_names(tree))
    assert {n.name for n in definitions(tree)} <= names | {"A"}
    assert "by_name" in names and "method" in names


def test_allowed_names_give_a_reason_and_are_still_defined():
    defined = set()
    for path in _files():
        if path.suffix == ".py" and path.relative_to(ROOT).parts[0] in PACKAGES:
            defined |= {n.name for n in definitions(ast.parse(path.read_text()))}
    for name, reason in ALLOWED.items():
        assert reason.strip(), name
        assert name in defined, f"ALLOWED names {name}, which no longer exists: remove it"
