"""The GRPO training loop. ``grpo_step`` reads like Algorithm 1 of DeepSeekMath (iterative GRPO):

    sample a batch of prompts
    -> sample G completions per prompt with the sampler (the current policy)
    -> score them with the reward functions
    -> group-normalised advantages
    -> old and reference log-probs (no grad)
    -> mu policy updates with the clipped objective and the KL penalty
    -> sync the new adapter to the sampler

``train`` wraps it with what a real run needs: accelerate (one or many processes, data parallel),
the optimiser and schedule, checkpoints and exact resume, metrics, a progress bar and a plot.

Where this departs from DeepSeekMath's Algorithm 1:

1. The reference model is not a frozen copy: it is the policy with its LoRA adapter switched off
   (``models.policy.reference_model``), i.e. the base model, which costs no memory. It never moves
   (Algorithm 1 resets it to the policy every outer iteration; we run one outer iteration).
2. Only a rank-r LoRA adapter is trained, on a 4-bit NF4 base (QLoRA), with bitsandbytes' 8-bit AdamW.
3. The sampler may be another engine: vLLM gets the trainer's NF4 base dequantised, but its kernels differ,
   so its samples are slightly off-policy; TRL's importance-sampling correction weighs that (``sampling/*``).
4. With ``mask_truncated_completions`` a completion cut at ``max_completion_length`` is left out of the
   loss (DAPO): its reward says nothing about a finished answer.
5. The per-token KL uses Schulman's k3 estimator by default, as GRPO does; ``loss_type`` and the options of
   docs/OBJECTIVES.md swap in the objectives that came after it (DAPO, Dr. GRPO, GSPO, CISPO, ...).
6. A rollout may feed several optimiser steps (``steps_per_generation``), as Algorithm 1's mu passes do.
7. Gradients are clipped at ``max_grad_norm``; a non-finite gradient or weight skips the update (counted,
   and a few in a row stop the run with a checkpoint).
8. Every statistic is the whole batch's, over all processes, and each completion is seeded by its prompt's
   position: one process or eight train on the same rows, draw the same samples and end with the same adapter.
9. With ``async_generation`` the rollout of step k+1 is sent to the sampler before step k trains (verl's
   one-step-off), so it comes from the policy one optimiser step behind; the importance-sampling correction
   weighs that (``sample/staleness_mean`` logs the lag), and a checkpoint keeps the policy that samples it.
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from grpo.advantages import multi_objective_advantages
from grpo.checkpoint import (
    load_checkpoint,
    load_rollout_policy,
    read_trainer_state,
    resolve_checkpoint,
    save_checkpoint,
)
from grpo.config import GRPOConfig
from grpo.corrections import (
    adaptive_entropy_coef,
    entropy_bonus_applies,
    entropy_threshold,
    high_entropy_mask,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from grpo.evaluation import eval_subset, evaluate_rows
from grpo.loss import Corrections, Counts, policy_loss
from grpo.metrics import (
    MetricsLogger,
    PhaseTimer,
    add_metric_sums,
    format_sample,
    gather_flat,
    group_sample,
    metric_means,
    reduce_sum,
    sampler_metrics,
)
from grpo.optim import clip_gradients, make_optimizer, make_scheduler, sum_gradients
from grpo.plot import plot_metrics
from grpo.rollout import (
    Group,
    PendingRound,
    Rollout,
    StepBatch,
    optimizer_steps_per_rollout,
    reward_weights,
    rollout_prompts,
    sample_rollout,
    staleness_metrics,
    start_round,
    step_batch,
)
from grpo.run_folder import (
    check_output_dir,
    check_resume_config,
    hold_output_dir,
    release_output_dir,
    remove_incomplete_checkpoints,
    rotate_checkpoints,
)
from grpo.signals import agreed_stop, stop_requests
from grpo.validation import accelerate_dtype
from models.forward import LogprobOptions, batch_logprobs, micro_batches
from models.policy import autocast_dtype, reference_model
from models.samplers import SamplerError
from rewards import RewardFuncError

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from data.mixture import MixtureStream
    from models.samplers import Sampler


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. several non-finite updates in a row); a checkpoint was written."""


