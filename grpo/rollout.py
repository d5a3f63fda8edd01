"""Rollouts: a batch of prompts -> G completions each from the sampler, padded into the trainer's tensors.

The second arrow of GRPO's step (DeepSeekMath, Algorithm 1). Everything here is about data; the model only
appears behind the sampler (``models/samplers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from models.samplers import Completion, Sampler


@dataclass
class Rollout:
    """G completions for each of P prompts, N = P * G, groups contiguous.

    rows: the P dataset rows (``prompt``, ``answer``, ``db_set``, ...).
    completions: the N sampled completions (token ids, text, truncated, sampler log-probs).
    batch: tensors from ``collate``: input_ids / attention_mask [N, Lp + T]
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


def generate_rollout(
    sampler: Sampler, rows: list[dict], group_size: int, seeds: Sequence[int], pad_id: int
) -> Rollout:
    """Sample ``group_size`` completions per row with the current policy and collate them.

    The chat template is applied here, once. seeds: one per row; the same seed draws the same completions
    whatever else is in the batch, which is what makes a resumed run repeat the same samples and the
    number of processes irrelevant.
    """
    prompt_ids = sampler.encode([row["prompt"] for row in rows])
    completions = sampler.generate(prompt_ids, group_size, seeds)
    batch = collate(prompt_ids, completions, pad_id)
    columns = {
        key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0] if key != "prompt"
    }
    return Rollout(rows=rows, completions=completions, batch=batch, columns=columns)


def collate(
    prompt_ids: Sequence[Sequence[int]], outputs: Sequence[Completion], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad prompts (left) and completions (right) into the tensors the trainer needs.

    prompt_ids: P lists of ids; outputs: N completions (``prompt_index`` says whose). Returns
      prompt_ids [N, Lp] (left-padded), prompt_mask [N, Lp], completion_ids [N, T] (right-padded),
      completion_mask [N, T] float (1 on real tokens, EOS included), input_ids / attention_mask [N, Lp + T]
      (rows are [left-padded prompt | right-padded completion]), sampler_logp [N, T] (0 on padding),
      completion_lengths [N] long, truncated [N] bool.

    The masks come from the lengths, never from comparing ids with pad_id: the pad may equal the EOS.

    Example: prompts [[5, 6], [7]], completions (prompt 0: [8, 2]), (prompt 1: [9]) with pad 0 ->
    prompt_ids [[5, 6], [0, 7]], completion_ids [[8, 2], [9, 0]], completion_mask [[1, 1], [1, 0]].
    """
    if not outputs:
        raise ValueError("collate needs at least one completion")
    rows = [list(prompt_ids[o.prompt_index]) for o in outputs]
    n = len(outputs)
    prompt_len = max(len(r) for r in rows)
    comp_len = max(1, max(len(o.token_ids) for o in outputs))
    p_ids = torch.full((n, prompt_len), pad_id, dtype=torch.long)
    p_mask = torch.zeros((n, prompt_len), dtype=torch.long)
    c_ids = torch.full((n, comp_len), pad_id, dtype=torch.long)
    c_logp = torch.zeros((n, comp_len), dtype=torch.float32)
    lengths = torch.tensor([len(o.token_ids) for o in outputs], dtype=torch.long)
    for i, (row, out) in enumerate(zip(rows, outputs, strict=True)):
        if len(out.logprobs) != len(out.token_ids):
            raise ValueError(
                f"completion {i}: {len(out.token_ids)} token ids but {len(out.logprobs)} log-probs"
            )
        if row:
            p_ids[i, prompt_len - len(row) :] = torch.tensor(row)
            p_mask[i, prompt_len - len(row) :] = 1
        if out.token_ids:
            c_ids[i, : len(out.token_ids)] = torch.tensor(out.token_ids)
            c_logp[i, : len(out.token_ids)] = torch.tensor(out.logprobs)
    c_mask = (torch.arange(comp_len)[None, :] < lengths[:, None]).float()
    return {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "completion_ids": c_ids,
        "completion_mask": c_mask,
        "input_ids": torch.cat([p_ids, c_ids], dim=1),
        "attention_mask": torch.cat([p_mask, c_mask.long()], dim=1),
        "sampler_logp": c_logp,
        "completion_lengths": lengths,
        "truncated": torch.tensor([o.truncated for o in outputs], dtype=torch.bool),
    }
