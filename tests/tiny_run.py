"""The settings the end-to-end tests share: the tiny offline model on the bundled fixtures, small enough that
a training step takes a second or two on 2 CPU cores. Each test file adds what its own runs need. Also the
helpers several test files share: ``randomise_adapter``, ``copy_run_until``."""

from __future__ import annotations

import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures"

DATA = [
    "--gsm8k_data_files", str(FIXTURES / "gsm8k_{split}.jsonl"),
    "--pubmedqa_data_files", str(FIXTURES / "pubmedqa_{split}.jsonl"),
    "--health_benchmarks_data_files", str(FIXTURES / "health_benchmarks_*.jsonl"),
]  # fmt: skip

# tiny-qwen2-instruct (or another tiny model), fp32, HF sampler, LoRA r 8, groups of 4, short completions
SMALL = [
    *DATA, "--dtype", "fp32", "--sampler", "hf", "--lora_r", "8", "--lora_alpha", "16",
    "--num_generations", "4", "--max_prompt_length", "256",
]  # fmt: skip


def tiny(model: str = "tiny-qwen2-instruct") -> list[str]:
    """SMALL on ``model``: the common start of every end-to-end run of the tests."""
    return ["--model_name_or_path", model, *SMALL]


def randomise_adapter(model, scale: float, seed: int = 0) -> None:
    """PEFT starts every LoRA B at zero (the adapter is a no-op): give each one N(0, scale^2) entries drawn
    from ``seed``, so that adapter on != adapter off and the LoRA path is part of what a test compares."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * scale)


def copy_run_until(src: Path, dst: Path, step: int) -> None:
    """The run folder ``dst`` as a kill right after ``src``'s checkpoint-<step> would have left it: that
    checkpoint, and metrics.jsonl with the steps up to it plus the next step's line and half a line (the killed
    run had logged them; a resume must drop both)."""
    shutil.copytree(src / f"checkpoint-{step}", dst / f"checkpoint-{step}")
    lines = (src / "metrics.jsonl").read_text().splitlines()
    (dst / "metrics.jsonl").write_text("\n".join(lines[: step + 1]) + '\n{"step": 9, "lo')