class TrainingInterrupted(RuntimeError):
    """Ctrl-C or SIGTERM: the run stopped between two rollouts, after a checkpoint and the plot."""


@dataclass
class TrainerState:
    """Everything besides weights and optimiser that an exact resume needs."""

    step: int = 0  # optimiser steps done
    data_position: int = 0  # next prompt of the training stream
    skipped_updates: int = 0  # non-finite updates skipped so far
    nonfinite_streak: int = 0  # ... in a row
    num_tokens: int = 0  # prompt + completion tokens trained on so far (TRL's num_tokens)
    entropy_coef: float = 0.0  # the entropy bonus coefficient (moves with use_adaptive_entropy)
    last_entropy: float = math.inf  # the last step's mean token entropy (adaptive entropy control)


@dataclass
class Ahead:
    """``async_generation``: the next rollout's first round, sent to the sampler before this step trains, and the
    LoRA weights of the policy that samples it ({name: CPU tensor}): a checkpoint keeps them, so that a resumed
    run sends the same round again and trains on the same samples as the uninterrupted one."""

    round: PendingRound
    policy: dict[str, Tensor]


@dataclass
class Run:
    """The live objects of a run, passed to each step."""

    config: GRPOConfig
    accelerator: Accelerator
    model: PeftModel
    tokenizer: PreTrainedTokenizerBase
    sampler: Sampler
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_data: MixtureStream
    state: TrainerState = field(default_factory=TrainerState)
    resume_from: Path | None = None  # the checkpoint fit() restores first
    ahead: Ahead | None = None  # async_generation: the rollout sampled while this step trains

    @property
    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def sampled_off_policy(self) -> bool:
        """Whether the samples come from another distribution than the trainer's policy before the update:
        another engine's (vLLM's kernels) or an older policy's (``async_generation``: one step behind)."""
        return self.sampler.name == "vllm" or self.config.async_generation

    @property
    def sampler_corrected(self) -> bool:
        """Whether the policy term is weighted by pi_trainer / pi_sampler (TRL: for vLLM; here also for the
        rollouts ``async_generation`` samples one step behind, whatever the sampler)."""
        return self.sampled_off_policy and self.config.vllm_importance_sampling_correction


# ============================================================================ the GRPO step


def grpo_step(run: Run) -> list[dict[str, Any]]:
    """One iteration of GRPO (DeepSeekMath, Algorithm 1) on one rollout; one metrics record per optimiser step."""
    timer = PhaseTimer()
    batches, rollout = prepare_step_batches(
        run, timer
    )  # arrows 1-5: the rollout, scored, advantages, log-probs
    records = []
    for iteration in range(run.config.num_iterations):  # 6. mu passes of policy updates over the rollout
        for batch in batches:
            if run.state.step < run.config.max_steps:
                lag = staleness_metrics(rollout.groups, run.state.step)
                records.append({**train_on_batch(run, batch, iteration, timer), **rollout.metrics, **lag})
    with timer("sync"):  # 7. hand the new adapter to the sampler
        run.sampler.update_policy(run.accelerator.unwrap_model(run.model))
    for record in records:
        record.update(timer.seconds)
    if records:
        records[-1]["samples"] = [group_sample(g, reward_weights(run.config)) for g in rollout.groups]
    return records


def prepare_step_batches(run: Run, timer: PhaseTimer | None = None) -> tuple[list[StepBatch], Rollout]:
    """Arrows 1-5 of the step: the optimiser steps' batches of one rollout, ready for the update.

    1-3. a batch of prompts -> G completions each from the current policy -> rewards (every process samples
         its share, then holds the whole rollout);
    4.   group-normalised advantages over the whole rollout of all processes;
    5.   each step batch's old and reference log-probs, no grad.
    Also moves the run's place in the training stream past the rollout's prompts. With ``async_generation``
    the rollout is the one sent during the previous step (by the policy one step behind), and the next one is
    sent now, by the current policy: the sampler draws it while arrows 4-7 run.
    """
    cfg, timer = run.config, timer or PhaseTimer()
    first = run.ahead.round if run.ahead is not None else None
    rollout = sample_rollout(
        run.sampler,
        run.train_data,
        cfg,
        run.accelerator,
        run.state.data_position,
        timer,
        first,
        run.state.step,
    )
    run.ahead = None  # used (kept until here: a checkpoint taken when it failed sends it again)
    run.state.data_position = rollout.next_position
    if cfg.async_generation:
        with timer("generate"):  # a colocated sampler draws it here; a server returns at once
            send_ahead(run)
    advantages = rollout_advantages(rollout.groups, cfg)
    batches = [
        step_batch(rollout.groups, advantages, k, cfg, run.accelerator, run.tokenizer.pad_token_id)
        for k in range(optimizer_steps_per_rollout(cfg))
    ]
    with timer("old_ref_logprobs"):
        for batch in batches:
            add_old_and_ref_logprobs(run, batch)
    return batches, rollout


