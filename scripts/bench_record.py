"""A benchmark's JSON record, rewritten after every measurement.

A benchmark killed by its time limit (scripts/gpu_checks.sh gives each one) then leaves every figure it had
measured so far, and only the one in flight is lost. Each write goes to a temporary file renamed over the
record, so a kill in the middle of a write leaves the previous record whole, never half a file.

The bench scripts import it as ``bench_record``: Python puts a script's own folder first on ``sys.path``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def save_json(path: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write ``record`` to ``path`` as indented JSON in one rename; returns the path.

    >>> import tempfile; folder = tempfile.mkdtemp()
    >>> save_json(f"{folder}/a/b.json", {"rows": [1]}).read_text()
    '{\\n  "rows": [\\n    1\\n  ]\\n}\\n'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(partial, path)  # atomic on one filesystem: readers see the old record or the new one
    return path
