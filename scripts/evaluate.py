"""Evaluate a model, or a trained LoRA adapter against its base: accuracy per source, as a table and JSON.

    python scripts/evaluate.py --adapter outputs/qwen2.5-3b-medical/checkpoint-750
    python scripts/evaluate.py --config scripts/configs/tiny-cpu.yaml --compare base outputs/tiny-cpu/checkpoint-250
    python scripts/evaluate.py --model Qwen/Qwen2.5-3B-Instruct --sources medqa medmcqa mmlu_medical --samples 4
    python scripts/evaluate.py --config scripts/configs/smollm2-cpu.yaml --sources pubmedqa gsm8k \
        --compare before=smollm2-135m-instruct cold-start=base cold-start+GRPO=outputs/smollm2-cpu/checkpoint-80

Options of this script:
  --model NAME_OR_PATH   base model (default: the --config's model_name_or_path, else the adapter's base)
  --adapter PATH         a saved LoRA adapter (checkpoint-<step> folder); without it the base is evaluated
  --compare A B [C ...]  evaluate each side on the same prompts; a side is ``[LABEL=]SPEC``, SPEC the word
                         ``base`` (the model without adapter), an adapter folder (on the model), or another
                         model (a model folder or name: smollm2-135m-instruct, tiny-qwen2-instruct, a hub id).
                         Two sides: B - A with its paired SE; three or more: each against the first
  --show N               completions shown per source in the markdown report (default 3)
  --sources S [S ...]    gsm8k pubmedqa health_benchmarks medqa medmcqa mmlu_medical (default: the first three)
  --limit N              at most N prompts per source, spread evenly over it
  --samples K            completions per prompt (default 1); pass@k is reported for k = 1, 2, 4, ..., K
  --temperature T        default 0 (greedy) for K = 1, else the config's temperature
  --seed S, --batch_size B (prompts per generate call)
  --output FILE          the JSON report (default: beside the adapter, <adapter>/evaluation.json; with
                         --compare in the adapter side's folder, evaluation_vs_<other side>.json; for the
                         base model alone outputs/evaluation_<model>.json)
  --fresh                evaluate every side again. Without it each side's report is kept, as it ends, in
                         <output>.sides/ (a name from what decides its completions: the model and adapter
                         files, the config, the prompts, the settings); a side found there is read back, so
                         a compare that was killed goes on from the last side it finished, and a later
                         compare that adds a side (a new checkpoint) evaluates only that one
  --medqa_data_files, --medmcqa_data_files, --mmlu_medical_data_files FILES   local files instead of the hub
Any field of grpo/config.py may follow as ``--field value``, as for train.py: --config FILE (a training
YAML: model, 4-bit, data files, sampler...), --sampler hf, --max_completion_length 512,
--max_prompt_length 2048, --load_in_4bit false, --gsm8k_data_files FILES, ...

The markdown tables go to stdout and, with a few completions of each side, to a markdown file beside the JSON
(same name, ``.md``); progress and warnings to stderr; everything (metrics, settings, every completion) to the
JSON file. docs/EVALUATION.md defines the metrics.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout without install
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_record, also when loaded by path

from bench_record import save_json  # noqa: E402  (scripts/bench_record.py: one rename, never half a file)

from data.eval_sets import SOURCES, TRAINING_SOURCES  # noqa: E402
from grpo.config import ConfigError, load_config  # noqa: E402
from grpo.evaluation import EvaluationError  # noqa: E402
from models.policy import ADAPTER_CONFIG, AdapterError, read_adapter_config  # noqa: E402
from models.smollm2 import SMOLLM2_MODEL  # noqa: E402
from models.tiny import TINY_MODELS  # noqa: E402

BASE = "base"
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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
        "--compare",
        nargs="+",
        metavar="[LABEL=]SIDE",
        help="two or more sides, each 'base', an adapter folder or another model (folder or name), "
        "optionally labelled LABEL=SIDE; prints each against the first (with two: B - A)",
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
        "--show", type=int, default=3, help="completions shown per source in the markdown report (default: 3)"
    )
    parser.add_argument(
        "--output",
        help="the JSON report (default: <adapter>/evaluation.json; with --compare, "
        "evaluation_vs_<other side>.json in the adapter side's folder; the base model alone: "
        "outputs/evaluation_<model>.json)",
    )
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="evaluate every side again (default: read back the sides an earlier run with the same model "
        "files, config, prompts and settings saved in <output>.sides/)",
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
    if args.show < 0:
        raise EvaluationError(f"--show {args.show}: must be >= 0")
    if args.compare:
        if len(args.compare) < 2:
            raise EvaluationError(f"--compare {args.compare[0]}: needs two sides or more")
        args.sides = [parse_side(text) for text in args.compare]
        for key, what in (("spec", "sides are the same"), ("label", "labels are the same")):
            values = [getattr(side, key) for side in args.sides]
            if len(set(values)) != len(values):
                raise EvaluationError(f"--compare {' '.join(args.compare)}: two {what}")
    else:
        if args.adapter:
            read_adapter_config(args.adapter)
        args.sides = [Side(args.adapter or BASE, args.adapter or BASE, adapter=args.adapter)]
    if args.output is not None:
        out_dir = os.path.dirname(os.path.abspath(args.output))
        if not os.path.isdir(out_dir):
            raise EvaluationError(f"--output {args.output!r}: folder {out_dir} does not exist")


@dataclass(frozen=True)
class Side:
    """One model to evaluate: the config's model (``base``), a LoRA adapter on it, or another model."""

    label: str  # its name in the tables
    spec: str  # as given on the command line
    adapter: Optional[str] = None  # a saved LoRA adapter folder, on the config's model
    model: Optional[str] = None  # another model (folder or name) without adapter; None = the config's model