def send_ahead(run: Run) -> None:
    """``async_generation``: send the next rollout's first round (from the run's place in the stream) to the
    sampler, from the policy as it is now, and keep that policy's LoRA weights (``Ahead``). Nothing is sent
    when no step will train on it."""
    cfg, state = run.config, run.state
    if state.step + cfg.num_iterations * optimizer_steps_per_rollout(cfg) < cfg.max_steps:
        send_round(run, state.step, lora_weights(run.accelerator.unwrap_model(run.model)))


def send_round(run: Run, version: int, weights: dict[str, Tensor]) -> None:
    """Send the first round of the rollout at the run's place in the stream to the sampler (which holds the
    policy of LoRA ``weights``, ``version`` optimiser steps old): ``run.ahead``."""
    start = run.state.data_position
    positions = range(start, start + rollout_prompts(run.config, run.accelerator.num_processes))
    first = start_round(run.sampler, run.train_data, run.config, run.accelerator, positions, version)
    run.ahead = Ahead(first, weights)


def lora_weights(model) -> dict[str, Tensor]:
    """{name: a CPU copy} of the model's trainable (LoRA) weights."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters() if p.requires_grad}


def set_lora_weights(model, weights: dict[str, Tensor]) -> None:
    """Copy ``weights`` (from ``lora_weights``) into the model's trainable weights, in place."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if params.keys() != weights.keys():
        raise ValueError(f"LoRA weights of another model: {sorted(set(params) ^ set(weights))[:3]} ...")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(weights[name])


def rollout_advantages(groups: list[Group], cfg: GRPOConfig) -> torch.Tensor:
    """Arrow 4: the advantages [R * G] of the whole rollout (all processes' groups, in stream order)."""
    rewards_per_func = torch.cat([g.rewards_per_func for g in groups])  # [R * G, K]
    return multi_objective_advantages(
        rewards_per_func,
        reward_weights(cfg),
        cfg.num_generations,
        cfg.multi_objective_aggregation,
        cfg.scale_rewards,
    )


def add_old_and_ref_logprobs(run: Run, batch: StepBatch) -> None:
    """Arrow 5: the log-probs [n, T] of the policy that sampled (when it will have moved by the time the batch is
    trained on) and of the reference (the adapter switched off), no grad; and the high-entropy token mask."""
    cfg = run.config
    policy = run.accelerator.unwrap_model(run.model)
    options = logprob_options(cfg, run.accelerator.device)
    if needs_old_logprobs(cfg):  # else old_logp stays None: the loss takes logp.detach()
        batch.old_logp, batch.old_entropy = no_grad_logprobs(policy, batch, micro_batch_size(cfg), options)
    if cfg.beta > 0:
        with reference_model(policy):  # the adapter switched off: the base model
            batch.ref_logp, _ = no_grad_logprobs(policy, batch, micro_batch_size(cfg), options)
    if cfg.top_entropy_quantile < 1.0:
        batch.entropy_mask = top_entropy_mask(run, batch)


def no_grad_logprobs(
    model, batch: StepBatch, micro_size: int, options: LogprobOptions
) -> tuple[Tensor, Tensor]:
    """Log-probs and entropies [n, T] of a whole step batch, no grad, ``micro_size`` rows at a time, in eval mode
    (no dropout, no activation checkpointing). Inside ``reference_model(model)`` these are the reference's."""
    n, t = batch.completion_mask.shape
    logp = torch.zeros(n, t, device=batch.input_ids.device)
    entropy = torch.zeros_like(logp)
    model.eval()
    with torch.no_grad():
        for rows in micro_batches(n, micro_size):
            micro = batch.micro_batch(rows)
            micro_logp, micro_entropy = batch_logprobs(
                model, micro.input_ids, micro.attention_mask, micro.completion_mask, options
            )
            logp[rows, : micro_logp.shape[1]] = micro_logp
            entropy[rows, : micro_entropy.shape[1]] = micro_entropy
    return logp, entropy


