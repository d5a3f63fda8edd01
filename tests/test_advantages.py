"""group_advantages against numbers worked out by hand."""

import math

import numpy as np
import pytest
import torch

from grpo.advantages import frac_zero_std_groups, group_advantages

EPS = 1e-4


def test_g2_group_scale_by_hand():
    # groups [1, 0] and [0, 1]: mean 0.5, unbiased std sqrt((0.25 + 0.25) / 1) = sqrt(0.5)
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    x = 0.5 / (math.sqrt(0.5) + EPS)  # 0.70700...
    torch.testing.assert_close(a, torch.tensor([x, -x, -x, x]))
    assert abs(x - 0.70700) < 1e-4


def test_g4_group_scale_by_hand():
    # one group [1, 0, 0, 1]: mean 0.5, unbiased std sqrt(4 * 0.25 / 3) = sqrt(1/3) = 0.57735
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=4)
    x = 0.5 / (math.sqrt(1 / 3) + EPS)  # 0.86588...
    torch.testing.assert_close(a, torch.tensor([x, -x, -x, x]))


def test_batch_scale_uses_the_batch_std():
    # G = 2 centres per group ([0.5, -0.5, -0.5, 0.5]) but divides by the std of all four rewards
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2, scale="batch")
    x = 0.5 / (math.sqrt(1 / 3) + EPS)
    torch.testing.assert_close(a, torch.tensor([x, -x, -x, x]))
    # with unequal groups the batch std differs from each group's: rewards [2, 0, 1, 1]
    # group means 1 and 1 -> centred [1, -1, 0, 0]; batch mean 1, var (1+1+0+0)/3 -> std sqrt(2/3)
    a = group_advantages(torch.tensor([2.0, 0.0, 1.0, 1.0]), group_size=2, scale="batch")
    y = 1 / (math.sqrt(2 / 3) + EPS)
    torch.testing.assert_close(a, torch.tensor([y, -y, 0.0, 0.0]))


@pytest.mark.parametrize("group_size", [2, 4])
def test_none_scale_only_centres(group_size):
    a = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=group_size, scale="none")
    torch.testing.assert_close(a, torch.tensor([0.5, -0.5, -0.5, 0.5]))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_rewards_give_zero(scale):
    rewards = torch.tensor([3.0, 3.0, 3.0, 0.5, 0.5, 0.5])
    assert torch.equal(group_advantages(rewards, 3, scale=scale), torch.zeros(6))


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_advantages_sum_to_zero_per_group(scale):
    torch.manual_seed(0)
    rewards = torch.rand(8 * 6, dtype=torch.float64) * 4
    a = group_advantages(rewards, 6, scale=scale)
    torch.testing.assert_close(a.view(8, 6).sum(1), torch.zeros(8, dtype=torch.float64))


def test_group_scale_gives_unit_std_per_group():
    torch.manual_seed(1)
    a = group_advantages(torch.randn(5 * 4, dtype=torch.float64), 4, eps=0.0)
    torch.testing.assert_close(a.view(5, 4).std(1), torch.ones(5, dtype=torch.float64))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(torch.zeros(2, 2), 2)


def test_frac_zero_std_groups():
    assert frac_zero_std_groups(torch.tensor([1.0, 1.0, 0.0, 1.0]), 2) == 0.5
    assert frac_zero_std_groups(torch.tensor([1.0, 2.0, 0.0, 1.0]), 2) == 0.0


# ----------------------------------------------------------------------------- several reward functions

from grpo.advantages import informative_groups, multi_objective_advantages  # noqa: E402

F64 = torch.float64


def _worked_example():
    rewards_per_func = torch.tensor([[1.0, 0.0], [0.0, 0.0], [1.0, 2.0], [1.0, 0.0]], dtype=F64)
    return rewards_per_func, torch.tensor([1.0, 0.5], dtype=F64)


def test_multi_objective_worked_example():
    rewards_per_func, weights = _worked_example()
    x = 0.5 / (math.sqrt(0.5) + EPS)  # one group, rewards differing by 1: +-0.70700
    a = multi_objective_advantages(rewards_per_func, weights, 2, "sum_then_normalize")
    torch.testing.assert_close(a, torch.tensor([x, -x, x, -x], dtype=F64))
    # GDPO: z_0 = [x, -x, 0, 0] (group [1, 1] has std 0), z_1 = [0, 0, y, -y] with group [2, 0]:
    # y = 1 / (sqrt(2) + eps) (~ x, but eps weighs differently), s = z_0 + 0.5 z_1
    y = 1 / (math.sqrt(2) + EPS)
    s = torch.tensor([x, -x, y / 2, -y / 2], dtype=F64)
    std = math.sqrt((2 * x**2 + 2 * (y / 2) ** 2) / 3)  # unbiased, mean 0
    a = multi_objective_advantages(rewards_per_func, weights, 2, "normalize_then_sum")
    torch.testing.assert_close(a, s / (std + EPS))
    assert std == pytest.approx(0.6454, abs=1e-4)
    assert a[0].item() == pytest.approx(1.0953, abs=1e-4) and a[2].item() == pytest.approx(0.5477, abs=1e-4)