MODEL_NAMES = (*TINY_MODELS, SMOLLM2_MODEL)  # the models this project builds offline
HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*/[A-Za-z0-9][\w.\-]*")


def parse_side(text: str) -> Side:
    """A ``--compare`` side: ``[LABEL=]SPEC``; SPEC is ``base``, an adapter folder (``adapter_config.json``), a
    model folder (``config.json``), one of the offline model names or a hub id. Raises AdapterError naming
    ``--compare`` for a folder that is neither (or a path that does not exist).

    >>> parse_side("base"), parse_side("cold=base")
    (Side(label='base', spec='base', adapter=None, model=None), Side(label='cold', spec='base', adapter=None, model=None))
    >>> parse_side("before=smollm2-135m-instruct").model
    'smollm2-135m-instruct'
    """
    label, spec = None, text
    head, sep, tail = text.partition("=")
    if sep and head and not any(c in head for c in "/\\") and tail:
        label, spec = head, tail
    side = Side(label or spec, spec)
    if spec == BASE:
        return side
    is_folder = os.path.isdir(spec)
    if is_folder and not os.path.isfile(os.path.join(spec, ADAPTER_CONFIG)):
        if os.path.isfile(os.path.join(spec, "config.json")):
            return Side(side.label, spec, model=spec)
    elif not is_folder and not os.path.exists(spec) and (spec in MODEL_NAMES or HUB_ID.fullmatch(spec)):
        return Side(side.label, spec, model=spec)
    read_adapter_config(spec, flag="--compare")
    return Side(side.label, spec, adapter=spec)


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
    >>> str(default_output_path(None, ["base", "cold", "runs/a/checkpoint-60"], "m"))
    'runs/a/checkpoint-60/evaluation_compare.json'
    """
    if adapter:
        return Path(adapter) / "evaluation.json"
    if compare and len(compare) > 2:
        folders = [side for side in compare if side != BASE and side not in MODEL_NAMES]
        return Path(folders[-1] if folders else "outputs") / "evaluation_compare.json"
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
        adapters = [side.adapter for side in args.sides if side.adapter]
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
    from data.prompts import filter_long_prompts, prompt_lengths

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
        rows = dataset.select(evenly_spaced(len(dataset), args.limit)).to_list()
        sets[name] = shortest_first(rows, prompt_lengths([row["prompt"] for row in rows], tokenizer))
    return sets, dropped


def shortest_first(rows: list, lengths: list[int]) -> list:
    """The rows in order of prompt length (ties keep their order): a generate call then gets prompts of about
    the same length, and pads little (HF generate pads every row to the longest; measured with SmolLM2 on
    CPU, one padded batch generated at about half the speed of an unpadded one). ``index`` in the report is
    the position in this order.

    >>> shortest_first(["c", "a", "b", "a2"], [30, 10, 20, 10])
    ['a', 'a2', 'b', 'c']
    """
    return [rows[i] for i in sorted(range(len(rows)), key=lambda i: lengths[i])]


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


def side_files(folder: Optional[str]) -> list[tuple[str, int, int]]:
    """(name, size, mtime in ns) of each file directly in a model or adapter folder: a side's identity on
    disk. A model rewritten in place (a new cold start, a retrained checkpoint) changes its entry."""
    if folder is None or not os.path.isdir(folder):
        return []
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    return [(e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in entries if e.is_file()]


def side_key(
    side: Side,
    model_path: str,
    side_config: Any,
    sets: dict[str, list],
    settings: Any,
    args: argparse.Namespace,
) -> str:
    """A name for what decides one side's completions and scores: its label, its model folder's and adapter
    folder's files, the config it is loaded and scored with, the prompts (and answers), the sampling settings,
    --samples, --seed and --batch_size. Two runs with the same key write the same report.

    Returns ``<label>-<16 hex digits of a sha256>``, the label made safe for a file name.
    """
    import hashlib
    from dataclasses import asdict

    what = {
        "label": side.label,
        "model": [os.path.abspath(model_path), side_files(model_path)],
        "adapter": [os.path.abspath(side.adapter), side_files(side.adapter)] if side.adapter else None,
        "config": asdict(side_config),
        "prompts": sets,
        "settings": asdict(settings),
        "samples": args.samples,
        "seed": args.seed,
        "batch_size": args.batch_size,
    }
    digest = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:16]
    return f"{re.sub(r'[^A-Za-z0-9.+_-]', '_', side.label)}-{digest}"


def output_path(args: argparse.Namespace, model: str) -> Path:
    """--output, else where the report goes by default (``default_output_path``)."""
    if args.output is not None:
        return Path(args.output)
    specs = [side.spec for side in args.sides] if args.compare else None
    return default_output_path(args.adapter, specs, model)


def saved_sides_folder(output: Path) -> Path:
    """Where each side's report is kept as it ends: ``outputs/x.json`` -> ``outputs/x.sides/``."""
    return output.with_suffix(".sides")


