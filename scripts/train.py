"""Train a policy with GRPO.

    python scripts/train.py --config scripts/configs/tiny-cpu.yaml            # the embedded default
    accelerate launch scripts/train.py --config scripts/configs/qwen2.5-3b-medical.yaml
    python scripts/train.py --config FILE --learning_rate 1e-5 --resume_from_checkpoint latest

Every field of grpo/config.py can be set in the YAML file or as --field value (docs/CONFIG.md).

A problem the user can fix (a bad config, data file, model path, checkpoint, output folder or reward
function; Ctrl-C) ends the run with one line on stderr that names it, and a non-zero exit status:
2 for a bad config or no arguments, 130 for Ctrl-C, 1 for the others. ``--debug`` (or the environment
variable GRPO_DEBUG=1) shows the full traceback instead. Any other exception is a bug: its traceback
is always shown.

A valid setting that is probably not what the user means (e.g. top_p < 1) prints one ``config warning:``
line on stderr (grpo/validation.py ``config_warnings``), once (on the main process), and the run goes on.
"""

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Optional

ROOT = str(Path(__file__).resolve().parents[1])
sys.path.insert(0, ROOT)  # runnable from a checkout without install
# A user's own module in the working folder (a reward function named "my_rewards:fn") imports, as with
# TRL; it goes after the project root so that a file there never hides one of the project's packages.
if os.path.abspath(os.getcwd()) != ROOT:
    sys.path.insert(1, os.getcwd())

from grpo.config import load_config  # noqa: E402  (light: validates before anything heavy is imported)
from grpo.validation import accelerate_dtype, config_warnings  # noqa: E402  (light, as grpo.config)

USAGE = "train.py --config FILE [--field value ...] [--debug]"
FIRST_RUN = "python scripts/train.py --config scripts/configs/tiny-cpu.yaml"
DESCRIPTION = """\
Fine-tune a language model with GRPO (Group Relative Policy Optimization, DeepSeekMath): for each
prompt of the training data (by default a mixture of PubMedQA, GSM8K and Health_Benchmarks) sample a
group of completions, score them with the reward functions, and update a LoRA adapter on a 4-bit base
towards the completions that beat their group's mean reward, with a KL penalty towards the base model.
The settings are read from a YAML file (--config) whose keys are the fields listed below, and any
--field value on the command line overrides the file. Checkpoints, metrics.jsonl and a plot go to
output_dir; --resume_from_checkpoint latest continues a stopped run. The same command runs on several
processes under `accelerate launch`."""
EPILOG = f"""\
examples:
  {FIRST_RUN}
  accelerate launch scripts/train.py --config scripts/configs/qwen2.5-3b-medical.yaml
  python scripts/train.py --config FILE --learning_rate 1e-5 --resume_from_checkpoint latest

An error you can fix is one line on stderr (exit status 2 for a bad config, 130 for Ctrl-C, else 1);
--debug or GRPO_DEBUG=1 shows its traceback."""

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's status for a bad command line
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports after Ctrl-C
DEBUG_FLAG = "--debug"
DEBUG_ENV = "GRPO_DEBUG"

# The project's own errors: (module, class, the words that start the line, exit status), subclasses
# before their base class. They are looked up in sys.modules, not imported here, so that a config
# error is reported before torch, transformers and datasets are imported: an error of a module that
# was never imported cannot have been raised.
EXPECTED_ERRORS = (
    ("grpo.validation", "AccelerateConfigError", "accelerate config error", EXIT_USAGE),  # a ConfigError
    ("grpo.config", "ConfigError", "config error", EXIT_USAGE),
    ("data.common", "DataError", "data error", EXIT_ERROR),
    ("models.policy", "ModelLoadError", "model error", EXIT_ERROR),
    ("models.policy", "AdapterError", "adapter error", EXIT_ERROR),
    ("grpo.run_folder", "OutputDirError", "output_dir error", EXIT_ERROR),
    ("grpo.run_folder", "CheckpointError", "checkpoint error", EXIT_ERROR),
    ("rewards.registry", "RewardFuncError", "reward function error", EXIT_ERROR),
    ("grpo.trainer", "TrainingError", "training stopped", EXIT_ERROR),
    ("models.samplers", "SamplerError", "sampler error", EXIT_ERROR),  # e.g. a vLLM server down, after a save
    ("grpo.trainer", "TrainingInterrupted", "interrupted", EXIT_INTERRUPTED),  # Ctrl-C/SIGTERM, after a save
)


