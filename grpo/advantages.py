"""Group-relative advantages: the "GR" of GRPO.

GRPO drops PPO's value network. For each prompt it samples a *group* of G completions, scores them,
and uses how much better each completion did than its siblings as the advantage of every one of its
tokens. Completions are laid out group by group:

    rewards: [N] = [p0g0, p0g1, ..., p0g(G-1), p1g0, ...],   N = prompts * G
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

SCALES = ("group", "batch", "none")


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion relative to its group.

    rewards: [N] with N = P * G, each group of G contiguous. Returns [N] (float, same dtype as rewards).

        A_i = (r_i - mean(group of i)) / (std + eps)

    std is the unbiased standard deviation (torch's default) of the group of i for ``scale="group"``
    (DeepSeekMath), of the whole batch for ``scale="batch"``, and there is no division at all for
    ``scale="none"`` (Dr. GRPO, which argues the division over-weights groups with tiny variance).

    Worked example, rewards [1, 0, 0, 1] with G = 2: groups [1, 0] and [0, 1], means 0.5 and 0.5,
    group std sqrt(0.5) = 0.7071 each, so A = [0.5, -0.5, -0.5, 0.5] / (0.7071 + 1e-4)
    ~= [0.7070, -0.7070, -0.7070, 0.7070]. A group whose rewards are all equal gets A = 0: it carries
    no learning signal (``frac_reward_zero_std`` in the metrics counts such groups).
    """
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"N = {rewards.numel()} rewards is not a multiple of group_size = {group_size}")
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")

    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    group_mean = repeat(grouped.mean(dim=1), "p -> (p g)", g=group_size)
    centred = rewards - group_mean
    if scale == "none":
        return centred
    if scale == "group":
        std = repeat(grouped.std(dim=1), "p -> (p g)", g=group_size)
    else:  # "batch"
        std = rewards.std()
    return centred / (std + eps)


def frac_zero_std_groups(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (no signal). rewards: [N].

    Example: rewards [1, 1, 0, 1] with G = 2 -> groups [1, 1] (zero std) and [0, 1] -> 0.5.
    """
    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    return (grouped.max(dim=1).values == grouped.min(dim=1).values).float().mean().item()
