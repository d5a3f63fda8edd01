"""group_advantages and multi_objective_advantages against numbers worked out by hand and a transcription of
TRL 1.16, with and without rewards that do not apply (None -> NaN)."""

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

from grpo.advantages import (  # noqa: E402
    informative_groups,
    multi_objective_advantages,
    nan_std,
    weighted_reward_sum,
)

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
    """TRL 1.16 GRPOTrainer._generate_and_score_completions, the advantage part, transcribed (NaN = a reward
    function returned None; a row where every function did is "unscorable")."""

    def nanstd(tensor, dim=None, keepdim=False):
        mean = torch.nanmean(tensor, dim=dim, keepdim=True)
        variance = torch.nanmean((tensor - mean) ** 2, dim=dim, keepdim=True)
        count = torch.sum(~torch.isnan(tensor), dim=dim, keepdim=True)
        correction = count / (count - 1)
        correction = torch.where(count > 1, correction, torch.full_like(correction, float("nan")))
        variance *= correction
        std = torch.sqrt(variance)
        return std if keepdim else std.squeeze(dim) if dim is not None else std.squeeze()

    unscorable_mask = torch.isnan(rewards_per_func).all(dim=1)
    if aggregation == "sum_then_normalize":
        rewards = (rewards_per_func * reward_weights.unsqueeze(0)).nansum(dim=1)
        rewards[unscorable_mask] = torch.nan
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
        rewards[unscorable_mask] = torch.nan
        std_rewards = nanstd(rewards).expand_as(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std_rewards + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0)


AGGREGATIONS_AND_SCALES = [
    ("sum_then_normalize", "group"),
    ("sum_then_normalize", "batch"),
    ("sum_then_normalize", "none"),
    ("normalize_then_sum", "group"),
]


@pytest.mark.parametrize("aggregation, scale", AGGREGATIONS_AND_SCALES)
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
    bad[2, 1] = float("inf")  # NaN means "does not apply"; an infinity is a broken reward
    with pytest.raises(ValueError, match=r"reward function 1 gave a non-finite reward \(inf\) at row 2"):
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


# ----------------------------------------------------------------------------- None: "does not apply" (NaN)

NAN = float("nan")


def test_nan_std_and_weighted_sum_by_hand():
    # [1, nan, 3]: the std of [1, 3] = sqrt((1 + 1) / 1); one number has no std
    assert nan_std(torch.tensor([1.0, NAN, 3.0])).item() == pytest.approx(math.sqrt(2))
    assert math.isnan(nan_std(torch.tensor([5.0, NAN])).item())
    torch.testing.assert_close(
        nan_std(torch.tensor([[1.0, 2.0, 4.0], [NAN, 1.0, 1.0]]), dim=1),
        torch.tensor([math.sqrt(7 / 3), 0.0]),
    )
    totals = weighted_reward_sum(torch.tensor([[1.0, 2.0], [NAN, 2.0], [NAN, NAN]]), torch.tensor([1.0, 0.5]))
    assert totals[:2].tolist() == [2.0, 1.0] and math.isnan(totals[2].item())


def _none_rows():
    """G = 2, two functions, weight 1 each. Row 0: only f0 applies (1); row 1: both (0 + 0.5); row 2: none;
    row 3: only f1 (2). Totals [1, 0.5, nan, 2]."""
    return (
        torch.tensor([[1.0, NAN], [0.0, 0.5], [NAN, NAN], [NAN, 2.0]], dtype=F64),
        torch.tensor([1.0, 1.0], dtype=F64),
    )


