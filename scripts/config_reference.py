"""Write docs/CONFIG.md, the reference of every GRPOConfig field, from the dataclass itself.

python scripts/config_reference.py            # rewrite docs/CONFIG.md
python scripts/config_reference.py --check    # exit 1 if docs/CONFIG.md is out of date
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.config import GRPOConfig  # noqa: E402

TARGET = ROOT / "docs" / "CONFIG.md"


def _type_name(tp) -> str:
    text = str(tp).replace("typing.", "")
    return getattr(tp, "__name__", text) if typing.get_origin(tp) is None else text


def render() -> str:
    hints = typing.get_type_hints(GRPOConfig)
    lines = [
        "# Config reference",
        "",
        "Generated from `grpo/config.py` by `python scripts/config_reference.py`; do not edit by hand.",
        "Every field can be set in the YAML file given to `--config` and overridden on the command line",
        "as `--field value` (lists: `--field a b c`; booleans: `--field true|false`).",
        "",
        "| field | type | default | what it does |",
        "| --- | --- | --- | --- |",
    ]
    for f in dataclasses.fields(GRPOConfig):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f.metadata.get("help", "")
        if "choices" in f.metadata:
            help_text += " Choices: " + ", ".join(f"`{c}`" for c in f.metadata["choices"]) + "."
        lines.append(f"| `{f.name}` | {_type_name(hints[f.name])} | `{default!r}` | {help_text} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--check", action="store_true", help="fail if docs/CONFIG.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        if not TARGET.exists() or TARGET.read_text() != text:
            print(f"{TARGET} is out of date: run python scripts/config_reference.py", file=sys.stderr)
            return 1
        print(f"{TARGET} is up to date")
        return 0
    TARGET.parent.mkdir(parents=True, exist_ok=True)
    TARGET.write_text(text)
    print(f"wrote {TARGET}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