def train_on_batch(run: Run, batch: StepBatch, iteration: int, timer: PhaseTimer) -> dict[str, Any]:
    """Arrow 6, one optimiser step: the objective's gradient on the batch, then the optimiser; its metrics record."""
    with timer("policy_update"):
        update, trainer_logp = policy_update(run, batch)
    with timer("optimizer"):
        update.update(optimizer_step(run, update["loss"]))
    update_entropy_control(run, update.pop("entropy_effective"))
    run.state.num_tokens += batch.tokens_seen
    update["num_tokens"] = run.state.num_tokens
    if iteration == 0:  # sampler vs trainer only means something before the policy has moved
        update.update(sampler_metrics(batch, trainer_logp, run.config, run.accelerator))
    return {"step": run.state.step, "iteration": iteration, **batch.metrics, **update}


def needs_old_logprobs(cfg: GRPOConfig) -> bool:
    """The policy that sampled must be scored before it moves when the rollout feeds more than one update,
    and its entropies are needed before the loss when only high-entropy tokens are kept."""
    return cfg.num_iterations > 1 or optimizer_steps_per_rollout(cfg) > 1 or cfg.top_entropy_quantile < 1.0


def logprob_options(cfg: GRPOConfig, device=None, entropy_grad: bool = False) -> LogprobOptions:
    """How ``models.forward`` computes log-probs for this config: temperature, kernel, shared prompts, and the
    autocast dtype of the decoder forwards on `device` (bf16 in bf16 mode, none in fp32 mode)."""
    return LogprobOptions(
        temperature=cfg.temperature,
        backend=cfg.logprob_backend,
        share_prompt=cfg.share_prompt_forward,
        compute_dtype=autocast_dtype(cfg.dtype, device),
        entropy_grad=entropy_grad,
    )


def micro_batch_size(cfg: GRPOConfig) -> int:
    """Completions per forward/backward pass: train_micro_batch_size, default a micro-step's P x G."""
    return cfg.train_micro_batch_size or cfg.per_device_train_batch_size * cfg.num_generations


def top_entropy_mask(run: Run, batch: StepBatch) -> torch.Tensor:
    """1.0 on the tokens whose entropy (under the policy that sampled) is in the top ``top_entropy_quantile``
    share of the whole step's tokens, all processes ("Beyond the 80/20 rule"). [n, T]"""
    values = gather_flat(run.accelerator, batch.old_entropy[batch.loss_mask.bool()])
    threshold = entropy_threshold(values, run.config.top_entropy_quantile)
    return high_entropy_mask(batch.old_entropy, batch.loss_mask, threshold).float()


# ---------------------------------------------------------------------------- the update


def entropy_coef_now(run: Run) -> float:
    """The entropy bonus coefficient of this step (TRL: the adaptive one applies only at or below the target)."""
    cfg, state = run.config, run.state
    if not cfg.use_adaptive_entropy:
        return cfg.entropy_coef
    return state.entropy_coef if entropy_bonus_applies(state.last_entropy, cfg.entropy_target) else 0.0


