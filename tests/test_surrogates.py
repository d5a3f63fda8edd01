"""The policy term of each loss type (grpo/surrogates.py): the worked example of every docstring.

How they combine inside policy_loss (gradcheck, the TRL and verl transcriptions) is tested in test_loss.py.
"""

import math

import pytest
import torch

from grpo.surrogates import (
    cispo_surrogate,
    clipped_surrogate,
    dual_clip,
    gmpo_surrogate,
    sapo_surrogate,
    vespo_gamma_weights,
)

F64 = torch.float64


def _close(actual, expected, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def test_clipped_surrogate_values():
    ratio = torch.tensor([[1.5, 1.5, 0.5]])
    out = clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2)
    torch.testing.assert_close(out, torch.tensor([[1.2, 1.2, 0.5]]))
    out = clipped_surrogate(ratio, torch.tensor([-1.0]), 0.2, 0.2)
    torch.testing.assert_close(out, torch.tensor([[-1.5, -1.5, -0.8]]))


def test_clipped_surrogate_delta_caps_the_unclipped_ratio():
    ratio = torch.tensor([[5.0]], requires_grad=True)
    out = clipped_surrogate(ratio, torch.tensor([-1.0]), 0.2, 0.2, delta=4.0)
    assert out.item() == pytest.approx(-4.0)
    out.backward()
    assert ratio.grad.item() == 0.0  # capped: no gradient
    # without delta the same token is unclipped and pushes back with slope -A = 1
    assert clipped_surrogate(torch.tensor([[5.0]]), torch.tensor([-1.0]), 0.2, 0.2).item() == -5.0
    # delta never touches a ratio below it
    assert clipped_surrogate(torch.tensor([[1.1]]), torch.tensor([-1.0]), 0.2, 0.2, delta=4.0).item() == (
        pytest.approx(-1.1)
    )


def test_dual_clip_worked_example():
    ratio = torch.tensor([[5.0, 2.0], [5.0, 2.0]], requires_grad=True)
    adv = torch.tensor([-1.0, 1.0])
    ppo = -clipped_surrogate(ratio, adv, 0.2, 0.2)
    out = dual_clip(ppo, adv, 3.0)
    _close(out, torch.tensor([[3.0, 2.0], [-1.2, -1.2]]))
    out.sum().backward()
    # capped A<0 token: no gradient; ratio 2 with A<0: slope -A = 1; A>0 tokens past 1.2: clipped by PPO
    _close(ratio.grad, torch.tensor([[0.0, 1.0], [0.0, 0.0]]))


def test_cispo_surrogate_worked_example():
    logp = torch.tensor([[-0.5]], requires_grad=True)
    ratio = torch.tensor([[7.0]], requires_grad=True)
    out = cispo_surrogate(ratio, torch.tensor([1.0]), logp, eps_max=5.0)
    assert out.item() == pytest.approx(-2.5)
    out.backward()
    assert logp.grad.item() == pytest.approx(5.0)  # the capped weight: never zero
    assert ratio.grad is None or ratio.grad.item() == 0.0  # the weight is a stop-gradient


def test_sapo_surrogate_worked_example():
    ratio = torch.tensor([[1.0, 3.0]], dtype=F64, requires_grad=True)
    out = sapo_surrogate(ratio, torch.tensor([1.0], dtype=F64), 1.0, 1.05)
    s = 1 / (1 + math.exp(-2))
    _close(out, torch.tensor([[2.0, 4 * s]], dtype=F64))
    assert 4 * s == pytest.approx(3.5232, abs=1e-4)
    out.sum().backward()
    _close(ratio.grad, torch.tensor([[1.0, 4 * s * (1 - s)]], dtype=F64))
    assert 4 * s * (1 - s) == pytest.approx(0.4200, abs=1e-4)
    # A <= 0 uses temperature_neg: value 4 sigmoid(0) / 1.05 * A at ratio 1
    neg = sapo_surrogate(torch.ones(1, 1, dtype=F64), torch.tensor([-1.0], dtype=F64), 1.0, 1.05)
    assert neg.item() == pytest.approx(-2 / 1.05)


def test_vespo_gamma_weights_worked_example():
    mask = torch.ones(3, 1, dtype=F64)
    log_ratio = torch.tensor([[0.0], [math.log(2)], [math.log(0.5)]], dtype=F64)
    phi = vespo_gamma_weights(torch.ones(3, dtype=F64), log_ratio, mask)
    _close(
        phi,
        torch.tensor([[1.0], [math.exp(-3 + 2 * math.log(2))], [math.exp(1.5 - 2 * math.log(2))]], dtype=F64),
    )
    assert phi[1].item() == pytest.approx(0.1991, abs=1e-4)
    assert phi[2].item() == pytest.approx(1.1204, abs=1e-4)
    # A < 0 uses (k_neg 3, lambda_neg 2): w = 2 -> exp(2 + 3 ln 2 - 4)
    neg = vespo_gamma_weights(torch.tensor([-1.0], dtype=F64), log_ratio[1:2], mask[:1])
    assert neg.item() == pytest.approx(math.exp(-2 + 3 * math.log(2)))
    # the sampler weights enter log w: a token log-ratio of ln 2 and an IS weight of 1/2 make w = 1
    both = vespo_gamma_weights(
        torch.ones(1, dtype=F64), log_ratio[1:2], mask[:1], is_weights=torch.tensor([[0.5]], dtype=F64)
    )
    assert both.item() == pytest.approx(1.0)
    # padding never counts
    padded = vespo_gamma_weights(
        torch.ones(1, dtype=F64),
        torch.tensor([[math.log(2), 50.0]], dtype=F64),
        torch.tensor([[1.0, 0.0]], dtype=F64),
    )
    assert padded.item() == pytest.approx(phi[1].item())


def test_gmpo_surrogate_worked_example():
    log_ratio = torch.tensor([[0.1, 0.6], [0.1, 0.6]], dtype=F64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=F64)
    out = gmpo_surrogate(log_ratio, torch.tensor([1.0, -1.0], dtype=F64), mask, 0.4, 0.4)
    _close(out, torch.tensor([[math.exp(0.25)], [-math.exp(0.35)]], dtype=F64))
    assert math.exp(0.25) == pytest.approx(1.2840, abs=1e-4)
    assert math.exp(0.35) == pytest.approx(1.4191, abs=1e-4)
    out.sum().backward()
    # A > 0: the 0.6 token is clipped (no gradient); A < 0: both tokens move, each by 1/|y| of the mean
    _close(log_ratio.grad, torch.tensor([[math.exp(0.25) / 2, 0.0], [-math.exp(0.35) / 2] * 2], dtype=F64))
    # an empty sequence contributes nothing
    empty = gmpo_surrogate(
        torch.zeros(1, 2, dtype=F64), torch.tensor([3.0], dtype=F64), torch.zeros(1, 2, dtype=F64), 0.4, 0.4
    )
    assert empty.item() == 0.0


def test_grpo_loss_still_offers_the_surrogates():
    import grpo.loss
    import grpo.surrogates

    for name in ("clipped_surrogate", "dual_clip", "cispo_surrogate", "sapo_surrogate", "vespo_gamma_weights",
                 "gmpo_surrogate"):  # fmt: skip
        assert getattr(grpo.loss, name) is getattr(grpo.surrogates, name)
