"""The layout a reader can walk: imports run one way, scripts -> grpo -> models -> data / rewards -> logprob_kernels.

Every ``import`` of a project package in a module (at the top, inside a function, or under TYPE_CHECKING)
must point to a lower layer or to the module's own package. A leaf never imports its caller.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Higher may import lower (and itself); never the other way. data and rewards are siblings that import
# neither each other nor anything above them.
LAYERS = {"scripts": 4, "grpo": 3, "models": 2, "data": 1, "rewards": 1, "logprob_kernels": 0}
PACKAGES = [name for name in LAYERS if name != "scripts"]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """(line, top-level project package) of every import statement in a Python file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found += [(node.lineno, name.split(".")[0]) for name in names if name.split(".")[0] in LAYERS]
    return found


def upward_imports(root: Path) -> list[str]:
    """Every import in root's packages and scripts that points up (or sideways between siblings)."""
    problems = []
    for layer, rank in LAYERS.items():
        for path in sorted((root / layer).rglob("*.py")):
            for line, target in project_imports(path):
                if target != layer and LAYERS[target] >= rank:
                    problems.append(f"{path.relative_to(root)}:{line}: {layer} imports {target}")
    return problems


def test_imports_run_one_way():
    assert upward_imports(ROOT) == []


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages == set(PACKAGES), "a new top-level package needs a place in LAYERS"


def test_the_check_finds_upward_and_sideways_imports_and_allows_downward_ones(tmp_path):
    for package, source in {
        "logprob_kernels": "def f():\n    from grpo.loss import policy_loss\n",  # up, inside a function
        "models": "import data.gsm8k\nimport rewards\nfrom logprob_kernels import token_logprobs\n",  # down
        "data": "from rewards.answer import FULL_CREDIT\n",  # sideways between siblings
    }.items():
        (tmp_path / package).mkdir()
        (tmp_path / package / "module.py").write_text(source)
    assert upward_imports(tmp_path) == [
        "data/module.py:1: data imports rewards",
        "logprob_kernels/module.py:2: logprob_kernels imports grpo",
    ]
