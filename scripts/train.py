"""Train a policy with GRPO.

    python scripts/train.py --config scripts/configs/tiny-cpu.yaml            # the embedded default
    accelerate launch scripts/train.py --config scripts/configs/qwen2.5-3b-medical.yaml
    python scripts/train.py --config FILE --learning_rate 1e-5 --resume_from_checkpoint latest

Every field of grpo/config.py can be set in the YAML file or as --field value (docs/CONFIG.md).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from grpo.config import load_config_or_exit  # noqa: E402


def main() -> None:
    cfg = load_config_or_exit()  # validated before anything heavy is imported
    from grpo.trainer import TrainingError, train

    try:
        train(cfg)
    except TrainingError as err:
        print(f"training stopped: {err}", file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
