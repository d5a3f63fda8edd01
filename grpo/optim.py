"""The optimiser side of a step: bitsandbytes 8-bit AdamW and the schedule, and the data-parallel gradient
sum and clipping that come before each optimiser step."""

from __future__ import annotations

import math
from typing import Any

import torch

from grpo.config import GRPOConfig


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
    warmup = math.ceil(cfg.warmup_ratio * cfg.max_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=cfg.max_steps)


def sum_gradients(params: list[torch.nn.Parameter], accelerator: Any) -> None:
    """Data parallel: replace each gradient by its sum over processes (one flat all-reduce).

    Every process's loss is already divided by the whole batch's counts, so the sum is the gradient of the
    whole batch's loss. We do this by hand instead of wrapping the model in DistributedDataParallel: the
    policy is called in several ways per step (adapter on, adapter off, hidden states only, generate), and
    one explicit all-reduce after the backward passes is easier to read and to trust.
    """
    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="sum")
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def clip_gradients(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm to max_norm (0 = no clipping); return the norm before clipping."""
    return torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf")).item()