def read_saved_side(path: Path) -> Optional[dict[str, Any]]:
    """A side's report saved by an earlier run, or None (none there, or a torn file from a killed write)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def run(args: argparse.Namespace, rest: list[str], argv: list[str]) -> tuple[dict[str, Any], str, Path]:
    """Load, generate, score; returns the JSON document, the markdown report (and prints the tables) and
    the JSON report's path."""
    from dataclasses import replace

    from grpo.evaluation import evaluate
    from grpo.report import compare_reports, format_comparison, format_table
    from models.policy import load_for_evaluation, load_tokenizer, resolve_dtype, resolve_model_path
    from models.samplers import SamplingSettings, make_sampler

    config = build_config(args, rest)
    say(f"model: {config.model_name_or_path}")
    model_path = resolve_model_path(config.model_name_or_path)
    sides: list[Side] = args.sides
    # every other model resolved (a conversion, a download) before the first generation: fail early
    paths = {side.model: resolve_model_path(side.model) for side in sides if side.model}
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
    # vLLM sizes its LoRA slots once: room for the largest adapter of the sides. The base's zero LoRA takes
    # that rank too (any rank adds exactly 0); an adapter's own rank comes from its folder.
    ranks = [int(read_adapter_config(side.adapter)["r"]) for side in sides if side.adapter] or [config.lora_r]
    config = replace(config, lora_r=max(ranks))
    output = output_path(args, config.model_name_or_path)
    saved = saved_sides_folder(output)

    reports: list[dict[str, Any]] = []
    sampler, sampler_path = None, None
    for side in sides:
        path = paths.get(side.model, model_path)
        side_config = config if side.model is None else replace(config, model_name_or_path=side.model)
        side_file = saved / f"{side_key(side, path, side_config, sets, settings, args)}.json"
        report = None if args.fresh else read_saved_side(side_file)
        if report is not None:
            say(
                f"{side.label}: read back from {side_file} (evaluated earlier with the same files, config, "
                "prompts and settings; --fresh evaluates it again)"
            )
            reports.append(report)
            continue
        say(f"evaluating {side.label}")
        with contextlib.redirect_stdout(sys.stderr):  # stdout is for the tables
            model, side_tokenizer = load_for_evaluation(side_config, side.adapter, path=path)
            if sampler is not None and path == sampler_path:
                sampler.update_policy(model)  # the same base: only the adapter changes
            else:  # the first side, or another base model: a sampler of its own
                if sampler is not None:
                    sampler.close()
                sampler = make_sampler(side_config, model, side_tokenizer, path, resolve_dtype(config.dtype))
                sampler_path = path
        report = evaluate(
            sampler,
            sets,
            args.samples,
            args.seed,
            settings,
            args.batch_size,
            progress=lambda m: say(f"  {m}"),
        )
        add_answer_metrics(report)
        report.update(
            label=side.label,
            model=side.model or config.model_name_or_path,
            adapter=side.adapter,
            dropped_long_prompts=dropped,
        )
        reports.append(report)
        save_json(side_file, report)  # whole or absent: a compare killed after this goes on from the next
        del model
        gc.collect()
    if sampler is not None:
        sampler.close()

    meta = {
        "command": "python scripts/evaluate.py " + shlex.join(argv),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "model": config.model_name_or_path,
        "config": args.config,
        "limit": args.limit,
        "data": {name: describe_data(name, args, config) for name in sets},
    }
    if not args.compare:
        markdown = format_table(reports[0])
        print(markdown)
        return (
            {**meta, **reports[0]},
            markdown + "\n\n" + format_completions(sets, [sides[0]], reports, args.show),
            output,
        )
    sections = [
        f"## {LETTERS[i]}: {side.label}\n\n{format_table(r)}\n"
        for i, (side, r) in enumerate(zip(sides, reports, strict=True))
    ]
    if len(sides) == 2:
        sections.append(f"## B - A\n\n{format_comparison(reports[0], reports[1], labels=('A', 'B'))}")
    else:
        sections.append(f"## Against A ({sides[0].label})\n\n{format_versus_first(sides, reports)}")
    markdown = "\n".join(sections)
    print(markdown)
    document = {
        **meta,
        "sides": [
            {"label": s.label, "spec": s.spec, "model": r["model"], "adapter": s.adapter}
            for s, r in zip(sides, reports, strict=True)
        ],
        "reports": reports,
        "versus_first": {
            s.label: compare_reports(reports[0], r) for s, r in zip(sides[1:], reports[1:], strict=True)
        },
    }
    if len(sides) == 2:  # the two-side layout of earlier versions
        document.update(a=reports[0], b=reports[1], comparison=compare_reports(reports[0], reports[1]))
    if len(sides) == 2:  # the markdown file also gets the summary table (soft format, answers given)
        markdown += f"\n\n## Summary\n\n{format_versus_first(sides, reports)}"
    return document, markdown + "\n\n" + format_completions(sets, sides, reports, args.show), output


