"""Our GRPO trainer against TRL 1.16's ``GRPOTrainer`` on the same work: step time per phase, peak memory,
learning, and the loss and gradient of both on one identical batch.

    pip install -e ".[bench]"                                   # TRL 1.16.0, pinned
    python scripts/bench_vs_trl.py                              # the embedded default, 60 steps, 3 pairs
    python scripts/bench_vs_trl.py --steps 10 --pairs 1         # a quick look
    python scripts/bench_vs_trl.py --config FILE --field value  # any config; GRPOConfig fields override it
    python scripts/bench_vs_trl.py --preset smollm2 --steps 20 --pairs 1  # SmolLM2-135M-Instruct, cold-started
                                                                # (scripts/cold_start.py first, README)

What both trainers get (each run in a process of its own, so that peak memory is its own):

- the same model: ``models.policy.load_base_model`` (4-bit NF4 unless ``load_in_4bit: false``) and
  ``peft.prepare_model_for_kbit_training``, then the same ``LoraConfig``; ours adds it in ``load_policy``, TRL
  in its constructor (``peft_config``). Both seed the LoRA initialisation with the run's seed, so both
  start from the same adapter (the same-batch check verifies it).
- the same rows, in the same order: the first ``steps x prompts`` rows of our training stream
  (``data.mixture.build_train_dataset(cfg, tokenizer).rows(0, n)``), given to TRL as a ``datasets.Dataset``
  with ``shuffle_dataset=False``.
- the same reward functions (``rewards.REWARD_FUNCS``), called by TRL in its own convention (keyword
  arguments, completions as ``[{"role": "assistant", "content": ...}]``, the ``answer`` / ``db_set`` columns).
- the same settings, mapped by ``trl_grpo_config``: TRL counts ``per_device_train_batch_size`` in completions
  (ours: prompts x G), its ``loss_type`` default is ``dapo`` (set from ours), ``use_bias_correction_kl`` is set
  from ours (TRL's default is True), sampling is HF ``generate`` on both sides with the same temperature,
  top-p and top-k, the same 8-bit AdamW, schedule, warm-up steps, clipping, and precision.

Measured, interleaved A B B A ... over ``--pairs`` pairs (pair k uses seed ``seed + k`` on both sides):

- step time per phase. Ours: the ``time/*`` metrics of ``grpo.trainer.grpo_step`` (the sampler's
  ``generate`` timed apart from scoring). TRL: its methods timed in place: ``_generate`` (generate),
  ``_generate_and_score_completions`` minus generate and the no-grad log-prob passes (score),
  ``_get_per_token_logps_and_entropies`` without grad (old/reference log-probs), ``training_step`` minus
  ``_prepare_inputs`` (forward + backward), and the rest of the optimiser step after the last backward
  (clipping, optimiser, schedule). The step is ``grpo_step`` for ours and TRL's ``on_step_begin`` to
  ``on_step_end``; the first step of each run is a warm-up and is left out of the medians.
- peak memory: the process's resident memory sampled every 20 ms during training on CPU (and its high-water
  mark since start); ``torch.cuda.max_memory_allocated`` during training on a GPU.
- learning: reward gain = mean reward of the last quarter of the steps minus that of the first quarter,
  per run, with its standard error over the pairs.
- same batch: one rollout sampled by ours, its advantages and reference log-probs; then our loss and gradient
  (``grpo.trainer.policy_update``) and TRL's (``GRPOTrainer._compute_loss`` on the same prompts, completions
  and advantages, with TRL's own reference pass), on the same adapter (LoRA B perturbed so that the KL term
  is not zero), on-policy and with old log-probs moved off-policy (so that clipping is exercised).

Where the two cannot do exactly the same work:

1. Sampling draws different random numbers: ours draws each completion from its own seeded stream
   (Gumbel-max, ``models/hf_sampler.py``), TRL from the global stream (``do_sample=True``). Same distribution,
   different completions, so the two runs of a pair see different completions and rewards.
2. TRL casts the LoRA weights of a 4-bit model to bfloat16; ours keeps them in float32. The benchmark puts
   TRL's back to the exact float32 initial values (``--trl-adapter-dtype fp32``, the default) so that both
   train the same parameters; ``--trl-adapter-dtype bf16`` keeps TRL's own choice.
3. TRL 1.16 has no ``max_prompt_length``: the rows given to both were already filtered by ours.
4. TRL's log-prob passes give left-padded rows positions counted from the padding (its ``generate`` counts
   from the first real token, as ours does everywhere); with rotary positions only float rounding differs
   (the same-batch check reports the reference log-prob difference).

The same work done differently, on purpose (the point of a hand-written trainer): ours runs each prompt once
per group in the log-prob passes (``share_prompt_forward``), its sampler dequantises a 4-bit base once per
``generate`` call, and it encodes prompts before the sampler (counted in "score"; TRL's tokenisation is in
its ``_generate``). Resident memory includes each library's imports: "RSS after setup" is the baseline.

Prints a table and writes JSON (command, machine, versions, every run's figures, medians, ours/TRL ratios).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from grpo.config import GRPOConfig, load_config  # noqa: E402

DEFAULT_CONFIG = "scripts/configs/tiny-cpu.yaml"
# --preset NAME: a shipped config. smollm2 trains a real model (SmolLM2-135M-Instruct after its cold start, the
# shipped PubMedQA / GSM8K rows); its model folder is made by scripts/cold_start.py with the same config.
PRESETS = {"tiny": DEFAULT_CONFIG, "smollm2": "scripts/configs/smollm2-cpu.yaml"}
TRAINERS = ("ours", "trl")
PHASES = ("generate", "score", "old_ref_logprobs", "forward_backward", "optimizer", "other")
PHASE_NAMES = {
    "generate": "generate",
    "score": "score (+ rollout bookkeeping)",
    "old_ref_logprobs": "old/ref log-probs",
    "forward_backward": "forward+backward",
    "optimizer": "optimizer (clip, step)",
    "other": "other",
}
# Perturbation of LoRA B in the same-batch check: the policy moves off the reference, so the KL term counts.
LORA_B_PERTURBATION = 0.05
# Off-policy variant of the same-batch check: old log-probs = current + this x N(0, 1), so ratios get clipped.
OLD_LOGP_SHIFT = 0.3


class NotComparable(ValueError):
    """A setting that TRL 1.16 cannot reproduce, so the two trainers would not do the same work."""


# ============================================================================ small pure functions


def reward_gain(rewards: Sequence[float]) -> float:
    """Mean reward of the last quarter of the steps minus that of the first quarter (at least one step each).

    rewards: one mean reward per optimiser step, in order.

    Example: 8 steps [0, 1, 1, 2, 2, 3, 3, 4]: quarters of 2 steps, first mean 0.5, last mean 3.5 -> 3.0.
    With 3 steps [1, 5, 2] a quarter is 1 step: 2 - 1 = 1.0.
    """
    if not rewards:
        raise ValueError("reward_gain needs at least one step's reward")
    quarter = max(1, len(rewards) // 4)
    return statistics.fmean(rewards[-quarter:]) - statistics.fmean(rewards[:quarter])


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float | None]:
    """(mean, standard error of the mean) = (mean, sample std / sqrt(n)); the error is None for one value.

    Example: [1, 2, 3] -> mean 2.0, sample std 1.0, standard error 1 / sqrt(3) = 0.5774.
    """
    if not values:
        raise ValueError("mean_and_stderr needs at least one value")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, None
    return mean, statistics.stdev(values) / math.sqrt(len(values))


def pair_order(pairs: int) -> list[tuple[int, str]]:
    """(pair, trainer) in the order the runs go: A B, B A, A B, ... so that neither trainer always runs first
    (a machine that warms up, or gets busier, favours neither).

    Example: 3 pairs -> (0, ours) (0, trl) (1, trl) (1, ours) (2, ours) (2, trl).
    """
    order = []
    for pair in range(pairs):
        first, second = TRAINERS if pair % 2 == 0 else TRAINERS[::-1]
        order += [(pair, first), (pair, second)]
    return order


def relative_difference(ours: torch.Tensor, reference: torch.Tensor) -> float:
    """||ours - reference|| / ||reference|| (Frobenius norms; 0 when both are zero).

    Example: ours [3, 4.001], reference [3, 4] -> 0.001 / 5 = 2e-4.
    """
    ours, reference = ours.double().flatten(), reference.double().flatten()
    scale = reference.norm().item()
    difference = (ours - reference).norm().item()
    return difference / scale if scale > 0 else difference


def prompts_fingerprint(rows: Sequence[dict]) -> str:
    """A short hash of the set of prompts in ``rows``: equal on both sides when a step saw the same prompts.

    Order-free and repeat-free, because TRL holds each prompt G times and shuffles a batch's rows.
    """
    unique = sorted({json.dumps(row["prompt"], sort_keys=True) for row in rows})
    return hashlib.sha1(json.dumps(unique).encode()).hexdigest()[:12]


def phase_seconds(record: dict[str, Any], *names: str) -> float:
    """The first of ``time/<name>`` that ``record`` (a ``grpo_step`` record) holds, summed over the names of
    one alternative separated by ``+`` (e.g. ``"generate+score"``); 0.0 when none is there."""
    for name in names:
        keys = [f"time/{part}" for part in name.split("+")]
        if all(key in record for key in keys):
            return float(sum(record[key] for key in keys))
    return 0.0


# ============================================================================ the shared settings


def bench_config(config_path: str, overrides: Sequence[str], steps: int, seed: int | None, output_dir: str):
    """Our GRPOConfig for one run: the config file, the user's ``--field value`` overrides, then the run's
    steps, seed and output folder."""
    argv = ["--config", config_path, *overrides, "--max_steps", str(steps), "--output_dir", output_dir]
    argv += ["--overwrite_output_dir", "true"]
    if seed is not None:
        argv += ["--seed", str(seed)]
    return load_config(argv)


def check_comparable(cfg: GRPOConfig) -> None:
    """Raise NotComparable naming the field when ``cfg`` asks for something TRL 1.16 does not do."""
    from models.samplers import choose_sampler
    from rewards import REWARD_FUNCS

    problems = []
    # auto means vLLM on a GPU where it imports (the import is slow: only asked there)
    auto_vllm = cfg.sampler == "auto" and torch.cuda.is_available() and choose_sampler("auto")[0] == "vllm"
    if cfg.sampler == "vllm" or auto_vllm:
        problems.append(
            f"sampler={cfg.sampler} is vLLM here: this benchmark runs HF generate on both sides; set --sampler hf"
        )
    if cfg.kl_estimator != "k3":
        problems.append(f"kl_estimator={cfg.kl_estimator!r}: TRL only has k3")
    if cfg.loss_type == "gmpo":
        problems.append("loss_type='gmpo' is verl's, not TRL's")
    if cfg.clip_ratio_c is not None:
        problems.append("clip_ratio_c (verl's dual clip) has no TRL counterpart")
    if cfg.dynamic_sampling:
        problems.append("dynamic_sampling (DAPO / verl filter_groups) has no TRL counterpart")
    unknown = [spec for spec in cfg.reward_funcs if spec not in REWARD_FUNCS and ":" not in spec]
    if unknown:
        problems.append(
            f"reward_funcs {unknown}: TRL would not pass them max_completion_length; use the recipe's five "
            "or your own TRL-style functions by import path"
        )
    if problems:
        raise NotComparable("; ".join(problems))


def trl_grpo_config(cfg: GRPOConfig, output_dir: str):
    """TRL 1.16's GRPOConfig for the same work as ours with ``cfg``.

    The traps: TRL counts ``per_device_train_batch_size`` in completions (ours in prompts, each with G); its
    defaults differ from ours in ``loss_type`` (dapo), ``use_bias_correction_kl`` (True), ``shuffle_dataset``
    (True), ``gradient_checkpointing`` (True), ``bf16`` (True unless fp16) and the warm-up (ours:
    ``ceil(warmup_ratio x max_steps)`` steps), so every one of them is set here from ``cfg``.
    """
    from trl import GRPOConfig as TRLGRPOConfig

    from models.policy import default_device, resolve_dtype

    check_comparable(cfg)
    dtype = resolve_dtype(cfg.dtype, default_device())
    return TRLGRPOConfig(
        output_dir=output_dir,
        # the batch: one rollout of P prompts x G completions per optimiser step, rows in stream order
        per_device_train_batch_size=cfg.per_device_train_batch_size * cfg.num_generations,
        num_generations=cfg.num_generations,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        steps_per_generation=cfg.effective_steps_per_generation,
        num_iterations=cfg.num_iterations,
        max_steps=cfg.max_steps,
        shuffle_dataset=False,
        # sampling: HF generate, the same distribution
        use_vllm=False,
        max_completion_length=cfg.max_completion_length,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        min_p=None,
        repetition_penalty=1.0,
        # the objective
        beta=cfg.beta,
        epsilon=cfg.epsilon,
        epsilon_high=cfg.epsilon_high,
        delta=cfg.delta,
        loss_type=cfg.loss_type,
        importance_sampling_level=cfg.importance_sampling_level,
        scale_rewards=cfg.scale_rewards,
        multi_objective_aggregation=cfg.multi_objective_aggregation,
        reward_weights=cfg.reward_weights,
        use_bias_correction_kl=cfg.use_bias_correction_kl,
        mask_truncated_completions=cfg.mask_truncated_completions,
        top_entropy_quantile=cfg.top_entropy_quantile,
        entropy_coef=cfg.entropy_coef,
        use_adaptive_entropy=cfg.use_adaptive_entropy,
        entropy_coef_min=cfg.entropy_coef_min,
        entropy_coef_max=cfg.entropy_coef_max,
        entropy_coef_delta=cfg.entropy_coef_delta,
        entropy_target=cfg.entropy_target,
        off_policy_mask_threshold=cfg.off_policy_mask_threshold,
        sapo_temperature_pos=cfg.sapo_temperature_pos,
        sapo_temperature_neg=cfg.sapo_temperature_neg,
        vespo_k_pos=cfg.vespo_k_pos,
        vespo_lambda_pos=cfg.vespo_lambda_pos,
        vespo_k_neg=cfg.vespo_k_neg,
        vespo_lambda_neg=cfg.vespo_lambda_neg,
        # optimisation
        optim="adamw_bnb_8bit" if cfg.optim == "adamw_8bit" else "adamw_torch",
        learning_rate=cfg.learning_rate,
        adam_beta1=cfg.adam_beta1,
        adam_beta2=cfg.adam_beta2,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type="constant_with_warmup"
        if cfg.lr_scheduler_type == "constant"
        else cfg.lr_scheduler_type,
        warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        max_grad_norm=cfg.max_grad_norm,
        gradient_checkpointing=cfg.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        seed=cfg.seed,
        # quiet, and nothing written during the run
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        log_completions=False,
        dataloader_num_workers=0,
        dataloader_pin_memory=False,
    )


def prompts_per_rollout(cfg: GRPOConfig) -> int:
    return cfg.per_device_train_batch_size * cfg.effective_steps_per_generation


def training_rows(cfg: GRPOConfig, tokenizer: Any, count: int) -> list[dict]:
    """The first ``count`` rows of our training stream (what ours trains on, in that order)."""
    from data.mixture import build_train_dataset

    return build_train_dataset(cfg, tokenizer).rows(0, count)


def rows_for_steps(cfg: GRPOConfig) -> int:
    """Prompts that ``cfg.max_steps`` optimiser steps consume (whole rollouts)."""
    steps_per_rollout = cfg.effective_steps_per_generation // cfg.gradient_accumulation_steps
    return math.ceil(cfg.max_steps / steps_per_rollout) * prompts_per_rollout(cfg)


# ============================================================================ TRL, set up as ours


def build_trl_trainer(cfg: GRPOConfig, output_dir: str, rows: list[dict] | None, adapter_dtype: str = "fp32"):
    """TRL's GRPOTrainer on our model, rows and rewards. Returns (trainer, its initial adapter in float32).

    TRL casts the adapter of a 4-bit model to bfloat16 inside its constructor; the float32 values it had a
    moment before are kept (by wrapping the ``get_peft_model`` that TRL calls) and, with ``adapter_dtype
    "fp32"``, put back, so that TRL trains the same float32 parameters as ours from the same start.
    """
    import datasets
    import trl.trainer.grpo_trainer as trl_grpo
    from peft import prepare_model_for_kbit_training
    from transformers import PrinterCallback

    from models.policy import default_device, load_base_model, load_tokenizer, lora_config, resolve_model_path
    from rewards import resolve_reward_func

    path = resolve_model_path(cfg.model_name_or_path)
    tokenizer = load_tokenizer(path, cfg.trust_remote_code, cfg.model_name_or_path)
    if rows is None:
        rows = training_rows(cfg, tokenizer, rows_for_steps(cfg))
    model = load_base_model(cfg, default_device(), path=path)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    if cfg.load_in_4bit:  # as models.policy.load_policy does
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=cfg.gradient_checkpointing, **checkpointing
        )

    initial: dict[str, torch.Tensor] = {}
    trl_get_peft_model = trl_grpo.get_peft_model

    def get_peft_model_keeping_initial(base, config, **kwargs):
        peft_model = trl_get_peft_model(base, config, **kwargs)
        initial.update({n: p.detach().clone() for n, p in peft_model.named_parameters() if p.requires_grad})
        return peft_model

    trl_grpo.get_peft_model = get_peft_model_keeping_initial
    try:
        trainer = trl_grpo.GRPOTrainer(
            model=model,
            reward_funcs=[resolve_reward_func(spec) for spec in cfg.reward_funcs],
            args=trl_grpo_config(cfg, output_dir),
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=tokenizer,
            peft_config=lora_config(cfg),  # the adapter load_policy builds
        )
    finally:
        trl_grpo.get_peft_model = trl_get_peft_model
    if adapter_dtype == "fp32":
        for name, param in trainer.model.named_parameters():
            if name in initial:
                param.data = initial[name].clone()
    trainer.remove_callback(PrinterCallback)  # one dict printed per step otherwise
    return trainer, initial


def wrap_timed(owner: Any, method: str, on_done: Callable[[float, float], None]) -> None:
    """Replace ``owner.method`` (on this instance only) by a call that reports (seconds, end time)."""
    original = getattr(owner, method)

    def timed(*args, **kwargs):
        started = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            ended = time.perf_counter()
            on_done(ended - started, ended)

    setattr(owner, method, timed)


def wrap_seen(owner: Any, method: str, see: Callable[..., None]) -> None:
    """Replace ``owner.method`` (on this instance only) by a call that first shows its arguments to ``see``."""
    original = getattr(owner, method)

    def seen(*args, **kwargs):
        see(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, method, seen)


def trl_step_recorder(trainer: Any) -> list[dict[str, Any]]:
    """Time TRL's phases in place and return the list that each optimiser step's record is appended to
    (``step_time``, ``phases``, ``prompts`` fingerprint, ``reward``)."""
    from transformers import TrainerCallback

    seconds: dict[str, float] = defaultdict(float)
    marks: dict[str, float] = {}
    steps: list[dict[str, Any]] = []

    def add(key: str) -> Callable[[float, float], None]:
        def done(elapsed: float, ended: float) -> None:
            seconds[key] += elapsed
            marks[key] = ended

        return done

    def add_no_grad_logprobs(elapsed: float, ended: float) -> None:
        if not torch.is_grad_enabled():  # the old / reference passes; the training forward has grad
            seconds["old_ref_logprobs"] += elapsed

    for method, key in (
        ("_generate", "generate"),
        ("_generate_and_score_completions", "generate_and_score"),
        ("_prepare_inputs", "prepare_inputs"),
        ("training_step", "training_step"),
    ):
        wrap_timed(trainer, method, add(key))
    wrap_timed(trainer, "_get_per_token_logps_and_entropies", add_no_grad_logprobs)
    rollout_prompts: list[str] = []  # the fingerprint of the rollout that feeds the current step
    wrap_seen(
        trainer,
        "_generate_and_score_completions",
        lambda inputs: rollout_prompts.append(prompts_fingerprint(inputs)),
    )

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            seconds.clear()
            marks["begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            ended = time.perf_counter()
            phases = {
                "generate": seconds["generate"],
                "score": seconds["generate_and_score"] - seconds["generate"] - seconds["old_ref_logprobs"],
                "old_ref_logprobs": seconds["old_ref_logprobs"],
                "forward_backward": seconds["training_step"] - seconds["prepare_inputs"],
                "optimizer": ended - marks.get("training_step", ended),
            }
            step_time = ended - marks["begin"]
            phases["other"] = step_time - sum(phases.values())
            steps.append({"step_time": step_time, "phases": phases, "prompts": rollout_prompts[-1]})

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "reward" in logs and steps:
                steps[-1]["reward"] = float(logs["reward"])

    trainer.add_callback(StepTimer())
    return steps


# ============================================================================ memory


class PeakMemory:
    """Peak memory of this process while the block runs: resident memory (RSS) sampled every 20 ms, and on a
    GPU ``torch.cuda.max_memory_allocated`` (reset on entry). Figures in GiB."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.peak_rss = 0
        self.start_rss = 0
        self.cuda_peak: int | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self.start_rss = self.peak_rss = self.process.memory_info().rss
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self.process.memory_info().rss)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            self.cuda_peak = torch.cuda.max_memory_allocated()

    def figures(self) -> dict[str, float | None]:
        gib = 2**30
        return {
            "rss_after_setup_gib": self.start_rss / gib,
            "peak_rss_training_gib": self.peak_rss / gib,
            "peak_rss_process_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / gib,
            "cuda_peak_allocated_gib": None if self.cuda_peak is None else self.cuda_peak / gib,
        }


