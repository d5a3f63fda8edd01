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
from dataclasses import dataclass, field
from typing import Any, Optional

from grpo.objectives import IMPORTANCE_SAMPLING_LEVELS, KL_ESTIMATORS, LOSS_TYPES, LossSettings

REWARD_FUNC_NAMES = (
    "xmlcount_reward_func",
    "soft_format_reward_func",
    "strict_format_reward_func",
    "int_reward_func",
    "correctness_reward_func",
)
# SAMPLER_IS_MODES is grpo/corrections.py's, copied so that validating a config imports no torch (a test checks
# they agree); the objectives' names come from their table (grpo/objectives.py, which imports no torch).
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
OVERLONG_REWARD = "soft_overlong_punishment"  # DAPO's length penalty (rewards/length.py), optional
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
    dataset_name: Optional[str] = setting(
        None,
        "Your own dataset instead of the three built-in sources: local .json/.jsonl/.parquet/.csv file(s) ({split} "
        "in the path is replaced by the split) or a hub id, with a 'prompt' column (a string or a list of "
        "{role, content} messages), an 'answer' column and an optional 'db_set' (data/custom.py).",
    )
    dataset_config: Optional[str] = setting(None, "Config name of the hub dataset dataset_name.")
    dataset_train_split: str = setting("train", "Split of dataset_name to train on.")
    dataset_test_split: Optional[str] = setting(
        None, "Split of dataset_name held out for eval_steps and evaluate.py (None = none)."
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
    vllm_mode: str = setting(
        "colocate",
        "colocate: a vLLM engine inside each training process, on its GPU; server: a vLLM server started apart "
        "(GPUs or a node of its own, from the folder scripts/export_base.py writes), reached over HTTP "
        "(docs/SAMPLING.md, Server mode). TRL's name.",
        choices=["colocate", "server"],
    )
    vllm_server_base_url: Optional[str] = setting(
        None, "Server mode: the server's URL, e.g. http://10.0.0.2:8000; when set, host and port are ignored."
    )
    vllm_server_host: str = setting("0.0.0.0", "Server mode: the server's host (0.0.0.0 = this machine).")
    vllm_server_port: int = setting(8000, "Server mode: the server's port.")
    vllm_server_timeout: float = setting(
        240.0,
        "Server mode: seconds to wait for the server at start, and to retry (with backoff) a request that fails "
        "mid-run before the run saves a checkpoint and stops.",
    )
    vllm_server_adapter_dir: Optional[str] = setting(
        None,
        "Server mode: a folder the server can read, where the adapter is written each step (None = a new folder "
        "in /dev/shm or the temp dir, for a server on the same machine; a separate node needs a shared folder).",
    )
    async_generation: bool = setting(
        False,
        "Sample the next rollout while this step trains (verl's one-step-off): it comes from the policy one "
        "optimiser step behind, which the importance-sampling correction weighs (sample/staleness_mean logs the "
        "lag; 1, bounded by construction). Overlaps only in server mode; exact resume is kept (docs/SAMPLING.md).",
    )
    vllm_gpu_memory_utilization: float = setting(0.5, "Fraction of GPU memory vLLM may take (colocated).")
    vllm_max_model_len: Optional[int] = setting(
        None, "vLLM max_model_len (None = max_prompt_length + max_completion_length)."
    )
    vllm_enable_sleep_mode: bool = setting(
        False,
        "Colocated vLLM sleeps between generations (TRL's name): its KV cache is freed and its weights go to host "
        "RAM while the trainer runs (llm.sleep / llm.wake_up, a host-device copy each step). CUDA only.",
    )
    vllm_enforce_eager: Optional[bool] = setting(
        None,
        "vLLM without CUDA graphs (TRL's enforce_eager). None = false on a GPU (TRL's default), true on CPU.",
    )
    # ----------------------------------------------------------------- GRPO (TRL 1.16's names and semantics)
    beta: float = setting(0.04, "KL penalty coefficient (0 = no reference model pass).")
    epsilon: float = setting(0.2, "Lower clip range: ratio is clipped below 1 - epsilon.")
    epsilon_high: Optional[float] = setting(
        None, "Upper clip range (None = epsilon); DAPO uses 0.28. For cispo: the cap of the IS weight."
    )
    delta: Optional[float] = setting(
        None, "INTELLECT-2's two-sided clipping: the unclipped ratio is capped at delta (None = off; > 1)."
    )
    clip_ratio_c: Optional[float] = setting(
        None,
        "verl's dual-clip PPO: lower bound -c * A on the loss of negative-advantage tokens (None = off; > 1).",
    )
    loss_type: str = setting(
        "grpo",
        "Objective and aggregation (docs/OBJECTIVES.md): grpo (mean of per-sequence token means), bnpo, dapo "
        "(token mean over the batch), dr_grpo (token sum / (N * max_completion_length)), cispo, sapo, luspo, "
        "vespo (TRL 1.16), gmpo (verl's geometric mean).",
        choices=list(LOSS_TYPES),
    )
    importance_sampling_level: str = setting(
        "token",
        "token: one ratio per token; sequence (GSPO): the mean log-ratio over each sequence, one ratio per sequence.",
        choices=list(IMPORTANCE_SAMPLING_LEVELS),
    )
    sapo_temperature_pos: float = setting(1.0, "sapo: temperature of the soft gate for positive advantages.")
    sapo_temperature_neg: float = setting(1.05, "sapo: temperature of the soft gate for negative advantages.")
    vespo_k_pos: float = setting(2.0, "vespo: shape k of the gamma weight for advantages >= 0.")
    vespo_lambda_pos: float = setting(3.0, "vespo: rate lambda of the gamma weight for advantages >= 0.")
    vespo_k_neg: float = setting(3.0, "vespo: shape k of the gamma weight for advantages < 0.")
    vespo_lambda_neg: float = setting(2.0, "vespo: rate lambda of the gamma weight for advantages < 0.")
    scale_rewards: str = setting(
        "group",
        "Advantage scale: group std, batch std (of the whole batch of all processes), or none (Dr. GRPO).",
        choices=["group", "batch", "none"],
    )
    multi_objective_aggregation: str = setting(
        "sum_then_normalize",
        "sum_then_normalize: weighted sum of the rewards, then group-normalised; normalize_then_sum (GDPO): "
        "each reward normalised in its group, weighted sum, then normalised over the batch.",
        choices=["sum_then_normalize", "normalize_then_sum"],
    )
    num_iterations: int = setting(
        1, "mu: passes of policy updates over each rollout (old log-probs are kept when > 1)."
    )
    steps_per_generation: Optional[int] = setting(
        None,
        "Micro-steps per rollout (TRL): one rollout of per_device_train_batch_size x steps_per_generation prompts "
        "per process feeds steps_per_generation / gradient_accumulation_steps optimiser steps. "
        "None = gradient_accumulation_steps (one optimiser step per rollout).",
    )
    kl_estimator: str = setting("k3", "KL estimator of the penalty.", choices=list(KL_ESTIMATORS))
    use_bias_correction_kl: bool = setting(
        False,
        "Multiply the KL term by the importance ratio (gradient kept; TRL's semantics). TRL 1.16 defaults to "
        "true; the recipe (and TRL before 1.x) uses false.",
    )
    top_entropy_quantile: float = setting(
        1.0,
        "Keep only this share of the tokens, those of highest entropy, in the policy term ('Beyond the 80/20 "
        "rule'); the quantile is over the whole batch of all processes (1.0 = every token).",
    )
    entropy_coef: float = setting(
        0.0, "Entropy bonus: loss -= entropy_coef * mean token entropy (the initial value when adaptive)."
    )
    use_adaptive_entropy: bool = setting(
        False,
        "TRL's adaptive entropy control: entropy_coef += entropy_coef_delta while the entropy is below "
        "entropy_target, -= otherwise, within [entropy_coef_min, entropy_coef_max]; applied only below the target.",
    )
    entropy_coef_min: float = setting(0.0, "Adaptive entropy control: lowest entropy_coef.")
    entropy_coef_max: float = setting(1.0, "Adaptive entropy control: highest entropy_coef.")
    entropy_coef_delta: float = setting(
        0.005, "Adaptive entropy control: step of entropy_coef per optimiser step."
    )
    entropy_target: float = setting(0.2, "Adaptive entropy control: the target mean token entropy (nats).")
    off_policy_mask_threshold: Optional[float] = setting(
        None,
        "DeepSeek-V3.2's off-policy sequence mask: leave out sequences with a negative advantage whose mean "
        "KL(sampler || policy) per token exceeds this (None = off).",
    )
    mask_truncated_completions: bool = setting(
        False, "Leave completions cut at max_completion_length out of the loss."
    )
    dynamic_sampling: bool = setting(
        False,
        "DAPO's dynamic sampling (verl filter_groups): drop groups whose rewards all agree and keep sampling "
        "prompts until the batch is full of informative groups (at most max_sampling_rounds rounds).",
    )
    max_sampling_rounds: int = setting(
        10,
        "dynamic_sampling: rounds of sampling per rollout before training on what there is (verl's default).",
    )
    reward_funcs: list[str] = setting(
        list(REWARD_FUNC_NAMES),
        "Reward functions: names in rewards/ (the five of the recipe, soft_overlong_punishment) or a user's own "
        "as an import path 'package.module:function'.",
    )
    reward_weights: Optional[list[float]] = setting(None, "One weight per reward function (None = 1.0 each).")
    reward_num_workers: int = setting(
        4,
        "Threads that run the reward functions which declare fn.thread_safe = True at the same time (0 = in "
        "turn with the others); async def functions are always awaited together (docs/REWARDS.md).",
    )
    reward_timeout: Optional[float] = setting(
        None,
        "Seconds one reward function may take on a rollout's completions; past it the run stops with a "
        "checkpoint and one line naming it (None = no limit).",
    )
    judge_base_url: str = setting(
        "http://127.0.0.1:8000/v1",
        "rewards.judge: the OpenAI-compatible endpoint of the judge model (a vLLM server, or any); an API key, "
        "if it needs one, comes from the environment variable OPENAI_API_KEY.",
    )
    judge_model: Optional[str] = setting(
        None,
        "rewards.judge: the model name the judge endpoint serves (needed when reward_funcs names a judge).",
    )
    judge_timeout: float = setting(
        60.0, "rewards.judge: seconds one judge request may take (retried twice, then the run stops)."
    )
    judge_max_concurrency: int = setting(16, "rewards.judge: judge requests in flight at once.")
    soft_punish_cache: int = setting(
        256,
        "soft_overlong_punishment: the penalty starts this many tokens before max_completion_length (DAPO).",
    )
    vllm_importance_sampling_correction: bool = setting(
        True,
        "With the vLLM sampler, weight each token's policy term by pi_trainer / pi_sampler of the sampled "
        "tokens (TRL's truncated / masked importance sampling).",
    )
    vllm_importance_sampling_mode: str = setting(
        "sequence_mask",
        "token_truncate, token_mask (per-token weights), sequence_truncate, sequence_mask (one weight per "
        "sequence): *_truncate clamps to [clip_min, clip_max], *_mask zeroes the weights outside.",
        choices=list(SAMPLER_IS_MODES),
    )
    vllm_importance_sampling_clip_min: Optional[float] = setting(
        None, "Lower bound of the IS weights (None = 0)."
    )
    vllm_importance_sampling_clip_max: Optional[float] = setting(
        3.0, "Upper bound of the IS weights (None = none)."
    )
    vllm_importance_sampling_cap: Optional[float] = setting(
        None, "Deprecated name (TRL) of vllm_importance_sampling_clip_max; when set it replaces it."
    )
    share_prompt_forward: bool = setting(
        True,
        "Run each prompt once per group in the log-prob passes (models/packing.py: [prompt | c1 | ... | cG] "
        "with a block attention mask); false = one row per completion. Same numbers either way.",
    )
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
    overwrite_output_dir: bool = setting(
        False,
        "Start a fresh run in an output_dir that holds another run's checkpoints / metrics (deleting them).",
    )
    logging_steps: int = setting(
        1, "Log metrics (console line, report_to sinks) every this many steps; metrics.jsonl gets every step."
    )
    log_completions: bool = setting(
        False, "Print sampled completions (with gold answer and reward) when logging."
    )
    num_completions_to_print: Optional[int] = setting(
        None, "How many completions log_completions prints (None = 1)."
    )
    save_steps: int = setting(100, "Write a checkpoint every this many steps.")
    save_total_limit: Optional[int] = setting(
        None, "Keep at most this many checkpoints, deleting the oldest (None = all)."
    )
    eval_steps: int = setting(0, "Score a small fixed evaluation subset every this many steps (0 = off).")
    eval_size: int = setting(16, "Prompts per evaluation source in the eval_steps subset.")
    report_to: str = setting(
        "none",
        "Extra metric sink: tensorboard, wandb or trackio (the last two when installed).",
        choices=["none", "tensorboard", "wandb", "trackio"],
    )
    resume_from_checkpoint: Optional[str] = setting(
        None, "A checkpoint folder, or 'latest' for the newest intact one in output_dir."
    )

    def __post_init__(self) -> None:
        from grpo.validation import validate  # the rules live next door (grpo/validation.py)

        validate(self)

    @property
    def effective_epsilon_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high

    @property
    def effective_clip_max(self) -> Optional[float]:
        """vllm_importance_sampling_clip_max, or the deprecated vllm_importance_sampling_cap when set."""
        return self.vllm_importance_sampling_cap or self.vllm_importance_sampling_clip_max

    def loss_settings(self) -> LossSettings:
        """The objective this config chooses: ``grpo.loss.policy_loss``'s settings (docs/OBJECTIVES.md)."""
        return LossSettings(
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            eps_low=self.epsilon,
            eps_high=self.effective_epsilon_high,
            delta=self.delta,
            clip_ratio_c=self.clip_ratio_c,
            beta=self.beta,
            kl_estimator=self.kl_estimator,
            max_completion_length=self.max_completion_length,
            sapo_temperature_pos=self.sapo_temperature_pos,
            sapo_temperature_neg=self.sapo_temperature_neg,
            vespo_k_pos=self.vespo_k_pos,
            vespo_lambda_pos=self.vespo_lambda_pos,
            vespo_k_neg=self.vespo_k_neg,
            vespo_lambda_neg=self.vespo_lambda_neg,
            bias_correction_kl=self.use_bias_correction_kl,
        )

    @property
    def effective_steps_per_generation(self) -> int:
        return self.steps_per_generation or self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


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
