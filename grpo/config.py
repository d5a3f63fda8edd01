"""One typed config for the whole trainer.

Every field carries its help text in ``metadata["help"]``; the defaults are the recipe we implement
(Qwen2.5-3B-Instruct, 4-bit NF4, LoRA rank 64 on the seven projections, the GRPO settings of the
medical-reasoning recipe). ``docs/CONFIG.md`` is generated from this file by
``python scripts/config_reference.py``, and a test keeps the two in step.

Loading follows the TRL / HfArgumentParser convention::

    python scripts/train.py --config scripts/configs/tiny-cpu.yaml --learning_rate 1e-5

The YAML file sets the defaults, command-line ``--field value`` pairs override them, and
``validate`` runs on the result before anything heavy is imported or loaded. Every problem is a
``ConfigError`` whose message names the field and the value; the CLI prints it without a traceback.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

REWARD_FUNC_NAMES = (
    "xmlcount_reward_func",
    "soft_format_reward_func",
    "strict_format_reward_func",
    "int_reward_func",
    "correctness_reward_func",
)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class ConfigError(ValueError):
    """An invalid configuration: the message names the field (or file) and the value."""


def setting(default: Any, help: str, choices: Optional[list] = None, **kw: Any) -> Any:
    """A dataclass field with help text (and argparse choices) in its metadata."""
    metadata = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=metadata, **kw)
    return field(default=default, metadata=metadata, **kw)


@dataclass
class GRPOConfig:
    # ----------------------------------------------------------------- model
    model_name_or_path: str = setting(
        "Qwen/Qwen2.5-3B-Instruct", "Hub id or local folder of the base model (HF layout)."
    )
    trust_remote_code: bool = setting(False, "Pass trust_remote_code to transformers (off unless asked).")
    load_in_4bit: bool = setting(True, "Load the base in bitsandbytes 4-bit (QLoRA); false = 16-bit LoRA.")
    bnb_4bit_quant_type: str = setting("nf4", "4-bit quantisation type.", choices=["nf4", "fp4"])
    bnb_4bit_use_double_quant: bool = setting(True, "Quantise the quantisation constants too.")
    dtype: str = setting(
        "auto",
        "Compute dtype: auto = bf16 where supported, else fp16 on GPU, fp32 on CPU.",
        choices=["auto", "bf16", "fp16", "fp32"],
    )
    lora_r: int = setting(64, "LoRA rank.")
    lora_alpha: int = setting(64, "LoRA alpha (scaling = alpha / r).")
    lora_dropout: float = setting(0.0, "Dropout on the LoRA input.")
    lora_target_modules: list[str] = setting(list(LORA_TARGETS), "Module names that get a LoRA adapter.")
    gradient_checkpointing: bool = setting(True, "Recompute activations in the backward (non-reentrant).")
    # ----------------------------------------------------------------- data
    dataset_mixture: list[float] = setting(
        [0.7, 0.15, 0.15],
        "Sampling probabilities of the training sources, in the order pubmedqa, gsm8k, health_benchmarks.",
    )
    gsm8k_data_files: Optional[str] = setting(
        None, "Local json/jsonl/parquet file(s) in the openai/gsm8k schema instead of the hub."
    )
    pubmedqa_data_files: Optional[str] = setting(
        None, "Local file(s) in the qiaojin/PubMedQA schema instead of the hub."
    )
    health_benchmarks_data_files: Optional[str] = setting(
        None, "Local file(s) in the yesilhealth/Health_Benchmarks schema instead of the hub."
    )
    pubmedqa_max_context_chars: int = setting(
        1024, "Training PubMedQA rows whose joined context is longer than this are dropped."
    )
    max_prompt_length: int = setting(
        1024, "Prompts longer than this many tokens (chat template included) are dropped."
    )
    # ----------------------------------------------------------------- sampling
    sampler: str = setting(
        "auto",
        "Who generates: vllm, hf (model.generate), auto = vllm when importable on a GPU else hf.",
        choices=["auto", "vllm", "hf"],
    )
    num_generations: int = setting(6, "G: completions sampled per prompt (the group size).")
    max_completion_length: int = setting(1024, "Maximum new tokens per completion.")
    temperature: float = setting(1.0, "Sampling temperature (also divides the trainer's logits).")
    top_p: float = setting(1.0, "Nucleus sampling threshold (1.0 = off).")
    top_k: int = setting(0, "Top-k sampling (0 = off).")
    vllm_gpu_memory_utilization: float = setting(0.5, "Fraction of GPU memory vLLM may take (colocated).")
    vllm_max_model_len: Optional[int] = setting(
        None, "vLLM max_model_len (None = max_prompt_length + max_completion_length)."
    )
    # ----------------------------------------------------------------- GRPO
    beta: float = setting(0.04, "KL penalty coefficient (0 = no reference model pass).")
    epsilon: float = setting(0.2, "Lower clip range: ratio is clipped below 1 - epsilon.")
    epsilon_high: Optional[float] = setting(None, "Upper clip range (None = epsilon); DAPO uses 0.28.")
    loss_type: str = setting(
        "grpo",
        "Aggregation: grpo (mean of per-sequence token means), dapo (token mean over the batch), "
        "dr_grpo (token sum / (N * max_completion_length)).",
        choices=["grpo", "dapo", "dr_grpo"],
    )
    scale_rewards: str = setting(
        "group",
        "Advantage scale: group std, batch std, or none (Dr. GRPO).",
        choices=["group", "batch", "none"],
    )
    num_iterations: int = setting(
        1, "mu: policy updates per batch of samples (old log-probs are kept when > 1)."
    )
    kl_estimator: str = setting("k3", "KL estimator of the penalty.", choices=["k1", "k2", "k3"])
    mask_truncated_completions: bool = setting(
        False, "Leave completions cut at max_completion_length out of the loss."
    )
    reward_funcs: list[str] = setting(list(REWARD_FUNC_NAMES), "Reward functions (names in rewards/).")
    reward_weights: Optional[list[float]] = setting(None, "One weight per reward function (None = 1.0 each).")
    logprob_backend: str = setting(
        "auto",
        "token_logprobs backend: auto (triton on CUDA, chunked torch elsewhere), torch, triton, naive.",
        choices=["auto", "torch", "triton", "naive"],
    )
    # ----------------------------------------------------------------- optimisation
    learning_rate: float = setting(5e-6, "Peak learning rate.")
    adam_beta1: float = setting(0.9, "AdamW beta1.")
    adam_beta2: float = setting(0.99, "AdamW beta2.")
    weight_decay: float = setting(0.1, "AdamW weight decay.")
    warmup_ratio: float = setting(0.1, "Fraction of max_steps with linear warmup.")
    lr_scheduler_type: str = setting(
        "cosine", "Learning-rate schedule.", choices=["cosine", "linear", "constant"]
    )
    optim: str = setting(
        "adamw_8bit",
        "Optimiser: adamw_8bit (bitsandbytes) or adamw_torch.",
        choices=["adamw_8bit", "adamw_torch"],
    )
    per_device_train_batch_size: int = setting(
        1, "Prompts per device per micro-step (each gets G completions)."
    )
    gradient_accumulation_steps: int = setting(1, "Micro-steps accumulated into one optimiser step.")
    train_micro_batch_size: Optional[int] = setting(
        None,
        "Completions per forward/backward pass (None = all of a micro-step's prompts x G); "
        "must divide per_device_train_batch_size * num_generations.",
    )
    max_grad_norm: float = setting(0.1, "Gradient clipping norm (0 = off).")
    max_nonfinite_updates: int = setting(
        3, "Stop (with a checkpoint) after this many non-finite updates in a row; each one is skipped."
    )
    max_steps: int = setting(750, "Optimiser steps to train.")
    seed: int = setting(3407, "Random seed (data order, sampling, adapter init).")
    # ----------------------------------------------------------------- output
    output_dir: str = setting(
        "outputs/qwen2.5-3b-medical", "Where checkpoints, metrics.jsonl and the plot go."
    )
    logging_steps: int = setting(1, "Print a sample completion every this many steps.")
    save_steps: int = setting(100, "Write a checkpoint every this many steps.")
    eval_steps: int = setting(0, "Score a small fixed evaluation subset every this many steps (0 = off).")
    eval_size: int = setting(16, "Prompts per evaluation source in the eval_steps subset.")
    report_to: str = setting("none", "Extra metric sink.", choices=["none", "tensorboard"])
    resume_from_checkpoint: Optional[str] = setting(
        None, "A checkpoint folder, or 'latest' for the newest in output_dir."
    )

    def __post_init__(self) -> None:
        validate(self)

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------- validation


def _check_type(name: str, value: Any, annotation: Any) -> None:
    """Reject a value whose Python type does not match the field annotation (YAML can hold anything)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return
        (inner,) = [a for a in args if a is not type(None)]
        return _check_type(name, value, inner)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{name}={value!r}: expected a list")
        for item in value:
            _check_type(name, item, args[0])
        return
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }[annotation](value)
    if not ok:
        raise ConfigError(f"{name}={value!r}: expected {annotation.__name__}")


