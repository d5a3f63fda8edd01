"""The cold start (DeepSeek-R1's): a short supervised pass on real training rows in the recipe's format, before GRPO.

    python scripts/cold_start.py --config scripts/configs/smollm2-cpu.yaml
    python scripts/cold_start.py --config FILE --base smollm2-135m-instruct --output outputs/my-cold-start --steps 40

Trains a LoRA on ``--base`` (full precision) on PubMedQA and GSM8K training rows written as
``<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n`` (models/cold_start.py says which text goes
where), merges it, and saves a plain model folder at ``--output``: by default the config's
``model_name_or_path``, so that ``scripts/train.py --config`` the same file starts GRPO from it. Never a test row
(the loaders' test guards, then a check of every prompt against the test split; an error stops the run).

Options of this script (any field of grpo/config.py may follow as ``--field value``: the data files,
max_prompt_length, lora_target_modules come from the config):
  --base NAME_OR_PATH      the model to cold-start (default smollm2-135m-instruct)
  --output DIR             where the merged model goes (default: the config's model_name_or_path)
  --steps, --batch_size, --learning_rate, --lora_r, --lora_alpha, --seed, --pubmedqa_share
                           the supervised pass (defaults: models.cold_start.ColdStartSettings)
  --overwrite              replace an existing output folder made with other settings

Run twice with the same settings, the second run sees ``cold_start.json`` in the folder and does nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from grpo.config import ConfigError, load_config  # noqa: E402

DEFAULT_BASE = "smollm2-135m-instruct"
RECORD = "cold_start.json"


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    from models.cold_start import ColdStartSettings

    defaults = ColdStartSettings()
    parser = argparse.ArgumentParser(
        prog="cold_start.py",
        description="Supervised cold start on real non-test rows in the recipe's format; writes a merged model "
        "folder that GRPO starts from. Any field of grpo/config.py may follow as --field value.",
        allow_abbrev=False,
    )
    parser.add_argument("--config", help="the training YAML (data files, max_prompt_length, LoRA targets)")
    parser.add_argument("--base", default=DEFAULT_BASE, help=f"model to cold-start (default {DEFAULT_BASE})")
    parser.add_argument("--output", help="the merged model folder (default: the config's model_name_or_path)")
    for field in dataclasses.fields(ColdStartSettings):
        parser.add_argument(f"--{field.name}", type=type(getattr(defaults, field.name)), default=None)
    parser.add_argument("--overwrite", action="store_true", help="replace an output folder of other settings")
    return parser.parse_known_args(argv)


def settings_of(args: argparse.Namespace):
    from models.cold_start import ColdStartSettings

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ColdStartSettings)}
    return ColdStartSettings(**{k: v for k, v in given.items() if v is not None})


def plan(args: argparse.Namespace, config: Any) -> dict[str, Any]:
    """What the run would record (without its losses): compared with an existing folder's cold_start.json."""
    from models.cold_start import SOURCES

    return {
        "base": args.base,
        "settings": dataclasses.asdict(settings_of(args)),
        "data_files": {source: getattr(config, f"{source}_data_files") for source in SOURCES},
        "max_prompt_length": config.max_prompt_length,
    }


def already_done(output: Path, wanted: dict[str, Any]) -> Optional[bool]:
    """None: no folder (or an empty one); True: made with these settings; False: something else is there."""
    if not output.exists() or (output.is_dir() and not any(output.iterdir())):
        return None
    record = output / RECORD
    if not record.is_file():
        return False
    saved = json.loads(record.read_text())
    return all(saved.get(key) == value for key, value in wanted.items())


def main(argv: Optional[list[str]] = None) -> int:
    from data.common import DataError
    from models.cold_start import ColdStartError, run_cold_start
    from models.policy import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    args, rest = parse_args(argv)
    try:
        config = load_config((["--config", args.config] if args.config else []) + rest)
        output = Path(args.output or config.model_name_or_path)
        wanted = plan(args, config)
        state = already_done(output, wanted)
        if state and not args.overwrite:
            print(f"cold start: {output} was made with these settings ({RECORD}); nothing to do")
            return 0
        if state is False and not args.overwrite:
            raise ColdStartError(
                f"--output {output}: the folder holds something else (no {RECORD} of these settings); "
                "pass --overwrite to replace it"
            )
        settings = settings_of(args)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
        try:
            done = run_cold_start(config, args.base, str(tmp), settings, log=lambda m: print(m, flush=True))
            (tmp / RECORD).write_text(json.dumps({**wanted, **done}, indent=1) + "\n")
            if output.exists():
                shutil.rmtree(output)
            os.rename(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except (ConfigError, ColdStartError, DataError, ModelLoadError) as err:
        print(f"cold_start.py: error: {err}", file=sys.stderr)
        return 2
    losses = done["losses"]
    print(
        f"cold start: {output} ({done['rows']} rows; loss {losses[0]:.3f} -> {losses[-1]:.3f} over "
        f"{len(losses)} steps)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
