"""Validation of a GRPOConfig: every rule a field or a combination of fields must follow.

``GRPOConfig.__post_init__`` calls ``validate``, so an invalid config never exists: each problem is one
``ConfigError`` whose message names the field and the value (the CLI prints it as one line and exits 2).
``config_warnings`` lists valid settings that are probably not what the user means (scripts/train.py prints
each as one ``config warning:`` line). ``accelerate_dtype`` checks the config against what ``accelerate launch``
asks for (its environment variables) and refuses what this trainer does not support.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import types
import typing
from collections.abc import Mapping
from typing import Any

from grpo.config import OVERLONG_REWARD, REWARD_FUNC_NAMES, ConfigError, GRPOConfig
from grpo.objectives import OBJECTIVES, level_problems, objective_problems


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


def _positive(v: Any) -> bool:
    return v > 0


def _non_negative(v: Any) -> bool:
    return v >= 0


def _optional(check):  # None passes
    return lambda v: v is None or check(v)


# (field, check, the rule a failing value breaks): one line each, checked in this order.
RANGES = [
    *[
        (name, _positive, "must be > 0")
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
            "temperature",
            "max_sampling_rounds",
        )
    ],  # fmt: skip
    ("num_generations", lambda v: v >= 2, "must be >= 2 (a group needs two completions to compare)"),
    (
        "learning_rate",
        lambda v: 0 < v < 1,
        "must be in (0, 1): AdamW moves each weight by about this much per step",
    ),
    ("eval_steps", _non_negative, "must be >= 0 (0 = off)"),
    *[(name, _non_negative, "must be >= 0") for name in ("epsilon", "beta", "weight_decay", "entropy_coef")],
    ("epsilon_high", _optional(_non_negative), "must be >= 0 (or null = epsilon)"),
    (
        "delta",
        _optional(lambda v: v > 1),
        "must be > 1 (or null = off): it caps the ratio above 1 + epsilon_high",
    ),
    ("clip_ratio_c", _optional(lambda v: v > 1), "must be > 1 (or null = off)"),
    ("top_p", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("top_k", _non_negative, "must be >= 0 (0 = off)"),
    ("lora_dropout", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("warmup_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
    ("adam_beta1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("adam_beta2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
    ("max_grad_norm", _non_negative, "must be >= 0 (0 = no clipping)"),
    ("vllm_gpu_memory_utilization", lambda v: 0 < v <= 1, "must be in (0, 1]"),
    ("vllm_server_port", lambda v: 0 < v < 65536, "must be a port number, 1 to 65535"),
    ("vllm_server_timeout", _positive, "must be > 0 (seconds)"),
    (
        "vllm_server_base_url",
        _optional(lambda v: v.startswith(("http://", "https://"))),
        "must start with http:// or https:// (or be null = vllm_server_host:vllm_server_port)",
    ),
    ("top_entropy_quantile", lambda v: 0 < v <= 1, "must be in (0, 1] (the share of tokens kept)"),
    *[
        (name, _non_negative, "must be >= 0")
        for name in ("entropy_coef_min", "entropy_coef_max", "entropy_coef_delta", "entropy_target")
    ],
    ("off_policy_mask_threshold", _optional(_positive), "must be > 0 (or null = off)"),
    ("vllm_importance_sampling_clip_min", _optional(_non_negative), "must be >= 0 (or null)"),
    ("vllm_importance_sampling_clip_max", _optional(_positive), "must be > 0 (or null = unbounded)"),
    ("vllm_importance_sampling_cap", _optional(_positive), "must be > 0 (or null)"),
    ("steps_per_generation", _optional(_positive), "must be > 0 (or null = gradient_accumulation_steps)"),
    ("num_completions_to_print", _optional(_positive), "must be > 0 (or null = 1)"),
    ("save_total_limit", _optional(_positive), "must be > 0 (or null = keep every checkpoint)"),
    ("soft_punish_cache", _non_negative, "must be >= 0"),
    ("reward_num_workers", _non_negative, "must be >= 0 (0 = thread-safe functions run in turn)"),
    ("reward_timeout", _optional(_positive), "must be > 0 (or null = no limit)"),
    ("judge_timeout", _positive, "must be > 0"),
    ("judge_max_concurrency", _positive, "must be > 0"),
    ("model_name_or_path", bool, "must not be empty"),
    ("output_dir", bool, "must not be empty"),
    ("lora_target_modules", bool, "must name at least one module"),
    ("reward_funcs", bool, "must name at least one reward function"),
]


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
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, float) and not math.isfinite(number):
                raise ConfigError(f"{f.name}={value!r}: must be a finite number")

    def need(condition: bool, name: str, rule: str) -> None:
        if not condition:
            raise ConfigError(f"{name}={getattr(cfg, name)!r}: {rule}")

    for name, check, rule in RANGES:
        need(check(getattr(cfg, name)), name, rule)
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
    if cfg.dataset_name is None:
        need(
            cfg.dataset_config is None, "dataset_config", "needs dataset_name (the hub dataset it configures)"
        )
    else:
        need(bool(cfg.dataset_name.strip()), "dataset_name", "must name local files or a hub dataset")
        need(bool(cfg.dataset_train_split), "dataset_train_split", "must name a split")
        need(
            cfg.eval_steps == 0 or cfg.dataset_test_split is not None,
            "eval_steps",
            "needs dataset_test_split when dataset_name is set",
        )
    if cfg.report_to in ("wandb", "trackio"):
        need(
            importlib.util.find_spec(cfg.report_to) is not None,
            "report_to",
            f"{cfg.report_to} is not installed (pip install {cfg.report_to}); tensorboard needs nothing more",
        )
    _validate_rewards(cfg, need)
    _validate_objective(cfg, need)
    _validate_batching(cfg, need)
    if cfg.vllm_mode == "server":
        need(
            cfg.sampler != "hf",
            "sampler",
            "vllm_mode: server samples on a vLLM server: set sampler: vllm (or auto)",
        )


def _validate_rewards(cfg: GRPOConfig, need) -> None:
    need(len(set(cfg.reward_funcs)) == len(cfg.reward_funcs), "reward_funcs", "names a function twice")
    for spec in cfg.reward_funcs:
        if spec in REWARD_FUNC_NAMES or spec == OVERLONG_REWARD:
            continue
        need(":" in spec or "." in spec, "reward_funcs", f"unknown {spec!r}; known: {', '.join(REWARD_FUNC_NAMES)}, "
             f"{OVERLONG_REWARD}, or an import path 'package.module:function'")  # fmt: skip
        from rewards.registry import RewardFuncError, resolve_reward_func  # imports the user's module now

        try:
            resolve_reward_func(spec)
        except RewardFuncError as err:
            raise ConfigError(f"reward_funcs={cfg.reward_funcs!r}: {err}") from None
    if cfg.reward_weights is not None:
        need(
            len(cfg.reward_weights) == len(cfg.reward_funcs),
            "reward_weights",
            f"needs one weight per reward function ({len(cfg.reward_funcs)})",
        )
    if OVERLONG_REWARD in cfg.reward_funcs:
        need(
            cfg.soft_punish_cache <= cfg.max_completion_length,
            "soft_punish_cache",
            f"must be <= max_completion_length = {cfg.max_completion_length}",
        )


def _validate_objective(cfg: GRPOConfig, need) -> None:
    """Combinations of the GRPO-family options that have no meaning: the rules the objective table derives
    (grpo/objectives.py, docs/OBJECTIVES.md), then those that involve other parts of the config."""
    for name, rule in level_problems(cfg) + objective_problems(cfg):
        need(False, name, rule)
    is_weighted = cfg.sampler != "hf" and cfg.vllm_importance_sampling_correction  # vLLM's IS weights
    if OBJECTIVES[cfg.loss_type].token_is_weights and is_weighted:
        need(
            cfg.vllm_importance_sampling_mode.startswith("token"),
            "vllm_importance_sampling_mode",
            f"{cfg.loss_type} takes per-token importance weights: use token_truncate or token_mask (or "
            "vllm_importance_sampling_correction: false, or sampler: hf)",
        )
    if cfg.multi_objective_aggregation == "normalize_then_sum":
        need(
            cfg.scale_rewards == "group",
            "scale_rewards",
            "normalize_then_sum (GDPO) normalises each reward in its group, then over the batch: keep scale_rewards: group",
        )
    need(
        cfg.entropy_coef_min <= cfg.entropy_coef_max,
        "entropy_coef_min",
        f"must be <= entropy_coef_max = {cfg.entropy_coef_max}",
    )
    clip_max = cfg.vllm_importance_sampling_cap or cfg.vllm_importance_sampling_clip_max
    if cfg.vllm_importance_sampling_clip_min is not None and clip_max is not None:
        need(
            cfg.vllm_importance_sampling_clip_min < clip_max,
            "vllm_importance_sampling_clip_min",
            f"must be < vllm_importance_sampling_clip_max = {clip_max}",
        )


def _validate_batching(cfg: GRPOConfig, need) -> None:
    completions = cfg.per_device_train_batch_size * cfg.num_generations
    if cfg.train_micro_batch_size is not None:
        need(
            cfg.train_micro_batch_size > 0 and completions % cfg.train_micro_batch_size == 0,
            "train_micro_batch_size",
            f"must divide per_device_train_batch_size * num_generations = {completions}",
        )
    if cfg.steps_per_generation is not None:
        need(
            cfg.steps_per_generation % cfg.gradient_accumulation_steps == 0,
            "steps_per_generation",
            f"must be a multiple of gradient_accumulation_steps = {cfg.gradient_accumulation_steps}",
        )
    if cfg.vllm_max_model_len is not None:
        need(
            cfg.vllm_max_model_len >= cfg.max_prompt_length + cfg.max_completion_length,
            "vllm_max_model_len",
            "must be >= max_prompt_length + max_completion_length",
        )


def config_warnings(cfg: GRPOConfig, cuda: bool | None = None) -> list[str]:
    """Settings that are valid but probably not what the user means: one line each, naming the fields.

    cuda: whether this machine has a CUDA device (None = ask torch, only when a warning depends on it)."""
    notes = []
    truncation = {"top_p": cfg.top_p < 1, "top_k": cfg.top_k > 0}  # which of the two is on
    truncating = [f"{name}={getattr(cfg, name)}" for name, on in truncation.items() if on]
    if truncating:
        notes.append(
            f"{', '.join(truncating)}: the sampler draws from a truncated distribution while every "
            "log-prob of the loss is of the full softmax, so the samples are off-policy (ratios far from 1)"
        )
    if cfg.importance_sampling_level == "sequence" and cfg.loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        notes.append(
            f"importance_sampling_level=sequence with loss_type={cfg.loss_type}: the token sum weights each sequence "
            "by its length; GSPO's setup is loss_type: grpo"
        )
    if cfg.loss_type == "cispo" and cfg.effective_epsilon_high < 1:
        notes.append(
            f"loss_type=cispo caps the importance weight at epsilon_high={cfg.effective_epsilon_high} (< 1): "
            "every token is capped; CISPO uses a cap above 1 (e.g. epsilon_high: 4.0)"
        )
    if cfg.async_generation and not (cfg.sampler != "hf" and cfg.vllm_mode == "server"):
        notes.append(
            "async_generation=True without vllm_mode: server: a colocated sampler shares the trainer's device and "
            "thread, so nothing overlaps; the rollouts are only sampled one step behind (staleness 1)"
        )
    if cfg.vllm_enable_sleep_mode and cfg.sampler != "hf":
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            notes.append(
                "vllm_enable_sleep_mode=True: vLLM has no sleep mode without CUDA (here: CPU), so the engine "
                "runs without it and keeps its KV cache between generations"
            )
    return notes


# ============================================================================ what accelerate launch asks for


class AccelerateConfigError(ConfigError):
    """``accelerate launch`` asks for a setup this trainer does not support, or one that contradicts ``dtype``."""


SUPPORTED_LAUNCHES = (
    "supported: one process, plain DDP (multi-GPU) or multi-CPU, with mixed_precision no or bf16"
)
# accelerate launch hands its config to every process in environment variables, and Accelerator() reads them
# (accelerate/state.py): these three switch the model and optimiser to another engine.
UNSUPPORTED_ENGINES = {
    "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
    "ACCELERATE_USE_FSDP": "FSDP",
    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM",
}
MIXED_PRECISION_VARIABLE = "ACCELERATE_MIXED_PRECISION"
_TRUE = {"1", "y", "yes", "t", "true", "on"}  # accelerate's str_to_bool


def accelerate_dtype(dtype: str, environ: Mapping[str, str] | None = None) -> str:
    """The run's compute dtype under the accelerate settings in ``environ`` (os.environ when None), or
    AccelerateConfigError naming the setting this trainer cannot honour.

    Why so few: the update calls ``loss.backward()`` itself and sums the gradients with one all-reduce; the
    model and optimiser are never handed to ``accelerator.prepare``. So DeepSpeed, FSDP and Megatron-LM (which
    shard or wrap them) would not be used, and fp16 mixed precision needs a loss scaler that nothing applies.
    bf16 needs no scaler: it agrees with ``dtype: auto`` (which then means bf16) or ``bf16``, and contradicts
    an explicit ``fp32`` or ``fp16``.

    >>> accelerate_dtype("auto", {"ACCELERATE_MIXED_PRECISION": "bf16"}), accelerate_dtype("fp32", {})
    ('bf16', 'fp32')
    """
    environ = os.environ if environ is None else environ
    for variable, engine in UNSUPPORTED_ENGINES.items():
        if environ.get(variable, "").strip().lower() in _TRUE:
            raise AccelerateConfigError(
                f"{engine} ({variable}={environ[variable]}) is not supported: this trainer sums the gradients "
                f"itself and never hands the model to accelerate; {SUPPORTED_LAUNCHES}"
            )
    mixed_precision = environ.get(MIXED_PRECISION_VARIABLE, "no").strip().lower() or "no"
    if mixed_precision not in ("no", "bf16"):
        why = " (it needs a loss scaler, which nothing applies here)" if mixed_precision == "fp16" else ""
        raise AccelerateConfigError(
            f"mixed_precision {mixed_precision} ({MIXED_PRECISION_VARIABLE}={environ[MIXED_PRECISION_VARIABLE]}) "
            f"is not supported{why}; {SUPPORTED_LAUNCHES}"
        )
    if mixed_precision == "no" or dtype == "bf16":
        return dtype
    if dtype == "auto":
        return "bf16"
    raise AccelerateConfigError(
        f"accelerate's mixed_precision bf16 ({MIXED_PRECISION_VARIABLE}=bf16) and the config's dtype {dtype} "
        "disagree: set dtype: bf16 (or auto), or launch with --mixed_precision no"
    )
