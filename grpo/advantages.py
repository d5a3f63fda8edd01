"""Group-relative advantages: the "GR" of GRPO.

GRPO drops PPO's value network. For each prompt it samples a *group* of G completions, scores them,
and uses how much better each completion did than its siblings as the advantage of every one of its
tokens. Completions are laid out group by group:

    rewards: [N] = [p0g0, p0g1, ..., p0g(G-1), p1g0, ...],   N = prompts * G

With several reward functions the rewards are [N, K] (one column per function) and
``multi_objective_advantages`` combines them (TRL's sum, or GDPO's per-function normalisation).
Every function here takes the WHOLE batch (all processes): group and batch statistics must not
depend on how the batch is split.

A reward may be NaN: the function returned ``None``, "does not apply to this row" (TRL 1.16). As in
TRL, such a value is left out of every statistic (``nanmean``, ``nanstd``, a weighted ``nansum`` over
the functions that apply), and a completion that no function scores gets advantage 0
(rewards/registry.py refuses such a row before it gets here; these functions still follow TRL).
"""

from __future__ import annotations

import torch
from einops import rearrange, repeat

SCALES = ("group", "batch", "none")
AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def nan_std(values: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """The unbiased std of the values that are not NaN (TRL's ``nanstd``); NaN where fewer than two are.

    values: any shape; reduced over ``dim`` (all dimensions when None). Without NaN it is ``torch.std``.

    Example: [1, nan, 3] -> the std of [1, 3] = sqrt(((1 - 2)^2 + (3 - 2)^2) / 1) = 1.4142; [5, nan] -> nan.
    """
    mean = torch.nanmean(values, dim=dim, keepdim=True)
    count = (~torch.isnan(values)).sum(dim=dim, keepdim=True)
    squares = torch.nansum((values - mean) ** 2, dim=dim, keepdim=True)
    std = torch.where(count > 1, squares / (count - 1).clamp(min=1), torch.nan).sqrt()
    if keepdim:
        return std
    return std.squeeze() if dim is None else std.squeeze(dim)


def weighted_reward_sum(rewards_per_func: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """The total reward of each completion: sum_k w_k * r_k over the functions that apply to it.

    rewards_per_func: [N, K], NaN where function k returned None; weights: [K]. Returns [N]: TRL's
    ``nansum`` of the weighted rewards, and NaN where no function applies (TRL marks such a row
    "unscorable" rather than giving it a reward of 0).

    Example: weights [1, 0.5], rows [1, 2], [nan, 2], [nan, nan] -> [2, 1, nan].
    """
    weighted = rewards_per_func * weights.to(rewards_per_func.dtype)
    total = weighted.nansum(dim=1)
    return torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, total)


def group_advantages(
    rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """Advantage of each completion relative to its group.

    rewards: [N] with N = P * G, each group of G contiguous. Returns [N] (float, same dtype as rewards).

        A_i = (r_i - mean(group of i)) / (std + eps)

    std is the unbiased standard deviation (torch's default) of the group of i for ``scale="group"``
    (DeepSeekMath), of the whole batch for ``scale="batch"``, and there is no division at all for
    ``scale="none"`` (Dr. GRPO, which argues the division over-weights groups with tiny variance).
    A NaN reward (no reward function applies) is left out of the means and stds and its advantage is 0;
    so is the advantage of a completion alone in its group with a number (its std is undefined), as in TRL.

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
    group_mean = repeat(torch.nanmean(grouped, dim=1), "p -> (p g)", g=group_size)
    centred = rewards - group_mean
    if scale == "none":
        return torch.nan_to_num(centred, nan=0.0)
    if scale == "group":
        std = repeat(nan_std(grouped, dim=1), "p -> (p g)", g=group_size)
    else:  # "batch"
        std = nan_std(rewards)
    return torch.nan_to_num(centred / (std + eps), nan=0.0)


def frac_zero_std_groups(rewards: torch.Tensor, group_size: int) -> float:
    """Fraction of groups whose G rewards are all equal (no signal). rewards: [N].

    Example: rewards [1, 1, 0, 1] with G = 2 -> groups [1, 1] (zero std) and [0, 1] -> 0.5.
    NaN rewards (no function applies) are left out; a group with no number at all is not counted as equal.
    """
    highest, lowest = group_spread(rewards, group_size)
    return (highest == lowest).float().mean().item()


def group_spread(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(highest, lowest) reward of each group, NaN left out: two [P] tensors. rewards: [N].

    A group whose rewards are all NaN gets highest -inf and lowest +inf (it neither agrees nor differs).
    Example: [1, nan, 0, 3] with G = 2 -> highest [1, 3], lowest [1, 0].
    """
    grouped = rearrange(rewards, "(p g) -> p g", g=group_size)
    missing = torch.isnan(grouped)
    highest = torch.where(missing, -torch.inf, grouped).max(dim=1).values
    lowest = torch.where(missing, torch.inf, grouped).min(dim=1).values
    return highest, lowest


def multi_objective_advantages(
    rewards_per_func: torch.Tensor,
    weights: torch.Tensor,
    group_size: int,
    aggregation: str = "sum_then_normalize",
    scale: str = "group",
    eps: float = 1e-4,
) -> torch.Tensor:
    """Advantages from K reward functions (TRL 1.16 ``multi_objective_aggregation``).

    rewards_per_func: [N, K], column k the rewards of function k; weights: [K]. Returns [N].

    - ``sum_then_normalize`` (TRL's default): r = sum_k w_k * r_k, then
      ``group_advantages(r, G, scale, eps)``.
    - ``normalize_then_sum`` (GDPO, arXiv 2601.05242): each function is normalised within its group first,
      z_k = (r_k - group mean_k) / (group std_k + eps), then s = sum_k w_k * z_k, then over the whole batch
      A = (s - mean(s)) / (std(s) + eps). A function whose values vary a lot can no longer drown the
      others, and two completions that differ in different functions no longer get the same advantage.
      ``scale`` must stay "group" here: TRL ignores scale_rewards in this mode (the batch step is fixed).

    std is the unbiased std (TRL's nanstd) in both modes.

    NaN in ``rewards_per_func`` means "function k does not apply to this row" (it returned None), with TRL
    1.16's semantics: sum_then_normalize sums only the functions that apply (``weighted_reward_sum``);
    normalize_then_sum normalises each function over the rows of the group it applies to, and a function
    that applies to fewer than two rows of a group (no std) adds nothing to that group. A row that no
    function applies to is left out of every statistic and gets advantage 0.

    Worked example, G = 2, weights [1, 0.5], rewards_per_func columns [1, 0, 1, 1] and [0, 0, 2, 0]:
    sum_then_normalize: r = [1, 0, 2, 1], both groups differ by 1, A = [0.7070, -0.7070, 0.7070, -0.7070];
    normalize_then_sum: z_0 = [0.7070, -0.7070, 0, 0], z_1 = [0, 0, 0.7070, -0.7070],
    s = [0.7070, -0.7070, 0.3535, -0.3535], mean 0, std 0.6454 -> A = [1.0953, -1.0953, 0.5477, -0.5477]:
    the second prompt's completions now differ by half as much, because only the half-weight function
    separated them.

    The same with None: the second function does not apply to row 3 (column [0, 0, 2, nan]).
    sum_then_normalize: r = [1, 0, 1 + 0.5 * 2, 1] = [1, 0, 2, 1], the same A as above;
    normalize_then_sum: function 1 applies to one row of the second group only, so it has no std there and
    z_1 = [0, 0, nan, nan] (left out): s = [0.7070, -0.7070, 0, 0], mean 0, std 0.5773 ->
    A = [1.2245, -1.2245, 0, 0]: with one score of function 1 the second group has nothing to compare.

    """
    if rewards_per_func.dim() != 2:
        raise ValueError(f"rewards_per_func must be 2-D [N, K], got shape {tuple(rewards_per_func.shape)}")
    num_funcs = rewards_per_func.shape[1]
    if weights.shape != (num_funcs,):
        raise ValueError(
            f"weights must have one value per reward function ({num_funcs}), got shape {tuple(weights.shape)}"
        )
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"multi_objective_aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    bad = torch.isinf(rewards_per_func).nonzero()  # NaN is "does not apply"; an infinity is a bug
    if len(bad) > 0:
        row, col = bad[0].tolist()
        value = rewards_per_func[row, col].item()
        raise ValueError(f"reward function {col} gave a non-finite reward ({value}) at row {row}")
    weights = weights.to(rewards_per_func.dtype)
    if aggregation == "sum_then_normalize":
        return group_advantages(weighted_reward_sum(rewards_per_func, weights), group_size, scale, eps)

    if scale != "group":
        raise ValueError(
            f"multi_objective_aggregation 'normalize_then_sum' normalises per group then over the batch "
            f"whatever scale_rewards says (TRL ignores it); set scale_rewards 'group', got {scale!r}"
        )
    if group_size < 2:
        raise ValueError(f"group_size must be >= 2, got {group_size}")
    if rewards_per_func.shape[0] % group_size != 0:
        raise ValueError(
            f"N = {rewards_per_func.shape[0]} rows is not a multiple of group_size = {group_size}"
        )
    grouped = rearrange(rewards_per_func, "(p g) k -> p g k", g=group_size)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    normalised = (grouped - mean) / (nan_std(grouped, dim=1, keepdim=True) + eps)  # NaN: left out of the sum
    summed = (rearrange(normalised, "p g k -> (p g) k") * weights).nansum(dim=1)
    summed = torch.where(torch.isnan(rewards_per_func).all(dim=1), torch.nan, summed)  # no function applies
    advantages = (summed - torch.nanmean(summed)) / (nan_std(summed) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def informative_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Which groups carry a learning signal: their G rewards are not all equal. rewards: [N] -> bool [P].

    DAPO's dynamic sampling (arXiv 2503.14476; verl ``filter_groups``) keeps only these groups and samples
    more prompts until the batch is full: a group whose rewards all agree has advantages 0 and adds
    nothing but noise to the token counts. verl's test is "std of the group > 0"; comparing max and min
    is the same in exact arithmetic and immune to round-off (np.std([0.1, 0.1, 0.1]) = 1.4e-17, not 0).

    Example: rewards [1, 1, 0, 1, 0.5, 0.5] with G = 2 -> [False, True, False].
    """
    if rewards.dim() != 1 or rewards.numel() % group_size != 0:
        raise ValueError(
            f"rewards must be 1-D [N] with N a multiple of group_size = {group_size}, "
            f"got shape {tuple(rewards.shape)}"
        )
    highest, lowest = group_spread(rewards, group_size)
    return highest > lowest