# ---------------------------------------------------------------------------- the report's extra parts


def answer_counts(texts: list[str], labels: tuple[str, ...]) -> dict[str, float]:
    """Share of completions whose extracted answer (the text inside <answer>) is each label, or "other".

    >>> answer_counts(["<answer>\\nyes\\n</answer>", "<answer>\\nYes.\\n</answer>", "no tags"], ("yes", "no"))
    {'yes': 0.6666666666666666, 'no': 0.0, 'other': 0.3333333333333333}
    """
    from rewards.parsing import extract_answer, normalize_answer

    counts = dict.fromkeys([*labels, "other"], 0)
    for text in texts:
        answer = normalize_answer(extract_answer(text)).lower() if "<answer>" in text else ""
        counts[answer if answer in labels else "other"] += 1
    return {label: n / max(1, len(texts)) for label, n in counts.items()}


def add_answer_metrics(report: dict[str, Any]) -> None:
    """Add to each source's metrics what the tables of --compare show besides grpo.evaluation's metrics:

    - ``soft_format_rate``: share of completions that earn soft_format_reward_func (the tags, in order);
    - ``majority_answer`` / ``majority_rate``: the most common gold answer and its share of the prompts (what
      always giving that answer scores: PubMedQA's test set is 55.2 % "yes");
    - ``answers`` (PubMedQA only): the share of completions answering yes / no / maybe / other, to tell a
      model that learned the label prior from one that reads the abstract.
    """
    from collections import Counter

    from rewards import soft_format_reward_func
    from rewards.parsing import PUBMEDQA_LABELS

    def soft_format_rate(texts: list[str]) -> float:
        return sum(r > 0 for r in soft_format_reward_func(texts)) / len(texts)

    every_text = []
    for name, prompts in report["prompts"].items():
        texts = [t for p in prompts for t in p["completions"]]
        every_text += texts
        metrics = report["sources"][name]
        metrics["soft_format_rate"] = soft_format_rate(texts)
        answer, count = Counter(p["answer"] for p in prompts).most_common(1)[0]
        metrics["majority_answer"], metrics["majority_rate"] = answer, count / len(prompts)
        if name == "pubmedqa":
            metrics["answers"] = answer_counts(texts, PUBMEDQA_LABELS)
    report["all"]["soft_format_rate"] = soft_format_rate(every_text)