def _trl_advantages(rewards_per_func, reward_weights, num_generations, aggregation, scale_rewards):
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the advantage part, transcribed (no NaN rows)."""

    def nanstd(tensor, dim=None, keepdim=False):
        mean = torch.nanmean(tensor, dim=dim, keepdim=True)
        variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
        variance *= count / (count - 1)
        std = torch.sqrt(variance)
        return std if keepdim else std.squeeze(dim) if dim is not None else std.squeeze()

    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        mean_grouped = torch.nanmean(rewards.view(-1, num_generations), dim=1).repeat_interleave(
            num_generations
        )
        if scale_rewards in ["group", "none"]:
            std_rewards = nanstd(rewards.view(-1, num_generations), dim=1).repeat_interleave(num_generations)
        else:
            std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = rewards - mean_grouped
        if scale_rewards != "none":
            advantages = advantages / (std_rewards + 1e-4)
    else:
        grouped = rewards_per_func.view(-1, num_generations, rewards_per_func.shape[1])
        mean_k = torch.nanmean(grouped, dim=1, keepdim=True)
        std_k = nanstd(grouped, dim=1, keepdim=True)
        reward_k = ((grouped - mean_k) / (std_k + 1e-4)).view(-1, rewards_per_func.shape[1])
        rewards = (reward_k * reward_weights.unsqueeze(0)).nansum(dim=1)
        std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


@pytest.mark.parametrize(
    "aggregation, scale",
    [
        ("sum_then_normalize", "group"),
        ("sum_then_normalize", "batch"),
        ("sum_then_normalize", "none"),
        ("normalize_then_sum", "group"),
    ],
)
def test_multi_objective_matches_a_transcription_of_trl(aggregation, scale):
    g = torch.Generator().manual_seed(0)
    # 5 prompts x G = 4, 3 functions: a 0/1 correctness, a graded format score, a sparse bonus
    rewards_per_func = torch.stack(
        [
            torch.randint(0, 2, (20,), generator=g).double(),
            torch.rand(20, generator=g, dtype=F64) * 0.5,
            (torch.rand(20, generator=g, dtype=F64) > 0.8).double() * 2,
        ],
        dim=1,
    )
    rewards_per_func[4:8, 0] = 1.0  # a group where one function agrees everywhere
    weights = torch.tensor([1.0, 0.3, 0.5], dtype=F64)
    ours = multi_objective_advantages(rewards_per_func, weights, 4, aggregation, scale)
    theirs = _trl_advantages(rewards_per_func, weights, 4, aggregation, scale)
    # rtol 1e-6, not 1e-12: TRL's nanstd computes Bessel's factor count / (count - 1) from integer
    # counts, i.e. in float32, so TRL itself is off by ~1e-8 relative in float64
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    # and the two aggregations really differ on these rewards (the comparison could fail)
    other = "normalize_then_sum" if aggregation == "sum_then_normalize" else "sum_then_normalize"
    assert not torch.allclose(
        ours, multi_objective_advantages(rewards_per_func, weights, 4, other), atol=1e-3
    )


def test_sum_then_normalize_is_group_advantages_of_the_weighted_sum():
    rewards_per_func, weights = _worked_example()
    for scale in ("group", "batch", "none"):
        torch.testing.assert_close(
            multi_objective_advantages(rewards_per_func, weights, 2, scale=scale),
            group_advantages(rewards_per_func @ weights, 2, scale=scale),
        )


def test_multi_objective_bad_inputs_raise_clear_errors():
    rewards_per_func, weights = _worked_example()
    with pytest.raises(ValueError, match="one value per reward function"):
        multi_objective_advantages(rewards_per_func, weights[:1], 2)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        multi_objective_advantages(rewards_per_func, weights, 2, "mean")
    with pytest.raises(ValueError, match="scale_rewards"):
        multi_objective_advantages(rewards_per_func, weights, 2, "normalize_then_sum", scale="batch")
    with pytest.raises(ValueError, match="2-D"):
        multi_objective_advantages(rewards_per_func[:, 0], weights, 2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        multi_objective_advantages(rewards_per_func[:3], weights, 2, "normalize_then_sum")
    bad = rewards_per_func.clone()
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="reward function 1 .* at row 2"):
        multi_objective_advantages(bad, weights, 2)


def test_informative_groups_worked_example():
    keep = informative_groups(torch.tensor([1.0, 1.0, 0.0, 1.0, 0.5, 0.5]), 2)
    assert keep.dtype == torch.bool
    assert keep.tolist() == [False, True, False]
    # equal non-representable rewards: np.std would say 1.4e-17 > 0 and keep the group; we do not
    assert informative_groups(torch.tensor([0.1, 0.1, 0.1], dtype=F64), 3).tolist() == [False]
    # verl's criterion (std of the group > 0) on integer rewards, where round-off cannot happen
    rewards = torch.tensor([0.0, 0, 0, 1, 1, 1, 1, 1, 2, 0, 1, 0])
    verl_keep = [float(np.std(group)) > 0 for group in rewards.view(-1, 3).tolist()]
    assert informative_groups(rewards, 3).tolist() == verl_keep == [False, False, True, True]
    # consistent with the logged metric
    assert 1 - informative_groups(rewards, 3).float().mean().item() == frac_zero_std_groups(rewards, 3)
    with pytest.raises(ValueError, match="multiple of group_size"):
        informative_groups(torch.zeros(5), 2)