def sampling_corrections(
    run: Run, micro: StepBatch, logp: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(is_weights, off_policy_mask) of a micro-batch, each None when off: TRL's importance weights of the
    policy that sampled over the sampler (vLLM, or a rollout sampled one step behind), and DeepSeek-V3.2's
    off-policy sequence mask of the current policy (logp [n, T], detached) against the policy that sampled."""
    cfg = run.config
    old_logp = logp if micro.old_logp is None else micro.old_logp  # None: the current policy sampled
    is_weights = off_policy_mask = None
    if run.sampler_corrected:
        is_weights = sampler_importance_weights(
            old_logp,
            micro.sampler_logp,
            micro.completion_mask,
            cfg.vllm_importance_sampling_mode,
            cfg.vllm_importance_sampling_clip_min,
            cfg.effective_clip_max,
        )
    if cfg.off_policy_mask_threshold is not None:  # against the sampler's numbers when they differ
        behaviour = micro.sampler_logp if run.sampled_off_policy else old_logp
        off_policy_mask = off_policy_sequence_mask(
            logp, behaviour, micro.advantages, micro.loss_mask, cfg.off_policy_mask_threshold
        )
    return is_weights, off_policy_mask


def policy_update(run: Run, batch: StepBatch) -> tuple[dict[str, float], torch.Tensor]:
    """The gradient of the GRPO objective on this step's batch, accumulated micro-batch by micro-batch.

    Each micro-batch's loss is normalised by the whole step's counts (all processes), so the gradients summed
    over micro-batches and processes are exactly the gradient of the whole batch's loss. Returns the step's
    loss metrics (whole batch) and this process's detached log-probs [n, T].
    """
    cfg, accelerator = run.config, run.accelerator
    entropy_coef = entropy_coef_now(run)
    num_entropy_tokens = None  # the bonus averages over the kept tokens of the whole step
    if batch.entropy_mask is not None:
        num_entropy_tokens = reduce_sum(accelerator, (batch.loss_mask * batch.entropy_mask).sum())
    counts = Counts(batch.num_sequences, batch.num_tokens, num_entropy_tokens)
    options = logprob_options(cfg, accelerator.device, entropy_grad=entropy_coef > 0)
    sums: dict[str, float] = {}
    trainer_logp = torch.zeros_like(batch.completion_mask)
    run.model.train()  # dropout as configured and, above all, activation checkpointing (HF: train mode only)
    for rows in micro_batches(batch.completion_mask.shape[0], micro_batch_size(cfg)):
        micro = batch.micro_batch(rows)
        logp, entropy = batch_logprobs(
            run.model, micro.input_ids, micro.attention_mask, micro.completion_mask, options
        )
        is_weights, off_policy_mask = sampling_corrections(run, micro, logp.detach())
        corrections = Corrections(is_weights, off_policy_mask, micro.entropy_mask, entropy, entropy_coef)
        loss, metrics = policy_loss(
            logp, micro.old_logp, micro.ref_logp, micro.advantages, micro.loss_mask,
            cfg.loss_settings(), corrections, counts,
        )  # fmt: skip
        # the gradient itself: accelerator.backward would scale it under an fp16 accelerate config, and
        # nothing here unscales (accelerate_dtype refuses fp16 at setup)
        loss.backward()
        add_metric_sums(sums, loss, metrics, cfg.importance_sampling_level)
        add_entropy_sums(sums, entropy, micro)
        trainer_logp[rows, : logp.shape[1]] = logp.detach()
    metrics = metric_means(accelerator, sums)
    metrics.update(clip_ratio=metrics["clip_ratio/region_mean"], entropy_coef=entropy_coef)
    return metrics, trainer_logp


def add_entropy_sums(sums: dict[str, float], entropy: torch.Tensor, micro: StepBatch) -> None:
    """Accumulate the entropy of the tokens the loss keeps, for the adaptive entropy control's step mean."""
    kept = micro.loss_mask if micro.entropy_mask is None else micro.loss_mask * micro.entropy_mask
    sums["entropy_effective"] = sums.get("entropy_effective", 0.0) + (entropy.detach() * kept).sum().item()
    sums["entropy_effective/count"] = sums.get("entropy_effective/count", 0.0) + kept.sum().item()


def optimizer_step(run: Run, loss: float) -> dict[str, float]:
    """Sum the gradients over processes, clip them, step the optimiser and the schedule.

    A non-finite loss or gradient norm skips the update, and so does one that leaves a non-finite weight (the
    weights are put back); ``max_nonfinite_updates`` of them in a row raise TrainingError. Also moves the
    adaptive entropy coefficient. Returns grad_norm, learning_rate (and lr), skipped_updates.
    """
    cfg, state = run.config, run.state
    params = run.trainable_params
    sum_gradients(params, run.accelerator)
    grad_norm = clip_gradients(params, cfg.max_grad_norm)
    finite = math.isfinite(grad_norm) and math.isfinite(loss)
    if finite:
        before = [p.detach().clone() for p in params]
        run.optimizer.step()
        finite = bool(torch.stack([torch.isfinite(p).all() for p in params]).all())
        if not finite:  # e.g. a huge learning rate: undo the step
            with torch.no_grad():
                for p, saved in zip(params, before, strict=True):
                    p.copy_(saved)
    if finite:
        state.nonfinite_streak = 0
    else:
        state.skipped_updates += 1
        state.nonfinite_streak += 1
    run.optimizer.zero_grad(set_to_none=True)
    lr = run.scheduler.get_last_lr()[0]
    run.scheduler.step()
    state.step += 1
    if not finite and state.nonfinite_streak >= cfg.max_nonfinite_updates:
        raise TrainingError(
            f"step {state.step}: {state.nonfinite_streak} non-finite updates in a row "
            f"(loss {loss}, grad_norm {grad_norm}); lower learning_rate or check the data"
        )
    return {"grad_norm": grad_norm, "learning_rate": lr, "lr": lr, "skipped_updates": state.skipped_updates}


def update_entropy_control(run: Run, entropy: float) -> None:
    """TRL's adaptive entropy control, once per optimiser step, from the step's mean token entropy."""
    cfg, state = run.config, run.state
    if cfg.use_adaptive_entropy:
        state.entropy_coef = adaptive_entropy_coef(
            state.entropy_coef,
            entropy,
            cfg.entropy_target,
            cfg.entropy_coef_delta,
            cfg.entropy_coef_min,
            cfg.entropy_coef_max,
        )
        state.last_entropy = entropy


# ============================================================================ setup and the run


def setup(cfg: GRPOConfig, train_data: MixtureStream | None = None) -> Run:
    """Build everything a run needs, in the order a reader would: process group, output folder and checkpoint
    checks (before anything heavy), model, data, optimiser, sampler.

    train_data: in place of the config's data mixture, any stream with ``rows(start, count)`` giving row
    dicts (``prompt``, ``answer``, ``db_set``), e.g. the benchmarks' synthetic prompts (``datasets`` is then
    never imported: the GPU benchmark image has none)."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from models.policy import load_policy, load_tokenizer, resolve_dtype, resolve_model_path
    from models.samplers import make_sampler

    # accelerate launch's settings (fp16, DeepSpeed, FSDP: refused; bf16 makes dtype auto bf16), before
    # Accelerator() (which cannot even be built for DeepSpeed without deepspeed) and the model
    dtype = accelerate_dtype(cfg.dtype)
    if dtype != cfg.dtype:
        cfg = replace(cfg, dtype=dtype)
    accelerator = Accelerator()
    set_seed(cfg.seed)  # the same seed on every process: identical LoRA initialisation everywhere
    say = accelerator.print
    say(f"device: {accelerator.device}, processes: {accelerator.num_processes}")
    resuming = bool(cfg.resume_from_checkpoint)
    hold_output_dir(cfg.output_dir, accelerator, warn=say)  # one run per folder, until train() returns
    check_output_dir(cfg.output_dir, cfg.overwrite_output_dir, resuming, accelerator.is_main_process)
    accelerator.wait_for_everyone()
    resume_from = None
    if resuming:
        resume_from = resolve_checkpoint(cfg.resume_from_checkpoint, cfg.output_dir, warn=say)
        check_resume_config(
            resume_from, read_trainer_state(resume_from), cfg.to_dict(), accelerator.num_processes
        )
    model_path = resolve_model_path(cfg.model_name_or_path)
    if train_data is None:  # the data first: a bad data file fails in seconds, before the model is loaded
        from data.mixture import build_train_dataset

        train_data = build_train_dataset(
            cfg, load_tokenizer(model_path, cfg.trust_remote_code, cfg.model_name_or_path)
        )
    model, tokenizer = load_policy(cfg, device=accelerator.device, path=model_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    say(
        f"model: {cfg.model_name_or_path} ({'4-bit NF4' if cfg.load_in_4bit else '16-bit'}), "
        f"LoRA r={cfg.lora_r}: {sum(p.numel() for p in trainable):,} trainable parameters"
    )
    optimizer = make_optimizer(cfg, trainable)
    say(f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__} on {accelerator.device}")
    scheduler = make_scheduler(cfg, optimizer)
    # every process samples for its own prompts; only the main one says which sampler it is
    quiet = (
        contextlib.redirect_stdout(io.StringIO())
        if not accelerator.is_main_process
        else contextlib.nullcontext()
    )
    with quiet:
        sampler = make_sampler(
            cfg, model, tokenizer, model_path, resolve_dtype(cfg.dtype, accelerator.device)
        )
    state = TrainerState(entropy_coef=cfg.entropy_coef)
    return Run(
        cfg, accelerator, model, tokenizer, sampler, optimizer, scheduler, train_data, state, resume_from
    )


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO for cfg.max_steps optimiser steps; returns the folder of the final checkpoint."""
    try:
        return fit(setup(cfg))
    finally:  # however the run ends (the OS drops the lock of a killed one)
        release_output_dir(cfg.output_dir)


def fit(run: Run) -> Path:
    """The outer loop: resume if asked, GRPO steps, metrics, checkpoints, and the plot at the end."""
    cfg, accelerator = run.config, run.accelerator
    resume(run)
    saver = Saver(run, last_saved=run.state.step)
    logger = None
    if accelerator.is_main_process:
        logger = MetricsLogger(
            saver.output_dir, cfg.report_to, run.state.step, cfg.logging_steps, cfg.to_dict()
        )
    # a small fixed evaluation subset, scored greedily every eval_steps (the same on every process)
    eval_rows = eval_subset(cfg, run.tokenizer, size=cfg.eval_size) if cfg.eval_steps else []
    bar = tqdm(
        total=cfg.max_steps, initial=run.state.step, desc="GRPO", disable=not accelerator.is_main_process
    )
    stopped_by = None
    try:
        with stop_requests() as requested:
            while run.state.step < cfg.max_steps:
                started = time.perf_counter()
                records = step_or_save(run, saver)
                if eval_rows and crossed(run.state.step, len(records), cfg.eval_steps):
                    try:
                        records[-1].update(step_or_save(run, saver, lambda run: evaluate(run, eval_rows)))
                    except (SamplerError, RewardFuncError):  # the steps are saved: so are their lines
                        log_records(run, records, time.perf_counter() - started, logger, bar)
                        raise
                log_records(run, records, time.perf_counter() - started, logger, bar)
                # save between rollouts (nothing half-used needs saving), when a step crossed save_steps
                if crossed(run.state.step, run.state.step - saver.last_saved, cfg.save_steps) or (
                    run.state.step >= cfg.max_steps
                ):
                    saver.save()
                stopped_by = agreed_stop(accelerator, requested)
                if stopped_by is not None:
                    saver.save_if_new()
                    break
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    return finish(run, saver, stopped_by)


def resume(run: Run) -> None:
    """Remove a checkpoint whose save was interrupted, then restore ``run.resume_from`` when there is one:
    weights, optimiser, schedule, the trainer state, and the sampler's copy of the adapter."""
    accelerator = run.accelerator
    if accelerator.is_main_process:
        for stale in remove_incomplete_checkpoints(Path(run.config.output_dir)):
            print(f"removed {stale}: a save that was interrupted")
    accelerator.wait_for_everyone()
    if run.resume_from is None:
        return
    policy = accelerator.unwrap_model(run.model)
    saved = load_checkpoint(run.resume_from, policy, run.optimizer, run.scheduler, accelerator)
    run.state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__ if k in saved})
    ahead = load_rollout_policy(run.resume_from) if run.config.async_generation else None
    if ahead is not None:  # send again the round that was on its way, from the policy that was sampling it
        version, weights = ahead
        current = lora_weights(policy)
        set_lora_weights(policy, weights)
        run.sampler.update_policy(policy)
        send_round(run, version, weights)
        set_lora_weights(policy, current)
    run.sampler.update_policy(policy)
    accelerator.print(f"resumed from {run.resume_from} at step {run.state.step}")


