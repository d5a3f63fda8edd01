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
3. The sampler may be another engine: vLLM holds the base in 16 bit while the trainer holds NF4, so its
   samples are slightly off-policy (``mismatch/*`` measures how much).
4. With ``mask_truncated_completions`` a completion cut at ``max_completion_length`` is left out of the
   loss (DAPO): its reward says nothing about a finished answer.
5. The per-token KL uses Schulman's k3 estimator by default, as GRPO does, but k1 and k2 are selectable;
   ``loss_type`` changes how token losses are averaged (``grpo`` is the paper's per-sequence mean).
6. Gradients are clipped at ``max_grad_norm`` and a non-finite update is skipped (counted, and a few in
   a row stop the run with a checkpoint).
"""

from __future__ import annotations

import contextlib
import io
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from grpo.advantages import group_advantages
from grpo.checkpoint import (
    load_checkpoint,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
)
from grpo.config import GRPOConfig
from grpo.evaluation import eval_subset, evaluate_rows
from grpo.loss import policy_loss
from grpo.metrics import MetricsLogger, length_metrics, plot_metrics, reward_metrics, sampler_mismatch
from grpo.rollout import Rollout, generate_rollout
from models.forward import completion_logprobs
from models.policy import reference_model
from models.samplers import derive_seed
from rewards import combine_rewards

if TYPE_CHECKING:
    from accelerate import Accelerator
    from peft import PeftModel
    from transformers import PreTrainedTokenizerBase

    from data.mixture import MixtureStream
    from models.samplers import Sampler


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. several non-finite updates in a row); a checkpoint was written."""


@dataclass
class TrainerState:
    """Everything besides weights and optimiser that an exact resume needs."""

    step: int = 0  # optimiser steps done
    data_position: int = 0  # next row of the training stream
    skipped_updates: int = 0  # non-finite updates skipped so far
    nonfinite_streak: int = 0  # ... in a row


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

    @property
    def trainable_params(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]


class PhaseTimer:
    """Seconds spent in each phase of a step, as ``time/<phase>`` metrics.

    >>> timer = PhaseTimer()
    >>> with timer("generate"):
    ...     pass
    >>> list(timer.seconds)
    ['time/generate']
    """

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            key = f"time/{phase}"
            self.seconds[key] = self.seconds.get(key, 0.0) + time.perf_counter() - started


# ============================================================================ the GRPO step


def grpo_step(run: Run) -> list[dict[str, Any]]:
    """One iteration of GRPO; returns one metrics record per optimiser step (num_iterations of them)."""
    cfg, accelerator, state = run.config, run.accelerator, run.state
    timer = PhaseTimer()

    # 1. Sample a batch of prompts: each process its own slice of the seeded, endless stream.
    prompts_per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    start = state.data_position + accelerator.process_index * prompts_per_process
    rows = run.train_data.rows(start, prompts_per_process)
    state.data_position += prompts_per_process * accelerator.num_processes

    # 2. G completions per prompt from the current policy.
    with timer("generate"):
        seeds = [derive_seed(cfg.seed, position) for position in range(start, start + prompts_per_process)]
        rollout = generate_rollout(run.sampler, rows, cfg.num_generations, seeds, run.tokenizer.pad_token_id)
    batch = {k: v.to(accelerator.device) for k, v in rollout.batch.items()}

    # 3. Score them: each reward function, then the weighted sum.
    with timer("score"):
        rewards, rewards_per_func = combine_rewards(
            rollout.texts, rollout.columns, cfg.reward_funcs, cfg.reward_weights
        )

    # 4. Group-normalised advantages.
    advantages = group_advantages(rewards, cfg.num_generations, scale=cfg.scale_rewards).to(
        accelerator.device
    )

    # 5. Old and reference log-probs, no grad. With mu = 1 the sampling policy is the current one,
    #    so old_logp is logp.detach() inside the loss; the reference is the adapter switched off.
    with timer("old_ref_logprobs"):
        old_logp = batched_logprobs(run, batch, reference=False) if cfg.num_iterations > 1 else None
        ref_logp = batched_logprobs(run, batch, reference=True) if cfg.beta > 0 else None

    # 6. mu policy updates on this batch of samples.
    sample_metrics = {
        **global_reward_metrics(accelerator, rewards, rewards_per_func, rollout.columns["db_set"], cfg),
        **length_metrics(batch["completion_lengths"].float(), batch["truncated"]),
    }
    loss_mask = batch["completion_mask"]
    if cfg.mask_truncated_completions:  # a cut-off completion has no honest reward: leave it out
        loss_mask = loss_mask * (~batch["truncated"]).float()[:, None]
    records = []
    for iteration in range(cfg.num_iterations):
        with timer("policy_update"):
            update, logp = policy_update(run, batch, loss_mask, advantages, old_logp, ref_logp)
        with timer("optimizer"):
            update.update(optimizer_step(run, update["loss"]))
        if iteration == 0:  # sampler vs trainer only means something before the policy has moved
            update.update(sampler_mismatch(batch["sampler_logp"], logp, batch["completion_mask"]))
        records.append({"step": state.step, "iteration": iteration, **sample_metrics, **update})

    # 7. Hand the new adapter to the sampler.
    with timer("sync"):
        run.sampler.update_policy(accelerator.unwrap_model(run.model))
    for record in records:
        record.update(timer.seconds)
    records[-1]["sample"] = sample_record(rollout, rewards)
    return records


def global_reward_metrics(
    accelerator: Accelerator,
    rewards: torch.Tensor,
    rewards_per_func: dict[str, torch.Tensor],
    db_sets: list[str],
    cfg: GRPOConfig,
) -> dict[str, float]:
    """Reward metrics over the samples of every process (gathered), not only this one's."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rewards = accelerator.gather(rewards.to(accelerator.device)).cpu()
        rewards_per_func = {
            k: accelerator.gather(v.to(accelerator.device)).cpu() for k, v in rewards_per_func.items()
        }
        db_sets = gather_object(list(db_sets))
    metrics = reward_metrics(rewards, rewards_per_func, db_sets, cfg.num_generations)
    return {"num_completions": len(rewards), **metrics}


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices of the N completions, ``size`` at a time (the last may be shorter). Example: 5, 2 -> 0:2, 2:4, 4:5."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def trim(batch: dict[str, torch.Tensor], rows: slice, prompt_len: int) -> dict[str, torch.Tensor]:
    """The rows of a micro-batch, without the padding columns that none of its rows uses.

    Prompts are left-padded, completions right-padded, so the columns to drop are a prefix of the
    prompt part and a suffix of the completion part. Example: completions of lengths 3 and 1 in a
    batch padded to T = 8 keep 3 completion columns.
    """
    mask = batch["attention_mask"][rows]
    first = int(mask[:, :prompt_len].any(dim=0).float().argmax()) if prompt_len else 0
    longest = int(batch["completion_lengths"][rows].max().clamp(min=1))
    out = {
        "input_ids": batch["input_ids"][rows, first : prompt_len + longest],
        "attention_mask": mask[:, first : prompt_len + longest],
    }
    for key in ("completion_mask", "sampler_logp"):
        out[key] = batch[key][rows, :longest]
    return out


def micro_batch_logprobs(run: Run, micro: dict[str, torch.Tensor], return_entropy: bool = False):
    """log pi(c_t | prompt, c_<t) [n, t] of one micro-batch under the model as it is now (with the
    adapter, unless called inside ``reference_model``), and the per-token entropy when asked."""
    return completion_logprobs(
        run.model,
        micro["input_ids"],
        micro["attention_mask"],
        micro["completion_mask"],
        temperature=run.config.temperature,
        backend=run.config.logprob_backend,
        return_entropy=return_entropy,
    )


def micro_batch_size(cfg: GRPOConfig) -> int:
    """Completions per forward/backward pass: train_micro_batch_size, default a micro-step's P x G."""
    return cfg.train_micro_batch_size or cfg.per_device_train_batch_size * cfg.num_generations


def batched_logprobs(run: Run, batch: dict[str, torch.Tensor], reference: bool) -> torch.Tensor:
    """Log-probs [N, T] of the completion tokens, no grad, micro-batch by micro-batch.

    reference=True switches the adapter off: the base model is GRPO's reference policy.
    """
    n, t = batch["completion_mask"].shape
    prompt_len = batch["input_ids"].shape[1] - t
    out = torch.zeros(n, t, device=batch["input_ids"].device)
    model = run.accelerator.unwrap_model(run.model)
    adapter = reference_model(model) if reference else contextlib.nullcontext()
    with torch.no_grad(), adapter:
        for rows in micro_batches(n, micro_batch_size(run.config)):
            logp = micro_batch_logprobs(run, trim(batch, rows, prompt_len))
            out[rows, : logp.shape[1]] = logp
    return out


def micro_batch_weight(loss_type: str, micro_mask: torch.Tensor, full_mask: torch.Tensor) -> float:
    """Factor that makes the sum of micro-batch losses equal the loss of the whole batch.

    ``grpo`` and ``dr_grpo`` average over sequences -> n_micro / N; ``dapo`` averages over tokens ->
    tokens_micro / tokens_total. Example: grpo, 2 of 6 sequences -> 1/3.
    """
    if loss_type == "dapo":
        return (micro_mask.sum() / full_mask.sum().clamp(min=1)).item()
    return micro_mask.shape[0] / full_mask.shape[0]


def policy_update(
    run: Run,
    batch: dict[str, torch.Tensor],
    loss_mask: torch.Tensor,
    advantages: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
) -> tuple[dict[str, float], torch.Tensor]:
    """The gradient of the clipped GRPO objective on the whole batch, accumulated micro-batch by micro-batch.

    batch: the rollout's tensors [N, ...]; loss_mask [N, T]; advantages [N]; old_logp, ref_logp [N, T] or
    None. Returns the loss metrics and the (detached) log-probs [N, T] the loss was computed from; the
    optimiser step is ``optimizer_step``.
    """
    cfg = run.config
    n, t = loss_mask.shape
    prompt_len = batch["input_ids"].shape[1] - t
    sums: dict[str, float] = {}
    trainer_logp = torch.zeros_like(batch["sampler_logp"])
    entropy_sum = entropy_tokens = 0.0
    for rows in micro_batches(n, micro_batch_size(cfg)):
        micro = trim(batch, rows, prompt_len)
        width = micro["completion_mask"].shape[1]
        micro_mask = loss_mask[rows, :width]
        logp, entropy = micro_batch_logprobs(run, micro, return_entropy=True)
        loss, metrics = policy_loss(
            logp,
            None if old_logp is None else old_logp[rows, :width],
            None if ref_logp is None else ref_logp[rows, :width],
            advantages[rows],
            micro_mask,
            eps_low=cfg.epsilon,
            eps_high=cfg.effective_epsilon_high,
            beta=cfg.beta,
            kl_estimator=cfg.kl_estimator,
            loss_type=cfg.loss_type,
            max_completion_length=cfg.max_completion_length,
        )
        weight = micro_batch_weight(cfg.loss_type, micro_mask, loss_mask)
        run.accelerator.backward(loss * weight)
        for key, value in {"loss": loss.item(), **metrics}.items():
            sums[key] = sums.get(key, 0.0) + value * weight
        entropy_sum += (entropy * micro["completion_mask"]).sum().item()
        entropy_tokens += micro["completion_mask"].sum().item()
        trainer_logp[rows, :width] = logp.detach()
    metrics = {
        **sums,
        "clip_ratio": sums["clip_ratio/region"],
        "entropy": entropy_sum / max(entropy_tokens, 1.0),
    }
    return metrics, trainer_logp


def optimizer_step(run: Run, loss: float) -> dict[str, float]:
    """Average the gradients over processes, clip them, step the optimiser and the schedule.

    A non-finite loss or gradient norm skips the update (counted); ``max_nonfinite_updates`` of them in a
    row raise TrainingError. Returns grad_norm, lr and skipped_updates.
    """
    cfg, state = run.config, run.state
    average_gradients(run.trainable_params, run.accelerator)
    grad_norm = clip_gradients(run.trainable_params, cfg.max_grad_norm)
    finite = math.isfinite(grad_norm) and math.isfinite(loss)
    if finite:
        run.optimizer.step()
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
    return {"grad_norm": grad_norm, "lr": lr, "skipped_updates": state.skipped_updates}


def average_gradients(params: list[torch.nn.Parameter], accelerator: Accelerator) -> None:
    """Data parallel: replace each gradient by its mean over processes (one flat all-reduce).

    We do this by hand instead of wrapping the model in DistributedDataParallel: the policy is called
    in several ways per step (adapter on, adapter off, hidden states only, generate), and one explicit
    all-reduce after the backward passes is easier to read and to trust.
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0 = no clipping); return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()


def sample_record(rollout: Rollout, rewards: torch.Tensor) -> dict[str, Any]:
    """The first completion of the batch, to print: what the model is actually writing."""
    row = rollout.rows[0]
    prompt = row["prompt"]
    question = prompt[-1]["content"] if prompt and isinstance(prompt[-1], dict) else str(prompt)
    return {
        "question": question[-300:],
        "answer": row.get("answer"),
        "db_set": row.get("db_set"),
        "completion": rollout.completions[0].text,
        "reward": rewards[0].item(),
    }


# ============================================================================ setup and the run


def make_optimizer(cfg: GRPOConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """bitsandbytes 8-bit AdamW (the recipe's; it also runs on CPU) or torch AdamW."""
    kwargs = dict(lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)
    if cfg.optim == "adamw_8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


def make_scheduler(cfg: GRPOConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """Linear warmup over warmup_ratio * max_steps, then cosine / linear decay (or constant)."""
    from transformers import get_scheduler

    name = {"constant": "constant_with_warmup"}.get(cfg.lr_scheduler_type, cfg.lr_scheduler_type)
    return get_scheduler(
        name,
        optimizer,
        num_warmup_steps=math.ceil(cfg.warmup_ratio * cfg.max_steps),
        num_training_steps=cfg.max_steps,
    )


def setup(cfg: GRPOConfig) -> Run:
    """Build everything a run needs, in the order a reader would: process group, model, data, sampler."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from data.mixture import build_train_dataset
    from models.policy import load_policy, resolve_dtype, resolve_model_path
    from models.samplers import make_sampler

    accelerator = Accelerator()
    set_seed(cfg.seed)  # the same seed on every process: identical LoRA initialisation everywhere
    accelerator.print(f"device: {accelerator.device}, processes: {accelerator.num_processes}")
    model_path = resolve_model_path(cfg.model_name_or_path)
    model, tokenizer = load_policy(cfg, device=accelerator.device, path=model_path)
    trainable = [p for p in model.parameters() if p.requires_grad]
    accelerator.print(
        f"model: {cfg.model_name_or_path} ({'4-bit NF4' if cfg.load_in_4bit else '16-bit'}), "
        f"LoRA r={cfg.lora_r}: {sum(p.numel() for p in trainable):,} trainable parameters"
    )
    train_data = build_train_dataset(cfg, tokenizer)
    optimizer = make_optimizer(cfg, trainable)
    accelerator.print(
        f"optimizer: {type(optimizer).__module__}.{type(optimizer).__name__} on {accelerator.device}"
    )
    scheduler = make_scheduler(cfg, optimizer)
    # every process samples for its own prompts; only the main one says which sampler it is
    quiet = (
        contextlib.nullcontext() if accelerator.is_main_process else contextlib.redirect_stdout(io.StringIO())
    )
    with quiet:
        dtype = resolve_dtype(cfg.dtype, accelerator.device)
        sampler = make_sampler(cfg, model, tokenizer, model_path, dtype)
    return Run(cfg, accelerator, model, tokenizer, sampler, optimizer, scheduler, train_data)


def train(cfg: GRPOConfig) -> Path:
    """Run GRPO for cfg.max_steps optimiser steps; returns the folder of the final checkpoint."""
    return fit(setup(cfg))


def fit(run: Run) -> Path:
    """The outer loop: resume if asked, GRPO steps, metrics, checkpoints, and the plot at the end."""
    cfg, accelerator, state = run.config, run.accelerator, run.state
    output_dir = Path(cfg.output_dir)
    if accelerator.is_main_process:
        for stale in remove_incomplete_checkpoints(output_dir):
            print(f"removed {stale}: a save that was interrupted")
    accelerator.wait_for_everyone()
    if cfg.resume_from_checkpoint:
        path = resolve_checkpoint(cfg.resume_from_checkpoint, output_dir)
        policy = accelerator.unwrap_model(run.model)
        saved = load_checkpoint(path, policy, run.optimizer, run.scheduler, accelerator)
        run.state = state = TrainerState(**{k: saved[k] for k in TrainerState.__dataclass_fields__})
        run.sampler.update_policy(policy)
        accelerator.print(f"resumed from {path} at step {state.step}")
    logger = (
        MetricsLogger(output_dir, cfg.report_to, resume_step=state.step)
        if accelerator.is_main_process
        else None
    )
    last_saved = state.step

    def checkpoint() -> Path:
        nonlocal last_saved
        last_saved = state.step
        trainer_state = {**vars(state), "config": cfg.to_dict()}
        return save_checkpoint(
            output_dir, state.step, run.model, run.optimizer, run.scheduler, trainer_state, accelerator
        )

    # a small fixed evaluation subset, scored greedily every eval_steps (the same on every process)
    eval_rows = eval_subset(cfg, run.tokenizer, size=cfg.eval_size) if cfg.eval_steps else []
    bar = tqdm(total=cfg.max_steps, initial=state.step, desc="GRPO", disable=not accelerator.is_main_process)
    try:
        while state.step < cfg.max_steps:
            started = time.perf_counter()
            try:
                records = grpo_step(run)
            except TrainingError:
                checkpoint()
                raise
            if eval_rows and state.step // cfg.eval_steps > (state.step - len(records)) // cfg.eval_steps:
                records[-1].update(
                    evaluate_rows(run.sampler, eval_rows, cfg.seed, cfg.reward_funcs, cfg.reward_weights)
                )
            for record in records:
                record["step_time"] = (time.perf_counter() - started) / len(records)
                sample = record.pop("sample", None)
                if logger is not None:
                    logger.log(record)
                bar.update(1)
                bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{record['kl']:.4f}")
                if sample is not None and record["step"] % cfg.logging_steps == 0:
                    bar.write(format_sample(record["step"], sample))
            # with num_iterations > 1 a GRPO step makes several optimiser steps: save when one crosses
            # a multiple of save_steps (between rollouts, so nothing half-used needs saving)
            if state.step // cfg.save_steps > last_saved // cfg.save_steps or state.step >= cfg.max_steps:
                checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    final = output_dir / f"checkpoint-{last_saved}"
    if accelerator.is_main_process:
        plot = plot_metrics(output_dir / "metrics.jsonl", output_dir / "metrics.png")
        print(f"adapter: {final}\nmetrics: {output_dir / 'metrics.jsonl'}\nplot:    {plot}")
    run.sampler.close()
    return final


def format_sample(step: int, sample: dict[str, Any]) -> str:
    return (
        f"--- step {step} sample ({sample['db_set']}, gold {sample['answer']!r}, reward {sample['reward']:.3f})\n"
        f"{sample['completion'].strip()}\n---"
    )
