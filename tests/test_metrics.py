"""grpo.metrics: what a run records (sampler vs trainer mismatch, reward and length statistics)."""

from __future__ import annotations

import pytest
import torch

from grpo.metrics import sampler_mismatch


def test_sampler_mismatch_worked_example():
    sampler = torch.tensor([[-1.0, -2.0], [-0.5, -9.0]])
    trainer = torch.tensor([[-1.1, -1.8], [-0.7, 5.0]])  # the 5.0 sits on padding and must not count
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    m = sampler_mismatch(sampler, trainer, mask)
    assert m["mismatch/logp_abs_diff"] == pytest.approx((0.1 + 0.2 + 0.2) / 3)
    assert m["mismatch/logp_abs_diff_max"] == pytest.approx(0.2)
    ratios = [torch.tensor(0.1).exp().item(), torch.tensor(-0.2).exp().item()]  # exp(-0.1 + 0.2), exp(-0.2)
    assert m["mismatch/seq_ratio_mean"] == pytest.approx(sum(ratios) / 2, rel=1e-6)
    assert m["mismatch/seq_ratio_min"] == pytest.approx(ratios[1], rel=1e-6)
    assert m["mismatch/seq_ratio_max"] == pytest.approx(ratios[0], rel=1e-6)


def test_sampler_mismatch_rejects_shapes_that_differ():
    with pytest.raises(ValueError, match="shapes differ"):
        sampler_mismatch(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3))
