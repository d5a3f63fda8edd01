"""Rollouts: prompts -> G completions each from the sampler -> rewards, for the whole batch of every process.

The first three arrows of GRPO's step (DeepSeekMath, Algorithm 1). Every process samples its share of the
prompts, scores them, and then all processes exchange their groups (token ids, log-probs, rewards: small), so
that each one holds the whole rollout. That makes every batch statistic (the batch std of ``scale_rewards:
batch``, GDPO's normalisation, DAPO's dynamic sampling, the logged metrics) the whole batch's, and lets each
process take exactly the groups that the same step would give it on one process: the number of processes
changes who computes what, never the math.

The model only appears behind the sampler (``models/samplers.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

from grpo.advantages import informative_groups, weighted_reward_sum
from grpo.config import GRPOConfig
from grpo.metrics import PhaseTimer, length_metrics, reward_metrics
from models.samplers import Completion, Pending, Sampler, derive_seed
from rewards import RewardFuncError, combine_rewards


@dataclass
class Group:
    """One prompt and its G sampled, scored completions.

    position: the prompt's position in the training stream (its seed is ``derive_seed(seed, position)``).
    row: the dataset row (``prompt``, ``answer``, ``db_set``, ...). prompt_ids: its token ids (chat template
    applied). completions: G completions. rewards_per_func: [G, K] unweighted rewards of the K functions.
    version: the optimiser steps of the policy that sampled it (``staleness_metrics`` compares it with the
    trainer's).
    """

    position: int
    row: dict
    prompt_ids: list[int]
    completions: list[Completion]
    rewards_per_func: torch.Tensor
    version: int = 0


@dataclass
class PendingRound:
    """One round of sampling on its way (``start_round``): this process's share of the round's positions, their
    rows and prompt ids, the completions the sampler is drawing, and the policy version that draws them."""

    positions: range  # the whole round's positions in the training stream, all processes
    mine: list[int]  # this process's share of them
    rows: list[dict]
    prompt_ids: list[list[int]]
    completions: Pending  # G completions per prompt, groups contiguous
    version: int  # optimiser steps done by the policy that samples


def start_round(
    sampler: Sampler, train_data: Any, cfg: GRPOConfig, accelerator: Any, positions: range, version: int = 0
) -> PendingRound:
    """Send this process's share of ``positions`` to the sampler: G completions each, from the policy it holds
    (``version`` optimiser steps old). Each prompt is seeded by its position in the stream, so its completions
    are the same whatever else is in the batch: on one process or many, in a resumed run or the uninterrupted one.
    """
    mine = process_share(positions, accelerator.process_index, accelerator.num_processes)
    rows = train_data.rows(mine[0], len(mine)) if mine else []
    prompt_ids = sampler.encode([row["prompt"] for row in rows])  # the chat template, applied once, here
    seeds = [derive_seed(cfg.seed, position) for position in mine]
    completions = sampler.submit(prompt_ids, cfg.num_generations, seeds)
    return PendingRound(positions, mine, rows, prompt_ids, completions, version)


def score_groups(
    rows: list[dict],
    generated: list[tuple[list[int], list[Completion]]],
    reward_funcs: Sequence[str],
    *,
    positions: Sequence[int] | None = None,
    num_workers: int = 4,
    timeout: float | None = None,
    **reward_kwargs: Any,
) -> list[torch.Tensor]:
    """The unweighted rewards [G, K] of each group's completions under the K reward functions, NaN where a
    function returned None ("does not apply").

    Reward functions get the completions' texts, the dataset columns (``answer``, ``db_set``, ...), and, in
    TRL's convention, ``prompts`` and ``completion_ids``; ``reward_kwargs`` too (e.g. max_completion_length).
    ``num_workers`` and ``timeout`` are ``combine_rewards``' (reward_num_workers, reward_timeout). A function
    that fails is a RewardFuncError naming the completion by its prompt's ``positions`` in the training stream
    (default: the row's index in ``rows``), its source and its number in the group:
    ``prompt 57 of the training stream (gsm8k), completion 3``.
    """
    group_size = len(generated[0][1])
    completions = [c for _, group in generated for c in group]
    columns = {
        key: [row[key] for row in rows for _ in range(group_size)] for key in rows[0] if key != "prompt"
    }
    where = "of the training stream" if positions is not None else "of the batch"
    row_names = [
        f"prompt {at} {where} ({row.get('db_set', '?')}), completion {g}"
        for at, row in zip(range(len(rows)) if positions is None else positions, rows, strict=True)
        for g in range(group_size)
    ]
    _, per_func = combine_rewards(
        [c.text for c in completions],
        columns,
        reward_funcs,
        prompts=[row["prompt"] for row in rows for _ in range(group_size)],
        completion_ids=[c.token_ids for c in completions],
        num_workers=num_workers,
        timeout=timeout,
        row_names=row_names,
        **reward_kwargs,
    )
    table = torch.stack(list(per_func.values()), dim=1)  # [N, K]
    return list(table.split(group_size))


def raise_reward_failure(accelerator: Any, failure: RewardFuncError | None) -> None:
    """Raise on every process when the reward functions failed on any (called by all, after scoring).

    Otherwise the processes that scored would wait forever for the failed one in the next exchange. The failed
    process raises its own error; the others one that quotes it.
    """
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        reports = gather_object([None if failure is None else str(failure)])
        others = [(rank, report) for rank, report in enumerate(reports) if report is not None]
        if failure is None and others:
            rank, report = others[0]
            raise RewardFuncError(f"on process {rank}: {report}")
    if failure is not None:
        raise failure


def process_share(positions: Sequence[int], rank: int, world: int) -> list[int]:
    """The positions one process samples: a contiguous 1/world of them (all of them on one process).

    Example: positions 0..5, rank 1 of 2 -> [3, 4, 5].
    """
    per_process = -(-len(positions) // world)
    return list(positions[rank * per_process : (rank + 1) * per_process])


def all_groups(accelerator: Any, groups: list[Group]) -> list[Group]:
    """Every process's groups, in stream order, on every process (one all-gather of small objects)."""
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        groups = gather_object(groups)
    return sorted(groups, key=lambda g: g.position)


def keep_informative(groups: list[Group], weights: torch.Tensor) -> tuple[list[Group], list[Group]]:
    """(groups whose weighted rewards differ, groups whose rewards all agree): DAPO's dynamic-sampling filter.

    A group whose G rewards are equal has zero advantage and no policy gradient (verl ``filter_groups``).
    """
    if not groups:
        return [], []
    totals = torch.cat([weighted_reward_sum(g.rewards_per_func, weights) for g in groups])
    keep = informative_groups(totals, len(groups[0].completions)).tolist()
    return [g for g, k in zip(groups, keep, strict=True) if k], [
        g for g, k in zip(groups, keep, strict=True) if not k
    ]


@dataclass
class Rollout:
    """What arrows 1-3 hand on: the rollout's groups (all processes', in stream order), where the training stream
    continues, and the dynamic-sampling metrics (empty without dynamic sampling)."""

    groups: list[Group]
    next_position: int
    metrics: dict[str, float]


def finish_round(pending: PendingRound, cfg: GRPOConfig, accelerator: Any, timer: Any = None) -> list[Group]:
    """Wait for a round's completions and score them; then every process holds every process's groups
    (``all_groups``). A reward function that fails on any process stops every process with the same
    RewardFuncError."""
    timer = timer or PhaseTimer()
    local, failure = [], None
    if pending.mine:
        with timer("generate"):  # the wait: what generation did not hide behind the previous step
            completions = pending.completions.result()
        g = cfg.num_generations
        generated = [(ids, completions[i * g : (i + 1) * g]) for i, ids in enumerate(pending.prompt_ids)]
        with timer("score"):
            try:
                rewards = score_groups(
                    pending.rows,
                    generated,
                    cfg.reward_funcs,
                    positions=pending.mine,
                    num_workers=cfg.reward_num_workers,
                    timeout=cfg.reward_timeout,
                    max_completion_length=cfg.max_completion_length,
                    soft_punish_cache=cfg.soft_punish_cache,
                    **judge_settings(cfg),
                )
            except RewardFuncError as err:
                failure = err
        if failure is None:
            for at, row, (ids, group), table in zip(
                pending.mine, pending.rows, generated, rewards, strict=True
            ):
                local.append(Group(at, row, ids, group, table, pending.version))
    raise_reward_failure(accelerator, failure)
    return all_groups(accelerator, local)


def sample_rollout(
    sampler: Sampler,
    train_data: Any,
    cfg: GRPOConfig,
    accelerator: Any,
    position: int,
    timer: Any = None,
    first: PendingRound | None = None,
    version: int = 0,
) -> Rollout:
    """Arrows 1-3: a batch of prompts from ``position`` of the training stream ``train_data`` -> G completions
    each -> rewards. timer: a ``grpo.metrics.PhaseTimer`` that gets the "generate" and "score" phases.
    first: the first round, already sent (``async_generation``: by the policy one step behind); else it is sent
    now, by the policy the sampler holds, ``version`` optimiser steps old (as every further round is).

    Without dynamic sampling: one round of ``rollout_prompts`` prompts. With it (DAPO), rounds of that many
    prompts until as many groups carry a signal (their rewards differ), at most ``max_sampling_rounds``;
    then the first informative groups, topped up with uninformative ones if the rounds ran out.
    """
    timer = timer or PhaseTimer()
    needed = rollout_prompts(cfg, accelerator.num_processes)

    def sample_round(positions: range) -> list[Group]:
        if first is not None and positions == first.positions:
            return finish_round(first, cfg, accelerator, timer)
        with timer("generate"):
            pending = start_round(sampler, train_data, cfg, accelerator, positions, version)
        return finish_round(pending, cfg, accelerator, timer)

    if first is not None and first.positions.start != position:
        raise ValueError(f"the round sent ahead starts at {first.positions.start}, the rollout at {position}")
    if not cfg.dynamic_sampling:
        return Rollout(sample_round(range(position, position + needed)), position + needed, {})
    informative: list[Group] = []
    uninformative: list[Group] = []
    rounds = 0
    while rounds < cfg.max_sampling_rounds and len(informative) < needed:
        rounds += 1
        positions = range(position, position + needed)
        position += needed
        kept, dropped = keep_informative(sample_round(positions), reward_weights(cfg))
        informative += kept
        uninformative += dropped
    metrics = {
        "sampling/rounds": float(rounds),
        "sampling/informative_groups": float(min(len(informative), needed)),
        "sampling/filler_groups": float(max(needed - len(informative), 0)),
    }
    return Rollout((informative + uninformative)[:needed], position, metrics)


def staleness_metrics(groups: list[Group], step: int) -> dict[str, float]:
    """TRL's ``sample/staleness_*``: how many optimiser steps the policies that sampled ``groups`` lag behind the
    policy trained at ``step`` (optimiser steps done). 0 when each rollout is sampled by the policy it trains
    (one optimiser step per rollout, synchronous); 1 with ``async_generation`` (sampled one step behind).

    Example: groups of versions [3, 3, 4] trained at step 4 -> mean 2/3, max 1.
    """
    lags = [step - g.version for g in groups]
    return {"sample/staleness_mean": sum(lags) / len(lags), "sample/staleness_max": float(max(lags))}


def judge_settings(cfg: GRPOConfig) -> dict[str, Any]:
    """The judge_* fields, passed to the reward functions as keywords (rewards/judge.py reads them)."""
    return {
        "judge_base_url": cfg.judge_base_url,
        "judge_model": cfg.judge_model,
        "judge_timeout": cfg.judge_timeout,
        "judge_max_concurrency": cfg.judge_max_concurrency,
    }


def rollout_prompts(cfg: GRPOConfig, num_processes: int) -> int:
    """Prompts per rollout, all processes: per_device_train_batch_size x steps_per_generation x processes."""
    return cfg.per_device_train_batch_size * cfg.effective_steps_per_generation * num_processes


def optimizer_steps_per_rollout(cfg: GRPOConfig) -> int:
    """steps_per_generation / gradient_accumulation_steps: optimiser steps fed by one rollout."""
    return cfg.effective_steps_per_generation // cfg.gradient_accumulation_steps


def reward_weights(cfg: GRPOConfig) -> torch.Tensor:
    """[K] the weight of each reward function (reward_weights, 1.0 each when None)."""
    return torch.tensor(cfg.reward_weights or [1.0] * len(cfg.reward_funcs), dtype=torch.float32)


def per_token(**kw: Any) -> Any:
    """A StepBatch field of shape [n, T]: ``StepBatch.micro_batch`` cuts it to the micro-batch's columns."""
    return field(metadata={"per_token": True}, **kw)


@dataclass
class StepBatch:
    """This process's rows of one optimiser step: what the rollout (arrows 1-5) hands the update (arrow 6).

    n = this process's completions (its groups x G, each group contiguous), P = the longest prompt,
    T = the longest completion, L = P + T. The counts are the whole step's over all processes: the loss divides
    by them, so the micro-batches' and processes' gradients add up to the whole batch's.
    """

    input_ids: Tensor  # [n, L] long: [left-padded prompt | right-padded completion]
    attention_mask: Tensor  # [n, L] long: 1 on real prompt and completion tokens
    completion_lengths: Tensor  # [n] long: tokens of each completion (EOS included)
    completion_mask: Tensor = per_token()  # [n, T] float: 1 on real completion tokens (from the lengths)
    loss_mask: Tensor = per_token()  # [n, T] float: completion_mask without truncated completions when masked
    sampler_logp: Tensor = per_token()  # [n, T] float: the sampler's log-probs of its tokens (0 on padding)
    advantages: Tensor = None  # [n] float: group-normalised advantages (arrow 4)
    num_sequences: float = 0.0  # completions in the whole step, all processes
    num_tokens: float = 0.0  # loss tokens (loss_mask) in the whole step, all processes
    tokens_seen: int = 0  # prompt + completion tokens of the whole step (TRL's num_tokens)
    metrics: dict[str, float] = field(
        default_factory=dict
    )  # the step's reward and length metrics, all processes
    old_logp: Tensor | None = per_token(
        default=None
    )  # [n, T] the policy that sampled (arrow 5; None = current)
    old_entropy: Tensor | None = per_token(default=None)  # [n, T] its token entropies (top_entropy_quantile)
    ref_logp: Tensor | None = per_token(default=None)  # [n, T] the reference, adapter off (arrow 5, beta > 0)
    entropy_mask: Tensor | None = per_token(default=None)  # [n, T] 1 on the high-entropy tokens that count

    @property
    def prompt_len(self) -> int:
        """P: the prompt part's width in input_ids."""
        return self.input_ids.shape[1] - self.completion_mask.shape[1]

    def micro_batch(self, rows: slice) -> StepBatch:
        """The rows of a micro-batch, without the padding columns that none of its rows uses.

        Prompts are left-padded, completions right-padded, so the columns to drop are a prefix of the prompt part
        and a suffix of the completion part. Example: completions of lengths 3 and 1 in a batch padded to T = 8
        keep 3 completion columns. Counts and metrics stay the whole step's.
        """
        prompt_len = self.prompt_len
        mask = self.attention_mask[rows]
        first = int(mask[:, :prompt_len].any(dim=0).float().argmax()) if prompt_len else 0
        longest = int(self.completion_lengths[rows].max().clamp(min=1))
        cut = {
            f.name: getattr(self, f.name)[rows, :longest]
            for f in fields(self)
            if f.metadata.get("per_token") and getattr(self, f.name) is not None
        }
        return replace(
            self,
            input_ids=self.input_ids[rows, first : prompt_len + longest],
            attention_mask=mask[:, first : prompt_len + longest],
            completion_lengths=self.completion_lengths[rows],
            advantages=self.advantages[rows],
            **cut,
        )


def step_batch(
    groups: list[Group], advantages: torch.Tensor, k: int, cfg: GRPOConfig, accelerator: Any, pad_id: int
) -> StepBatch:
    """This process's part of optimiser step k of the rollout, as padded tensors on its device.

    Step k trains on the rollout's groups [k * B, (k + 1) * B), B = per_device_train_batch_size x
    gradient_accumulation_steps x processes, of which process r takes the r-th B / processes: exactly the rows
    one process would take, whatever the number of processes. advantages: [R * G] of the whole rollout.
    """
    G = cfg.num_generations
    per_process = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    per_step = per_process * accelerator.num_processes
    step_groups = groups[k * per_step : (k + 1) * per_step]
    first = k * per_step + accelerator.process_index * per_process
    padded = {
        key: value.to(accelerator.device)
        for key, value in collate_groups(groups[first : first + per_process], pad_id).items()
    }
    loss_mask = padded["completion_mask"]
    if cfg.mask_truncated_completions:  # a cut-off completion has no honest reward: leave it out
        loss_mask = loss_mask * (~padded["truncated"]).float()[:, None]
    completions = [c for g in step_groups for c in g.completions]
    kept = [c for c in completions if not (cfg.mask_truncated_completions and c.truncated)]
    return StepBatch(
        input_ids=padded["input_ids"],
        attention_mask=padded["attention_mask"],
        completion_lengths=padded["completion_lengths"],
        completion_mask=padded["completion_mask"],
        loss_mask=loss_mask,
        sampler_logp=padded["sampler_logp"],
        advantages=advantages[first * G : (first + per_process) * G].to(accelerator.device),
        num_sequences=float(len(completions)),
        num_tokens=float(sum(len(c.token_ids) for c in kept)),
        # TRL counts each completion's prompt: G copies of the prompt per group
        tokens_seen=sum(len(g.prompt_ids) * G for g in step_groups)
        + sum(len(c.token_ids) for c in completions),
        metrics=step_metrics(step_groups, cfg),
    )


def step_metrics(step_groups: list[Group], cfg: GRPOConfig) -> dict[str, float]:
    """The reward and length metrics of one optimiser step's groups (all processes')."""
    G = cfg.num_generations
    completions = [c for g in step_groups for c in g.completions]
    rewards_per_func = torch.cat([g.rewards_per_func for g in step_groups])  # [n_step, K]
    return {
        "num_completions": len(completions),
        **reward_metrics(
            weighted_reward_sum(rewards_per_func, reward_weights(cfg)),
            {
                name: rewards_per_func[:, i] for i, name in enumerate(cfg.reward_funcs)
            },  # as the config names them
            [g.row["db_set"] for g in step_groups for _ in range(G)],
            G,
        ),
        **length_metrics(
            torch.tensor([len(c.token_ids) for c in completions]),
            torch.tensor([c.truncated for c in completions]),
        ),
    }


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


def collate_groups(groups: list[Group], pad_id: int) -> dict[str, torch.Tensor]:
    """``collate`` of the completions of some groups, in order: N = len(groups) * G rows."""
    outputs = [
        Completion(p, c.token_ids, c.text, c.truncated, c.logprobs)
        for p, group in enumerate(groups)
        for c in group.completions
    ]
    return collate([g.prompt_ids for g in groups], outputs, pad_id)