def format_versus_first(sides: list[Side], reports: list[dict[str, Any]]) -> str:
    """One row per (side, source): accuracy with its SE, the difference from the first side with the paired SE
    of that difference (per-question differences), the format rates and the mean length; then the label prior
    and, for PubMedQA, which answers each side gives."""
    from grpo.report import compare_reports, format_value

    header = [
        "side", "source", "accuracy %", "± SE", "vs A (points)", "paired SE", "strict format %",
        "soft format %", "answer type %", "mean length", "truncated %",
    ]  # fmt: skip
    rows = []
    for i, (side, report) in enumerate(zip(sides, reports, strict=True)):
        versus = compare_reports(reports[0], report) if i else None
        for source in [*report["sources"], "all"]:
            m = report["all"] if source == "all" else report["sources"][source]
            diff, se = "", ""
            if versus is not None:
                accuracy = versus[source]["accuracy"]
                diff = f"{100 * accuracy['difference']:+.1f}"
                se = format_value(accuracy["difference_se"], "pct")
            rows.append(
                [
                    f"{LETTERS[i]}: {side.label}",
                    source,
                    format_value(m["accuracy"], "pct"),
                    format_value(m["accuracy_se"], "pct"),
                    diff,
                    se,
                    format_value(m["strict_format_rate"], "pct"),
                    format_value(m.get("soft_format_rate"), "pct"),
                    format_value(m["answer_type_rate"], "pct"),
                    format_value(m["mean_completion_length"], "float1"),
                    format_value(m["truncation_rate"], "pct"),
                ]
            )
    lines = ["| " + " | ".join(header) + " |", "|:---|:---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    first = reports[0]["sources"]
    prior = "; ".join(
        f"{name}: {m['majority_answer']!r}, {100 * m['majority_rate']:.1f} % of the prompts"
        for name, m in first.items()
        if "majority_answer" in m
    )
    text = "\n".join(lines) + (
        "\n\nThe paired SE is the standard error of the per-question differences from A (the same questions "
        "on both sides): a difference of less than about two paired SE is within the noise."
    )
    if prior:
        text += f" Always giving the most common gold answer scores: {prior}."
    if "answers" in first.get("pubmedqa", {}):
        labels = list(first["pubmedqa"]["answers"])
        gold = [p["answer"] for p in reports[0]["prompts"]["pubmedqa"]]
        answer_rows = [["gold"] + [f"{100 * gold.count(label) / len(gold):.1f}" for label in labels]]
        answer_rows += [
            [f"{LETTERS[i]}: {side.label}"]
            + [f"{100 * r['sources']['pubmedqa']['answers'][x]:.1f}" for x in labels]
            for i, (side, r) in enumerate(zip(sides, reports, strict=True))
        ]
        text += "\n\nPubMedQA, answers given (% of completions; other = no <answer> tag or another text):\n\n"
        text += (
            "| side | " + " | ".join(f"{x} %" for x in labels) + " |\n|:---|" + "---:|" * len(labels) + "\n"
        )
        text += "\n".join("| " + " | ".join(row) + " |" for row in answer_rows)
    return text


def format_completions(
    sets: dict[str, list], sides: list[Side], reports: list[dict[str, Any]], show: int
) -> str:
    """The first completion of each side for ``show`` prompts per source (spread over the set), with the end of
    the question and the gold answer: what the numbers are made of."""
    if show == 0:
        return ""
    from data.eval_sets import evenly_spaced

    parts = ["## Completions"]
    for source, rows in sets.items():
        for index in evenly_spaced(len(rows), show):
            question = rows[index]["prompt"][-1]["content"]
            excerpt = ("…" + question[-300:]) if len(question) > 300 else question
            parts.append(
                f"### {source} #{index} (gold: {rows[index]['answer']})\n\n> " + excerpt.replace("\n", "\n> ")
            )
            for i, (side, report) in enumerate(zip(sides, reports, strict=True)):
                entry = report["prompts"][source][index]
                parts.append(
                    f"**{LETTERS[i]}: {side.label}** (correctness {entry['correctness'][0]:g}, "
                    f"{entry['lengths'][0]} tokens)\n\n```text\n{entry['completions'][0].strip()}\n```"
                )
    return "\n\n".join(parts)


def main(argv: Optional[list[str]] = None) -> int:
    from data.common import DataError
    from models.policy import ModelLoadError

    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args, rest = parse_args(argv)
        check_args(args)
        document, markdown, output = run(args, rest, argv)
    except (EvaluationError, AdapterError, ConfigError, DataError, ModelLoadError) as err:
        print(f"evaluate.py: error: {err}", file=sys.stderr)
        return 2
    output.parent.mkdir(parents=True, exist_ok=True)  # outputs/ for the base model
    with open(output, "w") as fh:
        json.dump(document, fh, indent=1)
    output.with_suffix(".md").write_text(f"`{document['command']}`\n\n{markdown}\n")
    say(f"report: {output} and {output.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
