"""Rollouts: a batch of prompts -> G completions each from the sampler -> rewards.

The first three arrows of GRPO's step (DeepSeekMath, Algorithm 1). Everything here is about data;
the model only appears behind the sampler.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from models.samplers import Completion, Sampler, collate
from rewards import combine_rewards


@dataclass
class Rollout:
    """G completions for each of P prompts, N = P * G, groups contiguous.

    rows: the P dataset rows (``prompt``, ``answer``, ``db_set``, ...).
    completions: the N sampled completions (token ids, text, truncated, sampler log-probs).
    batch: tensors from ``models.samplers.collate``: input_ids / attention_mask [N, Lp + T]
      (rows are [left-padded prompt | right-padded completion]), completion_mask [N, T],
      completion_lengths [N], truncated [N], sampler_logp [N, T].
    columns: every dataset column (but ``prompt``) repeated G times: what reward functions get.
    """

    rows: list[dict]
    completions: list[Completion]
    batch: dict[str, torch.Tensor]
    columns: dict[str, list]

    @property
    def texts(self) -> list[str]:
        return [c.text for c in self.completions]


def sample_prompts(stream: Any, position: int, count: int) -> list[dict]:
    """``count`` prompt rows starting at ``position`` of the (endless, seeded) training stream."""
    return stream.rows(position, count)


def generate_rollout(sampler: Sampler, rows: list[dict], group_size: int, seed: int, pad_id: int) -> Rollout:
    """Sample ``group_size`` completions per row with the current policy and collate them.

    Reproducible for a given seed, which is what makes a resumed run repeat the same samples.
    """
    prompt_ids = sampler.encode([row["prompt"] for row in rows])  # chat template applied once, here
    completions = sampler.generate(prompt_ids, group_size, seed=seed)
    batch = collate(prompt_ids, completions, pad_id)
    columns = {
        key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0] if key != "prompt"
    }
    return Rollout(rows=rows, completions=completions, batch=batch, columns=columns)


def score_rollout(
    rollout: Rollout, reward_funcs: Sequence[str], reward_weights: Sequence[float] | None
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Every reward function on every completion; returns (weighted total [N], {name: [N] unweighted})."""
    return combine_rewards(rollout.texts, rollout.columns, reward_funcs, reward_weights)
