"""DAPO's soft overlong punishment (Yu et al. 2025, Eq. 13): a length penalty on completions near the limit.

A completion cut at ``max_completion_length`` usually has no answer, and its reward says nothing about its
reasoning. DAPO adds a penalty that starts ``soft_punish_cache`` tokens before the limit and grows linearly
to -1 at the limit, so a model learns to finish in time instead of being hit by an abrupt cut. Shorter
completions are never rewarded for being short: their penalty is 0.

Same semantics as TRL's ``trl.rewards.get_soft_overlong_punishment`` (lengths are ``len(ids)`` of each
completion's token ids). Two ways to use it:

- ``soft_overlong_punishment(1024, 256)`` returns a reward function with its limits fixed (TRL's form);
- the registered name ``"soft_overlong_punishment"`` (``soft_overlong_punishment_reward_func``) reads them
  per call, so a config can name it: the trainer calls
  ``combine_rewards(completions, columns, funcs, weights, completion_ids=ids,
  max_completion_length=cfg.max_completion_length, soft_punish_cache=cfg.soft_punish_cache)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import torch


def overlong_penalty(length: int, max_completion_length: int, soft_punish_cache: int) -> float:
    """DAPO's R_length for one completion of ``length`` tokens, with L = max_completion_length and
    C = soft_punish_cache:

    0 when length <= L - C; (L - C - length) / C when L - C < length <= L; -1 when length > L.

    Worked example, L = 100, C = 20: lengths 80 -> 0.0, 90 -> (80 - 90) / 20 = -0.5, 100 -> -1.0, 101 -> -1.0.

    >>> [overlong_penalty(n, 100, 20) for n in (80, 81, 90, 100, 101)]
    [0.0, -0.05, -0.5, -1.0, -1.0]
    """
    free_length = max_completion_length - soft_punish_cache
    if length <= free_length:
        return 0.0
    if length <= max_completion_length:  # only reached when soft_punish_cache > 0
        return (free_length - length) / soft_punish_cache
    return -1.0


def _check_limits(max_completion_length: Any, soft_punish_cache: Any, who: str) -> None:
    """Clear errors for limits that are missing, not integers, or make no sense (cache outside [0, max])."""
    for name, value in (
        ("max_completion_length", max_completion_length),
        ("soft_punish_cache", soft_punish_cache),
    ):
        if value is None:
            raise ValueError(
                f"{who}: needs {name}; pass it through combine_rewards(..., completion_ids=..., "
                "max_completion_length=..., soft_punish_cache=...)"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{who}: {name} must be an integer, got {value!r}")
    if max_completion_length <= 0:
        raise ValueError(f"{who}: max_completion_length must be positive, got {max_completion_length}")
    if not 0 <= soft_punish_cache <= max_completion_length:
        raise ValueError(
            f"{who}: soft_punish_cache must be in [0, max_completion_length={max_completion_length}], "
            f"got {soft_punish_cache}"
        )


def _completion_lengths(completion_ids: Any, n: Optional[int], who: str) -> list[int]:
    """``len(ids)`` of each completion's (unpadded) token ids, checked."""
    if completion_ids is None:
        raise ValueError(
            f"{who}: needs completion_ids (one list of token ids per completion, without padding); "
            "pass combine_rewards(..., completion_ids=...)"
        )
    if isinstance(completion_ids, torch.Tensor):
        # A padded [N, T] tensor would give every completion the length T.
        raise ValueError(f"{who}: completion_ids must be a list of unpadded token-id lists, not a tensor")
    lengths = [len(ids) for ids in completion_ids]
    if n is not None and len(lengths) != n:
        raise ValueError(f"{who}: {n} completions but {len(lengths)} completion_ids entries")
    return lengths


def soft_overlong_punishment(
    max_completion_length: int, soft_punish_cache: int
) -> Callable[..., list[float]]:
    """A reward function ``f(completions=None, completion_ids=..., **columns) -> list[float]`` giving
    ``overlong_penalty(len(ids), max_completion_length, soft_punish_cache)`` for each completion.

    TRL's ``get_soft_overlong_punishment(max_completion_len, soft_punish_cache)``, the same numbers.

    >>> punish = soft_overlong_punishment(max_completion_length=100, soft_punish_cache=20)
    >>> punish(completion_ids=[[1] * 90, [1] * 10])
    [-0.5, 0.0]
    """
    _check_limits(max_completion_length, soft_punish_cache, "soft_overlong_punishment")

    def reward(
        completions: Optional[Sequence[Any]] = None, completion_ids: Any = None, **columns: Any
    ) -> list[float]:
        n = None if completions is None else len(completions)
        lengths = _completion_lengths(completion_ids, n, "soft_overlong_punishment")
        return [overlong_penalty(length, max_completion_length, soft_punish_cache) for length in lengths]

    reward.__name__ = "soft_overlong_punishment"
    return reward


def soft_overlong_punishment_reward_func(
    completions: Sequence[Any],
    completion_ids: Any = None,
    max_completion_length: Optional[int] = None,
    soft_punish_cache: Optional[int] = None,
    **columns: Any,
) -> list[float]:
    """``overlong_penalty`` of each completion, with the limits passed per call (the registered
    ``"soft_overlong_punishment"``): ``combine_rewards(..., completion_ids=ids, max_completion_length=L,
    soft_punish_cache=C)``.

    >>> soft_overlong_punishment_reward_func(["a", "b"], [[1] * 85, [1] * 120], max_completion_length=100,
    ...                                      soft_punish_cache=20)
    [-0.25, -1.0]
    """
    who = "soft_overlong_punishment"
    _check_limits(max_completion_length, soft_punish_cache, who)
    lengths = _completion_lengths(completion_ids, len(completions), who)
    return [overlong_penalty(length, max_completion_length, soft_punish_cache) for length in lengths]
