"""Write the folder a vLLM server starts from in server mode: the trainer's own base, dequantised.

    python scripts/export_base.py --output /data/grpo-base --config scripts/configs/qwen2.5-3b-medical.yaml
    python scripts/export_base.py --output /tmp/tiny-base --config scripts/configs/tiny-cpu.yaml --lora_r 8

The base is loaded exactly as the trainer loads it (the same config: model, 4-bit NF4 settings, dtype), its
4-bit weights are dequantised (``models/export.py``: the numbers the trainer's 4-bit matmuls multiply by) and
written with the tokenizer, chat template and config as a plain HF folder, without the LoRA adapter (the
trainer hands the server its adapter after each optimiser step). Then it prints the command that starts the
server on that folder. Give the same config (and the same ``--dtype``) to ``scripts/train.py`` with
``--vllm_mode server``: the trainer checks at start that the server serves this base (docs/SAMPLING.md,
"Server mode").

``--device`` (default: cuda when there is one, else cpu): where the base is quantised, as the trainer does
on its own device. A bad config or model is one line on stderr and exit status 2 or 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Optional

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)  # runnable from a checkout without install

from grpo.config import ConfigError, load_config  # noqa: E402  (light: no torch yet)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(this script's own options, the rest: the training config's ``--config FILE --field value`` pairs)."""
    parser = argparse.ArgumentParser(
        prog="export_base.py",
        description="Write the trainer's base (4-bit NF4 dequantised, no adapter) for a vLLM server.",
        epilog="Every other --field value (and --config FILE) is the training config, as for train.py.",
    )
    parser.add_argument("--output", required=True, help="the folder to write (new or empty)")
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when there is one)")
    return parser.parse_known_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args, config_args = parse_args(list(sys.argv[1:] if argv is None else argv))
    try:
        config = load_config(config_args)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    import torch

    from models.export import ExportError, export_base_for_sampler
    from models.policy import ModelLoadError, load_policy, resolve_dtype, resolve_model_path
    from models.server_sampler import server_command

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    try:
        model_path = resolve_model_path(config.model_name_or_path)
        model, _ = load_policy(config, device=device, path=model_path)
        dtype = resolve_dtype(config.dtype, device)
        folder = export_base_for_sampler(model, args.output, dtype, model_path)
    except (ModelLoadError, ExportError) as err:
        print(f"export error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {folder} ({config.model_name_or_path}, {dtype}) in {time.perf_counter() - started:.1f} s")
    command = server_command(folder, config, cpu=device == "cpu")
    print("start the server with:\n  " + " ".join(command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
