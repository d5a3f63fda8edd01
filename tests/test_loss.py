"""policy_loss, kl_penalty and aggregation against hand-computed numbers and float64 gradcheck."""

import math

import pytest
import torch

from grpo.loss import aggregate, clipped_surrogate, kl_penalty, policy_loss, sequence_mask

LOSS_TYPES = ["grpo", "dapo", "dr_grpo"]


def test_sequence_mask():
    m = sequence_mask(torch.tensor([2, 0, 3]), 3)
    assert torch.equal(m, torch.tensor([[1.0, 1, 0], [0, 0, 0], [1, 1, 1]]))


def test_kl_estimators_match_their_formulas():
    logp, ref = torch.tensor([-1.0]), torch.tensor([-1.5])
    # d = ref - logp = -0.5
    torch.testing.assert_close(kl_penalty(logp, ref, "k1"), torch.tensor([0.5]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k2"), torch.tensor([0.125]))
    torch.testing.assert_close(kl_penalty(logp, ref, "k3"), torch.tensor([math.exp(-0.5) + 0.5 - 1]))
    assert abs(math.exp(-0.5) + 0.5 - 1 - 0.10653) < 1e-5
    # identical policies: every estimator is zero
    for est in ("k1", "k2", "k3"):
        assert kl_penalty(ref, ref, est).item() == 0.0
    with pytest.raises(ValueError, match="k4"):
        kl_penalty(logp, ref, "k4")


def test_k3_is_non_negative():
    torch.manual_seed(0)
    logp, ref = torch.randn(1000) * 3, torch.randn(1000) * 3
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    assert (kl_penalty(logp, ref, "k1") < 0).any()  # k1 can be negative


def test_aggregate_worked_example():
    per_token = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aggregate(per_token, mask, "grpo").item() == pytest.approx(3.5)  # mean(2, 5)
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(3.0)  # 9 / 3
    assert aggregate(per_token, mask, "dr_grpo").item() == pytest.approx(2.25)  # 9 / (2 * 2)
    assert aggregate(per_token, mask, "dr_grpo", max_completion_length=9).item() == pytest.approx(0.5)
    # values under the mask never leak, even non-finite ones
    per_token[1, 1] = float("nan")
    assert aggregate(per_token, mask, "dapo").item() == pytest.approx(3.0)
    with pytest.raises(ValueError, match="loss_type"):
        aggregate(per_token, mask, "ppo")


def _batch(dtype=torch.float32):
    """Three sequences of lengths 3, 1, 4 (T = 4) with advantages [1.5, -0.5, 0.25]."""
    lengths = torch.tensor([3, 1, 4])
    mask = sequence_mask(lengths, 4).to(dtype)
    adv = torch.tensor([1.5, -0.5, 0.25], dtype=dtype)
    torch.manual_seed(0)
    logp = (-torch.rand(3, 4, dtype=dtype) * 2).requires_grad_()
    return logp, adv, mask, lengths


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_ratio_one_loss_and_gradient_by_hand(loss_type):
    logp, adv, mask, lengths = _batch()
    loss, metrics = policy_loss(logp, None, None, adv, mask, loss_type=loss_type)
    loss.backward()
    n, total = 3, int(lengths.sum())  # 8 tokens
    if loss_type == "grpo":
        # every sequence's token mean is -A_i, so the loss is -mean(A) = -(1.5 - 0.5 + 0.25) / 3
        assert loss.item() == pytest.approx(-1.25 / 3)
        expected = -adv[:, None] / (n * lengths[:, None].float())
    elif loss_type == "dapo":
        # -(3 * 1.5 - 1 * 0.5 + 4 * 0.25) / 8
        assert loss.item() == pytest.approx(-5.0 / 8)
        expected = -adv[:, None] / total * torch.ones(3, 4)
    else:
        assert loss.item() == pytest.approx(-5.0 / (3 * 4))
        expected = -adv[:, None] / (n * 4) * torch.ones(3, 4)
    torch.testing.assert_close(logp.grad, expected * mask)
    assert metrics["ratio_mean"] == pytest.approx(1.0)
    assert metrics["clip_ratio/region"] == 0.0
    assert metrics["kl"] == 0.0


def test_dr_grpo_uses_max_completion_length():
    logp, adv, mask, _ = _batch()
    loss, _ = policy_loss(logp, None, None, adv, mask, loss_type="dr_grpo", max_completion_length=10)
    assert loss.item() == pytest.approx(-5.0 / (3 * 10))


def _single_token_grad(ratio, advantage, eps_low=0.2, eps_high=None):
    old = torch.tensor([[-1.0]])
    logp = (old + math.log(ratio)).requires_grad_()
    loss, metrics = policy_loss(
        logp, old, None, torch.tensor([advantage]), torch.ones(1, 1), eps_low=eps_low, eps_high=eps_high
    )
    loss.backward()
    return logp.grad.item(), metrics


@pytest.mark.parametrize(
    "ratio, advantage, clipped",
    [
        (1.5, +1.0, True),  # pushed up past 1 + eps with A > 0: no more gradient
        (1.5, -1.0, False),  # A < 0 wants the ratio down: never clipped on this side
        (0.5, -1.0, True),  # pushed down past 1 - eps with A < 0: no more gradient
        (0.5, +1.0, False),  # A > 0 wants the ratio up: never clipped on this side
        (1.1, +1.0, False),  # inside the trust region
        (0.9, -1.0, False),
    ],
)
def test_clipping_switches_gradient_off_exactly_where_it_should(ratio, advantage, clipped):
    grad, metrics = _single_token_grad(ratio, advantage)
    if clipped:
        assert grad == 0.0
        assert metrics["clip_ratio/region"] == 1.0
    else:
        # d(-ratio * A)/d logp = -ratio * A
        assert grad == pytest.approx(-ratio * advantage)
        assert metrics["clip_ratio/region"] == 0.0
    assert metrics["clip_ratio/high"] == float(clipped and advantage > 0)
    assert metrics["clip_ratio/low"] == float(clipped and advantage < 0)


def test_eps_high_widens_only_the_upper_bound():
    # ratio 1.25 with A > 0: clipped by eps 0.2, not by eps_high 0.28
    assert _single_token_grad(1.25, 1.0)[0] == 0.0
    assert _single_token_grad(1.25, 1.0, eps_high=0.28)[0] == pytest.approx(-1.25)
    # the lower bound stays 1 - eps_low: ratio 0.75 with A < 0 is clipped either way
    assert _single_token_grad(0.75, -1.0)[0] == 0.0
    assert _single_token_grad(0.75, -1.0, eps_high=0.28)[0] == 0.0
    # and ratio 0.85 with A < 0 is inside [0.8, 1.28]
    assert _single_token_grad(0.85, -1.0, eps_high=0.28)[0] == pytest.approx(0.85)


def test_clipped_surrogate_values():
    ratio = torch.tensor([[1.5, 1.5, 0.5]])
    out = clipped_surrogate(ratio, torch.tensor([1.0]), 0.2, 0.2)
    torch.testing.assert_close(out, torch.tensor([[1.2, 1.2, 0.5]]))
    out = clipped_surrogate(ratio, torch.tensor([-1.0]), 0.2, 0.2)
    torch.testing.assert_close(out, torch.tensor([[-1.5, -1.5, -0.8]]))


def test_kl_penalty_is_added_per_token_before_aggregation():
    logp, adv, mask, lengths = _batch(torch.float64)
    ref = logp.detach() - 0.3 * torch.arange(4, dtype=torch.float64)  # a different KL on every token
    beta = 0.5
    loss, metrics = policy_loss(logp, None, ref, adv, mask, beta=beta, kl_estimator="k3")
    kl = torch.exp(ref - logp.detach()) - (ref - logp.detach()) - 1
    # grpo: mean over sequences of the token mean of (-A_i + beta * kl_t)
    expected = sum(((-adv[i] + beta * kl[i, : lengths[i]]).sum() / lengths[i]) for i in range(3)) / 3
    assert loss.item() == pytest.approx(expected.item())
    assert metrics["kl"] == pytest.approx((kl * mask).sum().item() / 8)


def test_ref_logp_required_with_beta():
    logp, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, None, None, adv, mask, beta=0.1)


def test_metrics_count_clipped_tokens_over_the_mask():
    old = torch.zeros(2, 3)
    ratios = torch.tensor([[1.5, 1.0, 0.5], [0.5, 1.5, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # the 9.0 is padding
    adv = torch.tensor([1.0, -1.0])
    _, m = policy_loss(ratios.log(), old, None, adv, mask)
    # seq 0 (A>0): 1.5 is high-clipped; seq 1 (A<0): 0.5 is low-clipped; 5 real tokens
    assert m["clip_ratio/high"] == pytest.approx(1 / 5)
    assert m["clip_ratio/low"] == pytest.approx(1 / 5)
    assert m["clip_ratio/region"] == pytest.approx(2 / 5)
    assert m["ratio_mean"] == pytest.approx((1.5 + 1.0 + 0.5 + 0.5 + 1.5) / 5)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_gradcheck_float64(loss_type, kl_estimator):
    torch.manual_seed(3)
    n, t = 4, 5
    mask = sequence_mask(torch.tensor([5, 2, 4, 1]), t).double()
    adv = torch.tensor([1.0, -0.7, 0.3, -1.2], dtype=torch.float64)
    old = -torch.rand(n, t, dtype=torch.float64) * 2
    # ratios spread on both sides of the clip range, away from the kinks at 0.8 / 1.28
    offsets = torch.tensor([-0.6, -0.1, 0.05, 0.15, 0.5], dtype=torch.float64)
    logp = (old + offsets[torch.randperm(t)]).requires_grad_()
    ref = (-torch.rand(n, t, dtype=torch.float64) * 2).requires_grad_()

    def f(logp, ref):
        return policy_loss(
            logp,
            old,
            ref,
            adv,
            mask,
            eps_low=0.2,
            eps_high=0.28,
            beta=0.04,
            kl_estimator=kl_estimator,
            loss_type=loss_type,
            max_completion_length=7,
        )[0]

    assert torch.autograd.gradcheck(f, (logp, ref))


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match="shapes"):
        policy_loss(torch.zeros(2, 3), None, None, torch.zeros(3), torch.ones(2, 3))
