"""Evaluate a model, or a trained LoRA adapter against its base: accuracy per source, as a table and JSON.

    python scripts/evaluate.py --adapter outputs/qwen2.5-3b-medical/checkpoint-750
    python scripts/evaluate.py --config scripts/configs/tiny-cpu.yaml --compare base outputs/tiny-cpu/checkpoint-250
    python scripts/evaluate.py --model Qwen/Qwen2.5-3B-Instruct --sources medqa medmcqa mmlu_medical --samples 4

Options of this script:
  --model NAME_OR_PATH   base model (default: the --config's model_name_or_path, else the adapter's base)
  --adapter PATH         a saved LoRA adapter (checkpoint-<step> folder); without it the base is evaluated
  --compare A B          evaluate A and B (each an adapter folder or the word ``base``) and print B - A
  --sources S [S ...]    gsm8k pubmedqa health_benchmarks medqa medmcqa mmlu_medical (default: the first three)
  --limit N              at most N prompts per source, spread evenly over it
  --samples K            completions per prompt (default 1); pass@k is reported for k = 1, 2, 4, ..., K
  --temperature T        default 0 (greedy) for K = 1, else the config's temperature
  --seed S, --batch_size B (prompts per generate call)
  --output FILE          the JSON report (default: beside the adapter, <adapter>/evaluation.json; with
                         --compare in the adapter side's folder, evaluation_vs_<other side>.json; for the
                         base model alone outputs/evaluation_<model>.json)
  --medqa_data_files, --medmcqa_data_files, --mmlu_medical_data_files FILES   local files instead of the hub
Any field of grpo/config.py may follow as ``--field value``, as for train.py: --config FILE (a training
YAML: model, 4-bit, data files, sampler...), --sampler hf, --max_completion_length 512,
--max_prompt_length 2048, --load_in_4bit false, --gsm8k_data_files FILES, ...

The markdown table goes to stdout, progress and warnings to stderr, everything (metrics, settings,
every completion) to the JSON file. docs/EVALUATION.md defines the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install

from data.eval_sets import SOURCES, TRAINING_SOURCES  # noqa: E402
from grpo.config import ConfigError, load_config  # noqa: E402
from grpo.evaluation import EvaluationError  # noqa: E402
from models.policy import AdapterError, read_adapter_config  # noqa: E402

BASE = "base"
DEFAULT_SOURCES = TRAINING_SOURCES
EXTRA_DATA_FLAGS = {name: f"{name}_data_files" for name in SOURCES if name not in TRAINING_SOURCES}


def parse_args(argv: Optional[list[str]]) -> tuple[argparse.Namespace, list[str]]:
    """This script's own options; everything else is left for the GRPOConfig parser."""
    parser = argparse.ArgumentParser(
        prog="evaluate.py",
        description=(
            "Accuracy per source of a model, or of a trained LoRA adapter against its base: a markdown "
            "table on stdout and a JSON report (docs/EVALUATION.md). Any field of grpo/config.py may "
            "follow as --field value (e.g. --sampler hf, --max_completion_length 512)."
        ),
        allow_abbrev=False,  # --sample must not silently mean --samples, nor swallow a config field
    )
    parser.add_argument(
        "--model",
        help="base model: hub id, local folder or tiny-random-qwen2 (default: the --config's "
        "model_name_or_path, else the adapter's base)",
    )
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--adapter", help="a saved LoRA adapter folder (default: evaluate the base model)")
    which.add_argument(
        "--compare", nargs=2, metavar=("A", "B"), help="two adapter folders or 'base'; prints B - A"
    )
    parser.add_argument(
        "--sources",
        nargs="+",
        default=list(DEFAULT_SOURCES),
        metavar="SOURCE",
        help=f"sources to score, any of: {', '.join(SOURCES)} (default: {' '.join(DEFAULT_SOURCES)})",
    )
    parser.add_argument("--limit", type=int, help="at most this many prompts per source (default: all)")
    parser.add_argument("--samples", type=int, default=1, help="K completions per prompt (default: 1)")
    parser.add_argument(
        "--temperature", type=float, help="0 = greedy (default: 0 for K = 1, else the config's temperature)"
    )
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    parser.add_argument("--batch_size", type=int, default=32, help="prompts per generate call (default: 32)")
    parser.add_argument(
        "--output",
        help="the JSON report (default: <adapter>/evaluation.json; with --compare, "
        "evaluation_vs_<other side>.json in the adapter side's folder; the base model alone: "
        "outputs/evaluation_<model>.json)",
    )
    parser.add_argument("--config", help="a training YAML (its model, data files and sampler are used)")
    for name, flag in EXTRA_DATA_FLAGS.items():
        parser.add_argument(f"--{flag}", help=f"local files in the {SOURCES[name][2]} schema")
    return parser.parse_known_args(argv)