def crossed(step: int, steps_done: int, every: int) -> bool:
    """Whether the last ``steps_done`` steps, ending at ``step``, crossed a multiple of ``every``.

    Example: step 12 after 4 steps, every 10 -> True (10 is in 9..12); step 8 after 4 -> False.
    """
    return step // every > (step - steps_done) // every


@dataclass
class Saver:
    """The run's checkpoints: writes one (then rotates old ones), and remembers the step of the last."""

    run: Run
    last_saved: int

    @property
    def output_dir(self) -> Path:
        return Path(self.run.config.output_dir)

    @property
    def latest(self) -> Path:
        return self.output_dir / f"checkpoint-{self.last_saved}"

    def save(self) -> Path:
        run, accelerator = self.run, self.run.accelerator
        self.last_saved = run.state.step
        trainer_state = {**vars(run.state), "config": run.config.to_dict()}
        ahead = None if run.ahead is None else (run.ahead.round.version, run.ahead.policy)
        path = save_checkpoint(
            self.output_dir,
            run.state.step,
            run.model,
            run.optimizer,
            run.scheduler,
            trainer_state,
            accelerator,
            rollout_policy=ahead,
        )
        if accelerator.is_main_process:
            rotate_checkpoints(self.output_dir, run.config.save_total_limit, keep=path)
        accelerator.wait_for_everyone()
        return path

    def save_if_new(self) -> Path:
        """A checkpoint of the current step unless the last one is of it already."""
        return self.save() if self.run.state.step != self.last_saved else self.latest