# ============================================================================ one run (in a child process)


def run_ours(cfg: GRPOConfig) -> dict[str, Any]:
    """Train ``cfg.max_steps`` steps with our trainer; one record per optimiser step."""
    from grpo.trainer import grpo_step, setup

    started = time.perf_counter()
    run = setup(cfg)
    generate_seconds: list[float] = []
    # the rollout's sampler call (HF generate draws the completions inside submit, before it returns)
    wrap_timed(run.sampler, "submit", lambda elapsed, ended: generate_seconds.append(elapsed))
    read_rows = run.train_data.rows
    rollout_prompts: list[str] = []

    def rows_seen(start: int, count: int) -> list[dict]:
        rows = read_rows(start, count)
        rollout_prompts.append(prompts_fingerprint(rows))
        return rows

    run.train_data.rows = rows_seen
    setup_seconds = time.perf_counter() - started
    steps = []
    with PeakMemory() as memory:
        while run.state.step < cfg.max_steps:
            calls_before = len(generate_seconds)
            step_started = time.perf_counter()
            records = grpo_step(run)
            elapsed = time.perf_counter() - step_started
            share = 1 / len(records)  # a rollout's time/* are its totals, on each of its records
            record = records[0]
            generate = sum(generate_seconds[calls_before:])
            rollout = phase_seconds(record, "generate_and_score", "generate+score", "rollout")
            phases = {
                "generate": generate * share,
                "score": (rollout - generate) * share,
                "old_ref_logprobs": phase_seconds(record, "old_ref_logprobs", "old_logprobs+ref_logprobs")
                * share,
                "forward_backward": phase_seconds(record, "policy_update", "forward_backward") * share,
                "optimizer": phase_seconds(record, "optimizer") * share,
            }
            phases["other"] = elapsed * share - sum(phases.values())
            for item in records:
                steps.append(
                    {
                        "step_time": elapsed * share,
                        "phases": dict(phases),
                        "prompts": rollout_prompts[-1],
                        "reward": item["reward"],
                    }
                )
    run.sampler.close()
    return {"setup_seconds": setup_seconds, "steps": steps, **memory.figures()}