def check_args(args: argparse.Namespace) -> None:
    """Fail before anything heavy is loaded, naming the flag."""
    unknown = [s for s in args.sources if s not in SOURCES]
    if unknown:
        raise EvaluationError(
            f"--sources: unknown source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}"
        )
    if len(set(args.sources)) != len(args.sources):
        raise EvaluationError(f"--sources: a source is named twice: {' '.join(args.sources)}")
    if args.samples < 1:
        raise EvaluationError(f"--samples {args.samples}: must be >= 1")
    if args.limit is not None and args.limit < 1:
        raise EvaluationError(f"--limit {args.limit}: must be >= 1")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch_size {args.batch_size}: must be >= 1")
    if args.temperature is not None and args.temperature < 0:
        raise EvaluationError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    if args.compare:
        for side in args.compare:
            if side != BASE:
                read_adapter_config(side, flag="--compare")
        if args.compare[0] == args.compare[1]:
            raise EvaluationError(
                f"--compare {args.compare[0]} {args.compare[1]}: the two sides are the same"
            )
    elif args.adapter:
        read_adapter_config(args.adapter)
    if args.output is not None:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise EvaluationError(f"--output {args.output!r}: folder {out_dir} does not exist")


def default_output_path(adapter: Optional[str], compare: Optional[list[str]], model: str) -> Path:
    """Where the JSON report goes without --output: beside what was evaluated, never the working folder.

    >>> str(default_output_path("runs/a/checkpoint-250", None, "Qwen/Qwen2.5-3B-Instruct"))
    'runs/a/checkpoint-250/evaluation.json'
    >>> str(default_output_path(None, ["base", "runs/a/checkpoint-250"], "m"))
    'runs/a/checkpoint-250/evaluation_vs_base.json'
    >>> str(default_output_path(None, ["runs/a/checkpoint-100", "runs/a/checkpoint-250/"], "m"))
    'runs/a/checkpoint-250/evaluation_vs_checkpoint-100.json'
    >>> str(default_output_path(None, None, "Qwen/Qwen2.5-3B-Instruct"))
    'outputs/evaluation_Qwen2.5-3B-Instruct.json'
    """
    if adapter:
        return Path(adapter) / "evaluation.json"
    if compare:
        a, b = compare
        folder, other = (b, a) if b != BASE else (a, b)
        if folder != BASE:
            label = BASE if other == BASE else Path(other).name
            return Path(folder) / f"evaluation_vs_{label}.json"
    return Path("outputs") / f"evaluation_{Path(model.rstrip('/')).name or 'model'}.json"


def build_config(args: argparse.Namespace, rest: list[str]):
    """The GRPOConfig: the --config YAML, then ``--field value`` overrides, then the model to evaluate."""
    argv = (["--config", args.config] if args.config else []) + rest
    config = load_config(argv)
    model = args.model
    if model is None and not args.config:
        # no model named: the base the (first) adapter was trained on, if its config says
        adapters = [a for a in (args.compare or [args.adapter]) if a and a != BASE]
        if adapters:
            model = read_adapter_config(adapters[0]).get("base_model_name_or_path") or None
    if model is not None:
        config = load_config(argv + ["--model_name_or_path", model])
    return config


def load_sets(
    args: argparse.Namespace, config: Any, tokenizer: Any
) -> tuple[dict[str, list], dict[str, int]]:
    """``{source: rows}`` for --sources: prompts longer than max_prompt_length dropped, then --limit."""
    from data.eval_sets import evenly_spaced, load_eval_set
    from data.prompts import filter_long_prompts

    sets, dropped = {}, {}
    for name in args.sources:
        dataset = load_eval_set(name, config, data_files_of(name, args, config))
        dataset, dropped[name] = filter_long_prompts(dataset, tokenizer, config.max_prompt_length)
        if dropped[name]:
            say(
                f"warning: {name}: left out {dropped[name]} prompt(s) longer than max_prompt_length="
                f"{config.max_prompt_length} tokens (raise it with --max_prompt_length)"
            )
        if len(dataset) == 0:
            raise EvaluationError(
                f"{name}: every prompt is longer than --max_prompt_length {config.max_prompt_length}"
            )
        dataset = dataset.select(evenly_spaced(len(dataset), args.limit))
        sets[name] = dataset.to_list()
    return sets, dropped