def evaluate(run: Run, eval_rows: list[dict]) -> dict[str, float]:
    """The greedy scores of the evaluation rows (``eval/*``). A rollout on its way (``async_generation``) is
    waited for first: the evaluation loads the newest adapter, and the server must not drop the one that rollout
    is sampled by while its requests run."""
    if run.ahead is not None:
        run.ahead.round.completions.result()  # kept for the next step
    cfg = run.config
    return evaluate_rows(run.sampler, eval_rows, cfg.seed, cfg.reward_funcs, cfg.reward_weights)


def step_or_save(run: Run, saver: Saver, work: Callable[[Run], Any] = grpo_step) -> Any:
    """``work(run)`` (``grpo_step``, or the evaluation), or, when it cannot go on, a checkpoint of what is done
    and one error saying how to go on: several non-finite updates in a row, a sampler that stopped answering, a
    reward function that failed."""
    try:
        return work(run)
    except TrainingError:
        saver.save()
        raise
    except SamplerError as err:  # e.g. its vLLM server is down: keep what is done, say how to go on
        saver.save_if_new()
        then = (
            f"saved {saver.latest}; continue with --resume_from_checkpoint latest"
            if run.state.step
            else "nothing trained yet: start again"
        )
        raise SamplerError(f"step {run.state.step + 1}: {err}; {then} once it answers") from err
    except RewardFuncError as err:  # a reward function failed: keep what is done, say where
        saved = saver.save()
        raise RewardFuncError(
            f"step {run.state.step + 1}: {err}; saved {saved}; fix it and continue with --resume_from_checkpoint latest",
            row=err.row,
        ) from err