def test_sum_then_normalize_with_none_by_hand():
    rewards_per_func, weights = _none_rows()
    # group 0: totals [1, 0.5], mean 0.75, std sqrt(2 * 0.25^2 / 1) = 0.35355 -> +-0.25 / (0.35355 + eps)
    # group 1: one number (row 2 has none) -> no std -> both advantages 0 (row 2: no function applies)
    x = 0.25 / (math.sqrt(2 * 0.25**2) + EPS)
    a = multi_objective_advantages(rewards_per_func, weights, 2, "sum_then_normalize", "group")
    torch.testing.assert_close(a, torch.tensor([x, -x, 0.0, 0.0], dtype=F64))
    assert x == pytest.approx(0.7069, abs=1e-4)
    # scale none: centred only; row 3 is its group's mean (2 - 2 = 0), row 2 has nothing to centre
    a = multi_objective_advantages(rewards_per_func, weights, 2, "sum_then_normalize", "none")
    torch.testing.assert_close(a, torch.tensor([0.25, -0.25, 0.0, 0.0], dtype=F64))
    # scale batch: the std of the three totals [1, 0.5, 2]: mean 7/6, var (1/36 + 16/36 + 25/36) / 2 = 7/12
    y = 0.25 / (math.sqrt(7 / 12) + EPS)
    a = multi_objective_advantages(rewards_per_func, weights, 2, "sum_then_normalize", "batch")
    torch.testing.assert_close(a, torch.tensor([y, -y, 0.0, 0.0], dtype=F64))
    assert y == pytest.approx(0.3273, abs=1e-4)
    # None is not 0: with row 0's missing f1 read as 0 the totals would be the same here, but row 2 would
    # count as a 0 reward and pull group 1's mean down to 1
    zeros = multi_objective_advantages(torch.nan_to_num(rewards_per_func), weights, 2, "sum_then_normalize")
    assert zeros[3].item() == pytest.approx(1 / (math.sqrt(2) + EPS))


def test_normalize_then_sum_with_none_by_hand():
    # The docstring's example with f1 not applying to row 3: z_1 of the second group is undefined (one number)
    rewards_per_func, weights = _worked_example()
    rewards_per_func[3, 1] = NAN
    x = 0.5 / (math.sqrt(0.5) + EPS)
    s = torch.tensor([x, -x, 0.0, 0.0], dtype=F64)  # z_0 = [x, -x, 0, 0]; z_1 = [0, 0, nan, nan] left out
    std = math.sqrt(2 * x**2 / 3)
    a = multi_objective_advantages(rewards_per_func, weights, 2, "normalize_then_sum")
    torch.testing.assert_close(a, s / (std + EPS))
    assert a[0].item() == pytest.approx(1.2245, abs=1e-4)
    # an unscorable row: left out of the batch statistics, advantage 0
    rewards_per_func, weights = _none_rows()
    # f0: group 0 [1, 0] -> z = [x, -x]; group 1 has no f0. f1: group 0 has one number (no std); group 1 one
    # number. Sums s = [x, -x, nan (no function), 0 (f1 alone in its group)]: batch mean 0 over three rows,
    # std sqrt(2 x^2 / 2) = x
    a = multi_objective_advantages(rewards_per_func, weights, 2, "normalize_then_sum")
    torch.testing.assert_close(a, torch.tensor([x / (x + EPS), -x / (x + EPS), 0.0, 0.0], dtype=F64))


@pytest.mark.parametrize("aggregation, scale", AGGREGATIONS_AND_SCALES)
def test_multi_objective_with_none_matches_a_transcription_of_trl(aggregation, scale):
    g = torch.Generator().manual_seed(1)
    rewards_per_func = torch.stack(
        [
            torch.randint(0, 3, (24,), generator=g).double(),
            torch.rand(24, generator=g, dtype=F64),
            torch.randint(0, 2, (24,), generator=g).double() * 2,
        ],
        dim=1,
    )  # 6 prompts x G = 4, 3 functions
    missing = torch.rand(24, 3, generator=g) < 0.3  # about a third of the rewards do not apply
    missing[0] = True  # a row no function applies to
    missing[4:8, 1] = True  # a function that applies to no row of a group
    missing[8:12, 2] = torch.tensor([True, True, True, False])  # ... to one row of a group
    rewards_per_func[missing] = NAN
    weights = torch.tensor([1.0, 0.3, 0.5], dtype=F64)
    ours = multi_objective_advantages(rewards_per_func, weights, 4, aggregation, scale)
    theirs = _trl_advantages(rewards_per_func, weights, 4, aggregation, scale)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-9)
    assert ours[0].item() == 0.0 and torch.isfinite(ours).all()
    # None is not 0: reading the missing rewards as 0 changes the advantages
    assert not torch.allclose(
        ours, multi_objective_advantages(torch.nan_to_num(rewards_per_func), weights, 4, aggregation, scale)
    )


def test_zero_std_and_informative_groups_leave_none_out():
    rewards = torch.tensor([1.0, NAN, 0.0, 3.0, NAN, NAN, 2.0, 2.0])
    # groups: [1] alone (equal), [0, 3] (differ), no number, [2, 2] (equal)
    assert informative_groups(rewards, 2).tolist() == [False, True, False, False]
    assert frac_zero_std_groups(rewards, 2) == 0.5
