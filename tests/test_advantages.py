"""group_advantages against numbers worked out by hand."""

import math

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