def validate(cfg: GRPOConfig) -> None:
    """Raise ConfigError naming the first invalid field or combination of fields."""
    # get_type_hints, not field.type: HfArgumentParser rewrites field.type in place.
    hints = typing.get_type_hints(GRPOConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        _check_type(f.name, value, hints[f.name])
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{f.name}={value!r}: must be one of {', '.join(map(str, choices))}")
        if isinstance(value, float) and value != value:
            raise ConfigError(f"{f.name}={value!r}: must be a number, not NaN")

    def need(condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: {rule}")

    need(
        cfg.num_generations >= 2, "num_generations", "must be >= 2 (a group needs two completions to compare)"
    )
    for name in (
        "max_prompt_length",
        "max_completion_length",
        "max_steps",
        "save_steps",
        "logging_steps",
        "per_device_train_batch_size",
        "gradient_accumulation_steps",
        "num_iterations",
        "lora_r",
        "lora_alpha",
        "pubmedqa_max_context_chars",
        "max_nonfinite_updates",
        "eval_size",
    ):
        need(getattr(cfg, name) > 0, name, "must be > 0")
    need(cfg.eval_steps >= 0, "eval_steps", "must be >= 0 (0 = off)")
    need(cfg.learning_rate > 0, "learning_rate", "must be > 0")
    need(cfg.epsilon >= 0, "epsilon", "must be >= 0")
    need(
        cfg.epsilon_high is None or cfg.epsilon_high >= 0, "epsilon_high", "must be >= 0 (or null = epsilon)"
    )
    need(cfg.beta >= 0, "beta", "must be >= 0")
    need(cfg.temperature > 0, "temperature", "must be > 0")
    need(0 < cfg.top_p <= 1, "top_p", "must be in (0, 1]")
    need(cfg.top_k >= 0, "top_k", "must be >= 0 (0 = off)")
    need(0 <= cfg.lora_dropout < 1, "lora_dropout", "must be in [0, 1)")
    need(0 <= cfg.warmup_ratio <= 1, "warmup_ratio", "must be in [0, 1]")
    need(0 <= cfg.adam_beta1 < 1, "adam_beta1", "must be in [0, 1)")
    need(0 <= cfg.adam_beta2 < 1, "adam_beta2", "must be in [0, 1)")
    need(cfg.weight_decay >= 0, "weight_decay", "must be >= 0")
    need(cfg.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 = no clipping)")
    need(0 < cfg.vllm_gpu_memory_utilization <= 1, "vllm_gpu_memory_utilization", "must be in (0, 1]")
    need(bool(cfg.model_name_or_path), "model_name_or_path", "must not be empty")
    need(bool(cfg.output_dir), "output_dir", "must not be empty")
    need(bool(cfg.lora_target_modules), "lora_target_modules", "must name at least one module")
    need(
        len(cfg.dataset_mixture) == 3,
        "dataset_mixture",
        "needs 3 probabilities (pubmedqa, gsm8k, health_benchmarks)",
    )
    need(
        all(p >= 0 for p in cfg.dataset_mixture) and sum(cfg.dataset_mixture) > 0,
        "dataset_mixture",
        "probabilities must be >= 0 and not all zero",
    )
    need(bool(cfg.reward_funcs), "reward_funcs", "must name at least one reward function")
    unknown = [n for n in cfg.reward_funcs if n not in REWARD_FUNC_NAMES]
    need(not unknown, "reward_funcs", f"unknown {unknown}; known: {', '.join(REWARD_FUNC_NAMES)}")
    if cfg.reward_weights is not None:
        need(
            len(cfg.reward_weights) == len(cfg.reward_funcs),
            "reward_weights",
            f"needs one weight per reward function ({len(cfg.reward_funcs)})",
        )
    completions = cfg.per_device_train_batch_size * cfg.num_generations
    if cfg.train_micro_batch_size is not None:
        need(
            cfg.train_micro_batch_size > 0 and completions % cfg.train_micro_batch_size == 0,
            "train_micro_batch_size",
            f"must divide per_device_train_batch_size * num_generations = {completions}",
        )
    if cfg.vllm_max_model_len is not None:
        need(
            cfg.vllm_max_model_len >= cfg.max_prompt_length + cfg.max_completion_length,
            "vllm_max_model_len",
            "must be >= max_prompt_length + max_completion_length",
        )


# ---------------------------------------------------------------------------- loading


def _parser():
    from transformers import HfArgumentParser

    class _Parser(HfArgumentParser):
        def error(self, message: str):  # argparse would print usage and exit; we want one clear line
            raise ConfigError(message)

    return _Parser(GRPOConfig, prog="train.py")


def read_yaml(path: str) -> dict:
    """Read a YAML config file into a dict of field values, rejecting unknown fields."""
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r}: file not found")
    try:
        with open(path) as fh:
            values = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"--config {path!r}: not valid YAML ({err})") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config {path!r}: expected a mapping of field: value")
    known = {f.name for f in dataclasses.fields(GRPOConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"--config {path!r}: unknown field(s) {', '.join(unknown)}")
    return values


def load_config(argv: Optional[list[str]] = None) -> GRPOConfig:
    """Parse ``[--config FILE] [--field value ...]`` into a validated GRPOConfig.

    The YAML values become the parser's defaults, so command-line values win. Raises ConfigError.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ConfigError("--config needs a file path")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    else:
        for i, a in enumerate(argv):
            if a.startswith("--config="):
                config_path = a.split("=", 1)[1]
                del argv[i]
                break
    parser = _parser()
    if config_path is not None:
        parser.set_defaults(**read_yaml(config_path))
    try:
        cfg, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(str(err)) from None
    if unknown:
        raise ConfigError(f"unknown field(s) on the command line: {' '.join(unknown)}")
    return cfg


def load_config_or_exit(argv: Optional[list[str]] = None) -> GRPOConfig:
    """The CLI entry: on a bad config print one line naming the problem and exit with status 2."""
    try:
        return load_config(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