def log_records(run: Run, records: list[dict[str, Any]], seconds: float, logger: Any, bar: Any) -> None:
    """One metrics line per optimiser step (main process), the progress bar, and the sampled completions."""
    cfg = run.config
    for record in records:
        record["step_time"] = seconds / len(records)
        samples = record.pop("samples", None)
        if logger is not None:
            logger.log(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
        if record["step"] % cfg.logging_steps == 0 and cfg.log_completions and samples:
            for sample in samples[: cfg.num_completions_to_print or 1]:
                bar.write(format_sample(record["step"], sample))


def finish(run: Run, saver: Saver, stopped_by: str | None) -> Path:
    """The plot, then every process leaves together; a stop asked for by a signal ends as TrainingInterrupted."""
    accelerator, output_dir = run.accelerator, saver.output_dir
    if accelerator.is_main_process:
        plot = plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
        print(f"adapter: {saver.latest}\nmetrics: {output_dir / 'metrics.jsonl'}\nplot:    {plot}")
    accelerator.wait_for_everyone()  # leave together (the main process was plotting): no process samples now,
    run.sampler.close()  # so the node's shared copy of the base can go with the first process's sampler
    accelerator.end_training()  # close trackers and destroy the process group before the interpreter exits
    if stopped_by is not None:
        raise TrainingInterrupted(
            f"{stopped_by} at step {run.state.step}: saved {saver.latest}; "
            "continue with --resume_from_checkpoint latest"
        )
    return saver.latest