def split_debug_flag(argv: list[str], environ: Optional[dict] = None) -> tuple[list[str], bool]:
    """``argv`` without ``--debug``, and whether tracebacks are wanted (the flag, or GRPO_DEBUG=1).

    >>> split_debug_flag(["--config", "a.yaml", "--debug"], {})
    (['--config', 'a.yaml'], True)
    >>> split_debug_flag(["--config", "a.yaml"], {"GRPO_DEBUG": "1"}), split_debug_flag([], {"GRPO_DEBUG": "0"})
    ((['--config', 'a.yaml'], True), ([], False))
    """
    environ = os.environ if environ is None else environ
    from_env = environ.get(DEBUG_ENV, "").strip().lower() in {"1", "true", "yes", "on"}
    return [a for a in argv if a != DEBUG_FLAG], DEBUG_FLAG in argv or from_env


def one_line(message: str) -> str:
    """A message on one line: its lines joined with spaces (a wrapped library message stays readable).

    >>> one_line("cannot read x.jsonl:\\n  line 3: not valid JSON\\n")
    'cannot read x.jsonl: line 3: not valid JSON'
    """
    return " ".join(line.strip() for line in message.splitlines() if line.strip())


def expected_error(err: BaseException) -> Optional[tuple[str, int]]:
    """(the line to print, the exit status) for one of the project's own errors or Ctrl-C; None for
    anything else (a bug, whose traceback must be seen)."""
    if isinstance(err, KeyboardInterrupt):  # before the trainer catches Ctrl-C, or a second Ctrl-C
        return "interrupted (Ctrl-C): stopped at once, without saving", EXIT_INTERRUPTED
    for module_name, class_name, label, status in EXPECTED_ERRORS:
        error_class = getattr(sys.modules.get(module_name), class_name, None)
        if error_class is not None and isinstance(err, error_class):
            return f"{label}: {one_line(str(err))}", status
    return None


# The global rank as launchers hand it over before any process group exists: torchrun and accelerate launch
# set RANK, MPI launchers (accelerate's multi-CPU) their own; none of them: a single process.
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK", "PMI_RANK")


def is_main_process(environ: Optional[dict] = None) -> bool:
    """Whether this process is the launch's first (rank 0), from the launcher's environment variables.

    >>> is_main_process({}), is_main_process({"RANK": "0"}), is_main_process({"PMI_RANK": "3"})
    (True, True, False)
    """
    environ = os.environ if environ is None else environ
    for name in RANK_VARIABLES:
        if environ.get(name, "").strip():
            return int(environ[name]) == 0
    return True


def print_config_warnings(config, environ: Optional[dict] = None) -> list[str]:
    """One ``config warning:`` line on stderr per note of ``config_warnings``, on the main process only
    (every process would print the same). Returns the lines printed."""
    if not is_main_process(environ):
        return []
    lines = [f"config warning: {note}" for note in config_warnings(config)]
    for line in lines:
        print(line, file=sys.stderr)
    return lines


def print_help() -> None:
    """The description, this script's options, then every GRPOConfig field with its help and default."""
    from transformers import HfArgumentParser

    from grpo.config import GRPOConfig

    class ConfigFields(GRPOConfig):  # only to list the fields under a heading of their own
        _argument_group_name = "fields of grpo/config.py (keys of the --config YAML, or --field value)"

    class Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
        pass

    parser = HfArgumentParser(
        ConfigFields,
        prog="train.py",
        usage=USAGE,
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=Formatter,
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        default=argparse.SUPPRESS,
        help="a YAML file of field: value pairs (scripts/configs/); command-line values override it",
    )
    parser.add_argument(
        DEBUG_FLAG,
        action="store_true",
        default=argparse.SUPPRESS,
        help=f"show the traceback of an error instead of one line (also {DEBUG_ENV}=1)",
    )
    parser.print_help()


def quiet_library_output() -> None:
    """Keep stderr for the trainer's own lines: no progress bar for every datasets map/filter or for
    transformers' weight loading, and no bitsandbytes warning that an optional CPU kernel package is
    missing (it falls back to its own kernel)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()


def main(argv: Optional[list[str]] = None) -> int:
    """Parse, validate, train; returns the exit status (module docstring: which errors give which)."""
    argv, debug = split_debug_flag(list(sys.argv[1:] if argv is None else argv))
    if not argv:  # the defaults would download Qwen2.5-3B and the datasets: say how to start instead
        print(
            f"train.py: no arguments; usage: {USAGE}; the first run (tiny model, bundled data, CPU): "
            f"{FIRST_RUN}; every field: train.py --help",
            file=sys.stderr,
        )
        return EXIT_USAGE
    if "-h" in argv or "--help" in argv:
        print_help()
        return 0
    try:
        config = load_config(argv)  # validated before anything heavy is imported
        # accelerate launch's settings, refused here in a second rather than after torch's import (setup checks
        # again, for callers that skip this script)
        accelerate_dtype(config.dtype)
        print_config_warnings(config)
        quiet_library_output()
        from grpo.trainer import train

        train(config)
    except (Exception, KeyboardInterrupt) as err:
        reported = None if debug else expected_error(err)
        if reported is None:
            raise
        line, status = reported
        print(line, file=sys.stderr)
        return status
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
