"""Run by tests/test_trainer.py under `accelerate launch --cpu --num_processes 2`: train, then record
a hash of this rank's adapter so the test can check that every rank ends with the same weights."""

import hashlib
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grpo.config import load_config_or_exit  # noqa: E402
from grpo.trainer import fit, setup  # noqa: E402


def main() -> None:
    run = setup(load_config_or_exit())
    fit(run)
    _record(run)


def _record(run) -> None:
    import torch

    digest = hashlib.sha256()
    for name, p in sorted(run.accelerator.unwrap_model(run.model).named_parameters()):
        if p.requires_grad:
            digest.update(name.encode())
            digest.update(p.detach().cpu().to(torch.float32).numpy().tobytes())
    out = Path(run.config.output_dir) / f"adapter_rank{run.accelerator.process_index}.json"
    out.write_text(json.dumps({"sha256": digest.hexdigest(), "data_position": run.state.data_position}))


if __name__ == "__main__":
    main()