def run_trl(cfg: GRPOConfig, adapter_dtype: str) -> dict[str, Any]:
    """Train ``cfg.max_steps`` steps with TRL's GRPOTrainer on the same model, rows and rewards."""
    started = time.perf_counter()
    trainer, _ = build_trl_trainer(cfg, cfg.output_dir, rows=None, adapter_dtype=adapter_dtype)
    steps = trl_step_recorder(trainer)
    setup_seconds = time.perf_counter() - started
    with PeakMemory() as memory:
        trainer.train()
    missing = [i for i, s in enumerate(steps) if "reward" not in s]
    if missing:
        raise RuntimeError(f"TRL logged no reward for step(s) {missing[:5]}")
    return {"setup_seconds": setup_seconds, "steps": steps, **memory.figures()}


# ============================================================================ the same-batch check


def adapter_state(model: Any) -> dict[str, torch.Tensor]:
    """{name: float32 copy} of the trainable (LoRA) parameters."""
    return {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}


def gradients(model: Any) -> dict[str, torch.Tensor]:
    """{name: float32 copy of .grad} of the trainable parameters (zeros where no gradient arrived)."""
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().float().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def flat(tensors: dict[str, torch.Tensor], names: Sequence[str]) -> torch.Tensor:
    return torch.cat([tensors[n].flatten().cpu() for n in names])


