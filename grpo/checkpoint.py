"""Checkpoints that a kill can never break, and an exact resume.

``output_dir/checkpoint-<step>/`` holds:

    adapter_model.safetensors, adapter_config.json   the PEFT adapter (PeftModel.from_pretrained reads it)
    optimizer.pt, scheduler.pt                        optimiser and learning-rate schedule state
    rng_state_<rank>.pt                               python / torch RNG state of every process
    trainer_state.json                                step, data position, counters, the config

Everything is written into ``checkpoint-<step>.tmp/`` first and then renamed in one ``os.replace``:
a process killed (even with SIGKILL) in the middle of a save leaves only a ``.tmp`` folder, which
``latest_checkpoint`` ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from models.policy import load_adapter, save_adapter

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (``.tmp`` folders are incomplete: skipped)."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found) if (p / TRAINER_STATE).is_file()]


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``checkpoint-<step>.tmp`` folders a killed save left behind; return what was removed."""
    root = Path(output_dir)
    stale = sorted(root.glob("checkpoint-*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def resolve_checkpoint(spec: str, output_dir: str | os.PathLike) -> Path:
    """``'latest'`` -> the newest complete checkpoint in output_dir; else the folder ``spec`` itself."""
    if spec == "latest":
        found = checkpoint_dirs(output_dir)
        if not found:
            raise FileNotFoundError(f"resume_from_checkpoint='latest': no checkpoint-<step>/ in {output_dir}")
        return found[-1]
    path = Path(spec)
    if not (path / TRAINER_STATE).is_file():
        raise FileNotFoundError(
            f"resume_from_checkpoint={spec!r}: not a checkpoint folder (no {TRAINER_STATE})"
        )
    return path


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    accelerator,
) -> Path:
    """Write checkpoint-<step>/ atomically (all processes call this; rank 0 writes the shared parts).

    trainer_state must be JSON-serialisable (step, data position, counters, config dict).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter(accelerator.unwrap_model(model), str(tmp))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / f"rng_state_{accelerator.process_index}.pt")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # trainer_state.json is written last: its presence marks a complete folder
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    """Restore adapter, optimiser, schedule and this process's RNG; return the saved trainer_state."""
    path = Path(path)
    load_adapter(accelerator.unwrap_model(model), str(path))  # in place: the optimiser stays valid
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng_state_{accelerator.process_index}.pt"
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / TRAINER_STATE).read_text())