def data_files_of(name: str, args: argparse.Namespace, config: Any) -> Optional[str]:
    """The local files of a source: its --<name>_data_files flag (a config field for the training
    sources), or None for the hub."""
    if name in EXTRA_DATA_FLAGS:
        return getattr(args, EXTRA_DATA_FLAGS[name])
    return getattr(config, f"{name}_data_files")


def describe_data(name: str, args: argparse.Namespace, config: Any) -> str:
    """Where a source's rows came from, for the JSON: the hub id and split, and the local files if any."""
    files = data_files_of(name, args, config)
    _, split, hub = SOURCES[name]
    return f"{hub}, split {split}" + (f", from local files {files}" if files else "")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace, rest: list[str], argv: list[str]) -> dict[str, Any]:
    """Load, generate, score; returns the JSON document (and prints the tables)."""
    from dataclasses import replace

    from grpo.evaluation import evaluate
    from grpo.report import compare_reports, format_comparison, format_table
    from models.policy import load_for_evaluation, load_tokenizer, resolve_dtype, resolve_model_path
    from models.samplers import SamplingSettings, make_sampler

    config = build_config(args, rest)
    say(f"model: {config.model_name_or_path}")
    model_path = resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(model_path, config.trust_remote_code)
    sets, dropped = load_sets(args, config, tokenizer)

    temperature = (
        args.temperature
        if args.temperature is not None
        else (0.0 if args.samples == 1 else config.temperature)
    )
    settings = SamplingSettings(
        temperature=temperature,
        top_p=config.top_p,
        top_k=config.top_k,
        max_completion_length=config.max_completion_length,
    )
    sides = args.compare or [args.adapter or BASE]
    # vLLM sizes its LoRA slots once: room for the largest adapter of the two sides. The base's zero
    # LoRA takes that rank too (any rank adds exactly 0); an adapter's own rank comes from its folder.
    ranks = [int(read_adapter_config(s)["r"]) for s in sides if s != BASE] or [config.lora_r]
    config = replace(config, lora_r=max(ranks))

    reports: dict[str, dict[str, Any]] = {}
    sampler = None
    for side in sides:
        say(f"evaluating {side}")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the tables
            model, _ = load_for_evaluation(config, None if side == BASE else side, path=model_path)
            if sampler is None:
                sampler = make_sampler(config, model, tokenizer, model_path, resolve_dtype(config.dtype))
            else:
                sampler.update_policy(model)
        reports[side] = evaluate(
            sampler,
            sets,
            args.samples,
            args.seed,
            settings,
            args.batch_size,
            progress=lambda m: say(f"  {m}"),
        )
        reports[side].update(adapter=None if side == BASE else side, dropped_long_prompts=dropped)
        del model
        gc.collect()
    sampler.close()

    meta = {
        "command": "python scripts/evaluate.py " + shlex.join(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": config.model_name_or_path,
        "config": args.config,
        "limit": args.limit,
        "data": {name: describe_data(name, args, config) for name in sets},
    }
    if args.compare:
        a, b = (reports[s] for s in args.compare)
        print(f"## A: {args.compare[0]}\n\n{format_table(a)}\n")
        print(f"## B: {args.compare[1]}\n\n{format_table(b)}\n")
        print(f"## B - A\n\n{format_comparison(a, b, labels=('A', 'B'))}")
        return {**meta, "a": a, "b": b, "comparison": compare_reports(a, b)}
    report = reports[sides[0]]
    print(format_table(report))
    return {**meta, **report}


def main(argv: Optional[list[str]] = None) -> int:
    from data.common import DataError
    from models.policy import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, rest = parse_args(argv)
        check_args(args)
        document = run(args, rest, argv)
    except (EvaluationError, AdapterError, ConfigError, DataError, ModelLoadError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    output = (
        Path(args.output)
        if args.output is not None
        else default_output_path(args.adapter, args.compare, document["model"])
    )
    output.parent.mkdir(parents=True, exist_ok=True)  # outputs/ for the base model
    with open(output, "w") as fh:
        json.dump(document, fh, indent=1)
    say(f"report: {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