def perturb_lora_b(model: Any, seed: int, scale: float) -> None:
    """Set every LoRA B matrix to ``scale x N(0, 1)`` (seeded): the policy moves off the reference (B = 0)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                noise = torch.randn(param.shape, generator=generator) * scale
                param.copy_(noise.to(param.device, param.dtype))


def trl_loss_inputs(batch: Any) -> dict[str, Any]:
    """The inputs of TRL's ``_compute_loss`` for our step batch (a ``grpo.rollout.StepBatch``): the same
    left-padded prompts and right-padded completions [N, Lp] / [N, T], the advantages [N] and TRL's token count."""
    p = batch.prompt_len
    return {
        "prompt_ids": batch.input_ids[:, :p],
        "prompt_mask": batch.attention_mask[:, :p],
        "completion_ids": batch.input_ids[:, p:],
        "completion_mask": batch.completion_mask.long(),
        "advantages": batch.advantages,
        "num_items_in_batch": batch.completion_mask.sum(),
    }


def same_batch(cfg: GRPOConfig) -> dict[str, Any]:
    """Our loss and gradient against TRL's on one identical batch (see the module docstring)."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    from grpo.trainer import (
        logprob_options,
        micro_batch_size,
        no_grad_logprobs,
        policy_update,
        prepare_step_batches,
        setup,
    )

    run = setup(cfg)
    policy = run.accelerator.unwrap_model(run.model)
    ours_initial = adapter_state(policy)
    perturb_lora_b(policy, cfg.seed, LORA_B_PERTURBATION)

    # one rollout, scored and normalised by ours, with the reference log-probs of ours (arrows 1-5 of our step)
    G = cfg.num_generations
    [batch], rollout = prepare_step_batches(run)
    groups = rollout.groups
    rewards_per_func = torch.cat([g.rewards_per_func for g in groups])
    options = logprob_options(cfg, run.accelerator.device)
    current_logp, _ = no_grad_logprobs(policy, batch, micro_batch_size(cfg), options)

    # TRL on the same rows, with our (perturbed) adapter
    with tempfile.TemporaryDirectory() as scratch:
        trainer, trl_initial = build_trl_trainer(
            cfg, scratch, rows=[g.row for g in groups], adapter_dtype="fp32"
        )
    trl_model = trainer.model
    names = sorted(ours_initial)
    if sorted(trl_initial) != names:
        raise RuntimeError("ours and TRL's adapters have different parameters")
    initial_difference = (flat(ours_initial, names) - flat(trl_initial, names)).abs().max().item()
    set_peft_model_state_dict(trl_model, get_peft_model_state_dict(policy))

    # same prompts, same rewards under TRL's calling convention
    prompts = [g.row["prompt"] for g in groups]
    trl_prompt_ids, _, _ = trainer._tokenize_prompts(prompts)
    completion_ids = [c.token_ids for g in groups for c in g.completions]
    texts = trainer.processing_class.batch_decode(completion_ids, skip_special_tokens=True)
    trl_rewards = trainer._calculate_rewards(
        [g.row for g in groups for _ in range(G)],
        [p for p in prompts for _ in range(G)],
        [[{"role": "assistant", "content": text}] for text in texts],
        completion_ids,
    )

    # TRL's inputs for _compute_loss: the same padded tensors, and TRL's own reference pass
    mask = batch.completion_mask
    inputs = trl_loss_inputs(batch)
    with torch.no_grad(), trl_model.disable_adapter():
        trl_ref, _, _ = trainer._get_per_token_logps_and_entropies(
            trl_model,
            torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], dim=1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1),
            mask.shape[1],
            batch_size=trainer.args.per_device_train_batch_size,
        )
    inputs["ref_per_token_logps"] = trl_ref
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which is not running here

    shift = torch.randn(mask.shape, generator=torch.Generator().manual_seed(cfg.seed + 1)) * OLD_LOGP_SHIFT
    variants = {"on_policy": None, "off_policy": current_logp + shift.to(mask.device) * mask}
    results = {}
    for variant, old_logp in variants.items():
        for model in (policy, trl_model):
            model.zero_grad(set_to_none=True)
        if old_logp is not None:
            batch.old_logp = old_logp
            inputs["old_per_token_logps"] = old_logp
        metrics, _ = policy_update(run, batch)
        ours_grads = gradients(policy)
        trl_model.train()
        trl_loss = trainer._compute_loss(trl_model, inputs)
        trl_loss.backward()
        trl_grads = gradients(trl_model)
        ours_flat, trl_flat = flat(ours_grads, names), flat(trl_grads, names)
        results[variant] = {
            "loss_ours": metrics["loss"],
            "loss_trl": trl_loss.item(),
            "loss_rel_diff": abs(metrics["loss"] - trl_loss.item()) / max(abs(trl_loss.item()), 1e-12),
            "grad_rel_diff": relative_difference(ours_flat, trl_flat),
            "grad_norm_ours": ours_flat.norm().item(),
            "grad_norm_trl": trl_flat.norm().item(),
            "kl_ours": metrics.get("kl"),
            "clip_ratio_ours": metrics.get("clip_ratio"),
        }
    run.sampler.close()
    return {
        "completions": len(completion_ids),
        "nonzero_advantages": int((batch.advantages != 0).sum()),
        "prompt_ids_equal": [list(map(int, ids)) for ids in trl_prompt_ids] == [g.prompt_ids for g in groups],
        "rewards_max_abs_diff": (trl_rewards.cpu() - rewards_per_func).abs().max().item(),
        "initial_adapter_max_abs_diff": initial_difference,
        "ref_logp_max_abs_diff": None if batch.ref_logp is None else ((trl_ref - batch.ref_logp) * mask).abs().max().item(),
        **results,
    }


# ============================================================================ the parent: runs, table, JSON


def child_command(kind: str, args: argparse.Namespace, overrides: Sequence[str], seed: int, output: Path):
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--child-output", str(output)]
    command += ["--config", args.config, "--steps", str(args.steps), "--pair-seed", str(seed)]
    command += ["--trl-adapter-dtype", args.trl_adapter_dtype]
    return [*command, *overrides]


def run_child(command: list[str], log_path: Path, output: Path) -> dict[str, Any]:
    """Run one child process, its output in ``log_path``; its result is the JSON it writes to ``output``."""
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, check=False)
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise RuntimeError(
            f"{' '.join(command[2:6])} failed (exit {completed.returncode}); log {log_path}:\n{tail}"
        )
    return json.loads(output.read_text())


def summarize_run(result: dict[str, Any]) -> dict[str, Any]:
    """A run's medians over its steps after the first (a warm-up), and its reward gain over all steps."""
    steps = result["steps"]
    timed = steps[1:] or steps
    return {
        "steps": len(steps),
        "step_seconds": statistics.median(s["step_time"] for s in timed),
        "phases": {p: statistics.median(s["phases"][p] for s in timed) for p in PHASES},
        "reward_first": steps[0]["reward"],
        "reward_last": steps[-1]["reward"],
        "reward_gain": reward_gain([s["reward"] for s in steps]),
    }


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trainer: medians over runs, reward gain mean and standard error; and the ours/TRL ratios."""
    by_trainer = {t: [r for r in runs if r["trainer"] == t] for t in TRAINERS}
    summary: dict[str, Any] = {}
    for trainer, results in by_trainer.items():
        gain, gain_se = mean_and_stderr([r["summary"]["reward_gain"] for r in results])
        memory_key = "cuda_peak_allocated_gib" if results[0]["cuda_peak_allocated_gib"] is not None else None
        summary[trainer] = {
            "runs": len(results),
            "step_seconds": statistics.median(r["summary"]["step_seconds"] for r in results),
            "phases": {p: statistics.median(r["summary"]["phases"][p] for r in results) for p in PHASES},
            "reward_gain_mean": gain,
            "reward_gain_stderr": gain_se,
            "peak_rss_training_gib": statistics.median(r["peak_rss_training_gib"] for r in results),
            "rss_after_setup_gib": statistics.median(r["rss_after_setup_gib"] for r in results),
            "cuda_peak_allocated_gib": statistics.median(r[memory_key] for r in results)
            if memory_key
            else None,
            "setup_seconds": statistics.median(r["setup_seconds"] for r in results),
        }
    pairs = sorted({r["pair"] for r in runs})
    step_of = {(r["pair"], r["trainer"]): r["summary"] for r in runs}
    pair_ratios = [step_of[p, "ours"]["step_seconds"] / step_of[p, "trl"]["step_seconds"] for p in pairs]
    gain_differences = [step_of[p, "ours"]["reward_gain"] - step_of[p, "trl"]["reward_gain"] for p in pairs]
    difference, difference_se = mean_and_stderr(gain_differences)
    ours, trl = summary["ours"], summary["trl"]
    summary["ratio_ours_over_trl"] = {
        "step_seconds": ours["step_seconds"] / trl["step_seconds"],
        "step_seconds_per_pair": pair_ratios,
        "step_seconds_median_of_pairs": statistics.median(pair_ratios),
        "phases": {p: ours["phases"][p] / trl["phases"][p] if trl["phases"][p] > 0 else None for p in PHASES},
        "peak_rss_training": ours["peak_rss_training_gib"] / trl["peak_rss_training_gib"],
    }
    summary["reward_gain_difference"] = {
        "mean": difference,
        "stderr": difference_se,
        "per_pair": gain_differences,
    }
    prompts_of = {(r["pair"], r["trainer"]): [s["prompts"] for s in r["steps"]] for r in runs}
    summary["same_prompts_every_step"] = all(prompts_of[p, "ours"] == prompts_of[p, "trl"] for p in pairs)
    return summary


def format_gain(mean: float, stderr: float | None) -> str:
    return f"{mean:+.3f}" + (f" ± {stderr:.3f}" if stderr is not None else "")


def print_table(report: dict[str, Any]) -> None:
    summary, settings = report["summary"], report["settings"]
    ours, trl, ratio = summary["ours"], summary["trl"], summary["ratio_ours_over_trl"]
    print(
        f"\n{settings['config']}: {settings['steps']} steps x {settings['pairs']} pair(s), interleaved; "
        f"{report['machine']['device']}; load average {report['machine']['load_average_start']}"
    )
    print(f"{'median seconds per step':<32}{'ours':>10}{'TRL':>10}{'ours/TRL':>10}")
    print(
        f"{'whole step':<32}{ours['step_seconds']:>10.3f}{trl['step_seconds']:>10.3f}{ratio['step_seconds']:>10.2f}"
    )
    for phase in PHASES:
        phase_ratio = ratio["phases"][phase]
        shown = f"{phase_ratio:>10.2f}" if phase_ratio is not None and phase != "other" else f"{'':>10}"
        print(f"  {PHASE_NAMES[phase]:<30}{ours['phases'][phase]:>10.3f}{trl['phases'][phase]:>10.3f}{shown}")
    print(f"{'ours/TRL per pair':<32}" + " ".join(f"{r:.2f}" for r in ratio["step_seconds_per_pair"]))
    memory_key = (
        "cuda_peak_allocated_gib" if ours["cuda_peak_allocated_gib"] is not None else "peak_rss_training_gib"
    )
    memory_name = "peak GPU memory (GiB)" if memory_key.startswith("cuda") else "peak RSS in training (GiB)"
    print(
        f"{memory_name:<32}{ours[memory_key]:>10.3f}{trl[memory_key]:>10.3f}{ours[memory_key] / trl[memory_key]:>10.2f}"
    )
    print(
        f"{'RSS after setup (GiB)':<32}{ours['rss_after_setup_gib']:>10.3f}{trl['rss_after_setup_gib']:>10.3f}"
    )
    print(f"{'setup (s)':<32}{ours['setup_seconds']:>10.1f}{trl['setup_seconds']:>10.1f}")
    print(
        f"{'reward gain (± SE over pairs)':<32}{format_gain(ours['reward_gain_mean'], ours['reward_gain_stderr']):>16}"
        f"{format_gain(trl['reward_gain_mean'], trl['reward_gain_stderr']):>16}"
    )
    difference = summary["reward_gain_difference"]
    print(f"{'reward gain ours - TRL':<32}{format_gain(difference['mean'], difference['stderr']):>16}")
    print(f"{'same prompts at every step':<32}{summary['same_prompts_every_step']!s:>16}")
    check = report["same_batch"]
    print(
        f"same batch ({check['completions']} completions, {check['nonzero_advantages']} with an advantage): "
        f"prompt ids equal {check['prompt_ids_equal']}, "
        f"rewards max |diff| {check['rewards_max_abs_diff']:.1e}, initial adapter max |diff| "
        f"{check['initial_adapter_max_abs_diff']:.1e}, reference log-probs max |diff| {check['ref_logp_max_abs_diff']:.1e}"
    )
    for variant in ("on_policy", "off_policy"):
        v = check[variant]
        print(
            f"  {variant:<11} loss ours {v['loss_ours']:+.6f} TRL {v['loss_trl']:+.6f} (rel diff {v['loss_rel_diff']:.1e}), "
            f"gradient rel diff {v['grad_rel_diff']:.1e}, clip ratio {v['clip_ratio_ours']}"
        )


def machine_info() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    device = f"cpu: {cpu}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"
    if torch.cuda.is_available():
        device = f"{torch.cuda.get_device_name()} (and {device})"
    return {
        "device": device,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "bitsandbytes"):
        try:
            found[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            found[package] = None
    return found


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help=f"our YAML config (default {DEFAULT_CONFIG})")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="a shipped config in place of --config: "
        + ", ".join(f"{name} = {path}" for name, path in PRESETS.items())
        + " (smollm2: run scripts/cold_start.py with that config first)",
    )
    parser.add_argument("--steps", type=int, default=60, help="optimiser steps per run (default 60)")
    parser.add_argument("--pairs", type=int, default=3, help="pairs of runs, interleaved A B B A (default 3)")
    parser.add_argument("--output", default="outputs/bench_vs_trl.json", help="the JSON report")
    parser.add_argument(
        "--trl-adapter-dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="TRL's LoRA weights on a 4-bit model: fp32 as ours (default), or bf16 as TRL casts them",
    )
    parser.add_argument("--child", choices=["ours", "trl", "same_batch"], help=argparse.SUPPRESS)
    parser.add_argument("--child-output", help=argparse.SUPPRESS)
    parser.add_argument("--pair-seed", type=int, help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.steps < 1 or args.pairs < 1:
        parser.error("--steps and --pairs must be >= 1")
    if args.preset and args.config:
        parser.error("--preset and --config: give one of them")
    args.config = PRESETS[args.preset] if args.preset else (args.config or DEFAULT_CONFIG)
    return args, overrides


def check_model(cfg: GRPOConfig, config_path: str) -> None:
    """Resolve the model once in the parent (a conversion or a missing folder shows here, not in a child's log);
    SystemExit naming the cold start when the config's model is a folder that is not there yet."""
    from models.policy import ModelLoadError, resolve_model_path

    try:
        resolve_model_path(cfg.model_name_or_path)
    except ModelLoadError as err:
        hint = ""
        if not os.path.exists(cfg.model_name_or_path) and cfg.model_name_or_path.startswith("outputs/"):
            hint = f"; if it is a cold-started model, make it first: python scripts/cold_start.py --config {config_path}"
        raise SystemExit(f"bench_vs_trl.py: {err}{hint}") from None


def child_main(args: argparse.Namespace, overrides: list[str]) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        steps = 1 if args.child == "same_batch" else args.steps
        cfg = bench_config(args.config, overrides, steps, args.pair_seed, str(Path(scratch) / "run"))
        if args.child == "ours":
            result = run_ours(cfg)
        elif args.child == "trl":
            result = run_trl(cfg, args.trl_adapter_dtype)
        else:
            result = same_batch(cfg)
    Path(args.child_output).write_text(json.dumps(result))


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args, overrides = parse_args(argv)
    if args.child:
        child_main(args, overrides)
        return {}
    try:
        import trl  # noqa: F401
    except ImportError:
        raise SystemExit('bench_vs_trl needs TRL 1.16: pip install -e ".[bench]"') from None
    with tempfile.TemporaryDirectory() as scratch:
        cfg = bench_config(args.config, overrides, args.steps, None, str(Path(scratch) / "run"))
        check_comparable(cfg)  # fail here, before any model is loaded
        check_model(cfg, args.config)
        trl_settings = trl_grpo_config(cfg, str(Path(scratch) / "trl")).to_dict()
    base_seed = cfg.seed
    report: dict[str, Any] = {
        "command": " ".join(
            ["python", "scripts/bench_vs_trl.py", *(argv if argv is not None else sys.argv[1:])]
        ),
        "machine": machine_info(),
        "versions": versions(),
        "settings": {
            "config": args.config,
            "overrides": overrides,
            "steps": args.steps,
            "pairs": args.pairs,
            "seeds": [base_seed + p for p in range(args.pairs)],
            "trl_adapter_dtype": args.trl_adapter_dtype,
            "ours": cfg.to_dict(),
            "trl": {
                k: v for k, v in trl_settings.items() if isinstance(v, (int, float, str, bool, type(None)))
            },
        },
    }
    path = Path(args.output)
    work = path.with_name(f"{path.stem}_runs")  # each child's log and JSON, kept for a look afterwards
    work.mkdir(parents=True, exist_ok=True)
    print(f"logs of each run: {work}", flush=True)
    output = work / "same_batch.json"
    print("same-batch check ...", flush=True)
    report["same_batch"] = run_child(
        child_command("same_batch", args, overrides, base_seed, output), work / "same_batch.log", output
    )
    runs = []
    for pair, trainer in pair_order(args.pairs):
        seed = base_seed + pair
        output = work / f"{pair}_{trainer}.json"
        print(f"pair {pair} (seed {seed}): {trainer} ...", flush=True)
        started, load_before = time.perf_counter(), os.getloadavg()[0]
        result = run_child(
            child_command(trainer, args, overrides, seed, output), work / f"{pair}_{trainer}.log", output
        )
        result.update(pair=pair, trainer=trainer, seed=seed, wall_seconds=time.perf_counter() - started)
        result["load_average_1min"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # other users?
        result["summary"] = summarize_run(result)
        print(
            f"  step {result['summary']['step_seconds']:.3f} s (median), reward gain "
            f"{result['summary']['reward_gain']:+.3f}, {result['wall_seconds']:.0f} s in all, "
            f"load average {result['load_average_1min'][0]} -> {result['load_average_1min'][1]}",
            flush=True,
        )
        runs.append(result)
    report["runs"] = runs
    report["summary"] = summarize(runs)
    report["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    print_table(report)
    path.write_text(json.dumps(report, indent=2))
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
