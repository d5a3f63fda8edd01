"""policy_loss and the GRPO family: hand-worked numbers, float64 gradcheck, transcriptions of TRL and verl."""

import math

import pytest
import torch

from grpo.loss import aggregate, kl_penalty, policy_loss, sequence_mask

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


# =============================================================================== the GRPO family
#
# Below: the worked example of every docstring (those of grpo/surrogates.py and grpo/corrections.py are
# in test_surrogates.py and test_corrections.py), a float64 gradcheck for every loss type x level,
# an independent transcription of each peer's published formula (TRL 1.16 GRPOTrainer._compute_loss,
# verl 0.9 compute_policy_loss_vanilla / compute_policy_loss_geo_mean) compared on random inputs, the
# micro-batch exactness of the global normalisers, and the old behaviour kept bit for bit.

from grpo.corrections import (  # noqa: E402
    entropy_threshold,
    high_entropy_mask,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from grpo.loss import (  # noqa: E402
    CLIPPED_LOSS_TYPES,
    entropy_bonus,
    log_importance_weights,
    masked_mean,
    metric_count_key,
)
from grpo.loss import LOSS_TYPES as ALL_LOSS_TYPES  # noqa: E402

F64 = torch.float64
LEVELS = ["token", "sequence"]
TYPE_LEVELS = [(lt, lv) for lt in ALL_LOSS_TYPES for lv in LEVELS if not (lt == "gmpo" and lv == "sequence")]


def _close(actual, expected, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- worked examples


def test_log_importance_weights_worked_example():
    logp = torch.tensor([[0.2, -0.1, 9.0]], dtype=F64)
    old = torch.zeros(1, 3, dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    _close(log_importance_weights(logp, old, mask, "token"), logp)
    seq = log_importance_weights(logp, old, mask, "sequence")
    assert seq.shape == (1, 1)
    assert seq.item() == pytest.approx(0.05)
    assert math.exp(0.05) == pytest.approx(1.0513, abs=1e-4)
    with pytest.raises(ValueError, match="importance_sampling_level"):
        log_importance_weights(logp, old, mask, "segment")


def test_aggregate_new_types_and_global_normalisers():
    per_token = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    for lt in ("grpo", "sapo", "gmpo"):
        assert aggregate(per_token, mask, lt).item() == pytest.approx(3.5)
    for lt in ("bnpo", "dapo", "cispo", "vespo"):
        assert aggregate(per_token, mask, lt).item() == pytest.approx(3.0)
    assert aggregate(per_token, mask, "luspo").item() == pytest.approx(4.5)  # (4 + 5) / 2
    # as the first 2 of 6 sequences holding 10 tokens
    assert aggregate(per_token, mask, "grpo", num_sequences=6, num_tokens=10).item() == pytest.approx(7 / 6)
    assert aggregate(per_token, mask, "dapo", num_sequences=6, num_tokens=10).item() == pytest.approx(0.9)
    assert aggregate(per_token, mask, "luspo", num_sequences=6).item() == pytest.approx(9 / 6)
    assert aggregate(per_token, mask, "dr_grpo", 5, num_sequences=6).item() == pytest.approx(9 / 30)
    # a sequence-level term [N, 1] broadcasts over each sequence's real tokens
    seq = torch.tensor([[2.0], [-1.0]])
    assert aggregate(seq, mask, "grpo").item() == pytest.approx(0.5)
    assert aggregate(seq, mask, "luspo").item() == pytest.approx((4 - 1) / 2)
    assert aggregate(seq, mask, "dapo").item() == pytest.approx(3 / 3)
    with pytest.raises(ValueError, match="num_sequences"):
        aggregate(per_token, mask, "grpo", num_sequences=0)


def test_entropy_bonus_worked_example():
    entropy = torch.tensor([[1.0, 3.0], [2.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert entropy_bonus(entropy, mask).item() == pytest.approx(2.0)
    assert entropy_bonus(entropy, mask, num_tokens=12).item() == pytest.approx(0.5)


def test_metric_count_key():
    assert metric_count_key("kl") == "num_tokens_local"
    assert metric_count_key("ratio_mean") == "num_tokens_local"
    assert metric_count_key("ratio_mean", "sequence") == "num_sequences_local"
    assert metric_count_key("kl", "sequence") == "num_tokens_local"
    assert metric_count_key("vespo/phi_seq_mean") == "num_sequences_local"


def test_policy_loss_options_by_hand():
    # one token, ratio 5, A = -1: PPO loss 5; dual clip c = 3 caps it at 3; delta 4 caps it at 4
    old = torch.tensor([[-1.0]], dtype=F64)
    logp = (old + math.log(5.0)).requires_grad_()
    adv, mask = torch.tensor([-1.0], dtype=F64), torch.ones(1, 1, dtype=F64)
    assert policy_loss(logp, old, None, adv, mask)[0].item() == pytest.approx(5.0)
    loss, m = policy_loss(logp, old, None, adv, mask, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0) and m["clip_ratio/dual_mean"] == 1.0
    loss, m = policy_loss(logp, old, None, adv, mask, delta=4.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(3.0) and m["clip_ratio/dual_mean"] == 1.0
    loss, m = policy_loss(logp, old, None, adv, mask, delta=2.0, clip_ratio_c=3.0)
    assert loss.item() == pytest.approx(2.0) and m["clip_ratio/dual_mean"] == 0.0
    # is_weights multiply the policy term, not the KL: 2 * 5 + beta * k3
    ref = old.clone()
    kl = math.exp(-math.log(5.0)) + math.log(5.0) - 1
    loss, m = policy_loss(logp, old, ref, adv, mask, beta=0.1, is_weights=torch.tensor([[2.0]], dtype=F64))
    assert loss.item() == pytest.approx(10.0 + 0.1 * kl)
    # bias-corrected KL: times the ratio, with its gradient
    loss, m = policy_loss(logp, old, ref, adv, mask, beta=0.1, bias_correction_kl=True)
    assert loss.item() == pytest.approx(5.0 + 0.1 * kl * 5.0)
    assert m["kl"] == pytest.approx(kl * 5.0)
    loss.backward()
    # d/dlogp [-r A + beta r k3(logp)] with r = exp(logp - old), k3 = exp(ref - logp) - (ref - logp) - 1:
    # = r + beta (r k3 + r (1 - exp(ref - logp)))
    r = 5.0
    assert logp.grad.item() == pytest.approx(r + 0.1 * (r * kl + r * (1 - 1 / r)))


def test_policy_loss_entropy_bonus_by_hand():
    logp, adv, mask, lengths = _batch(F64)
    entropy = torch.rand(3, 4, dtype=F64, requires_grad=True)
    base, _ = policy_loss(logp, None, None, adv, mask, loss_type="dapo")
    loss, m = policy_loss(logp, None, None, adv, mask, loss_type="dapo", entropy=entropy, entropy_coef=0.1)
    h = (entropy.detach() * mask).sum() / 8
    assert loss.item() == pytest.approx(base.item() - 0.1 * h.item())
    assert m["entropy"] == pytest.approx(h.item())
    loss.backward()
    _close(entropy.grad, -0.1 * mask / 8)
    # not rescaled by the loss type: grpo's policy term is a mean of means, the bonus is still a token mean
    base, _ = policy_loss(logp, None, None, adv, mask)
    loss, _ = policy_loss(logp, None, None, adv, mask, entropy=entropy, entropy_coef=0.1)
    assert loss.item() == pytest.approx(base.item() - 0.1 * h.item())
    with pytest.raises(ValueError, match="entropy is required"):
        policy_loss(logp, None, None, adv, mask, entropy_coef=0.1)


def test_entropy_mask_and_off_policy_mask_select_the_policy_term():
    logp, adv, mask, lengths = _batch(F64)
    entropy_mask = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], dtype=F64)
    loss, _ = policy_loss(logp, None, None, adv, mask, loss_type="dapo", entropy_mask=entropy_mask)
    # ratio 1: -A per kept token, still divided by all 8 real tokens (TRL)
    assert loss.item() == pytest.approx(-(2 * 1.5 + 4 * 0.25) / 8)
    loss, _ = policy_loss(
        logp,
        None,
        None,
        adv,
        mask,
        loss_type="dapo",
        off_policy_mask=torch.tensor([[1.0], [0.0], [0.0]], dtype=F64),
    )
    assert loss.item() == pytest.approx(-(3 * 1.5) / 8)


def test_policy_loss_rejects_bad_combinations():
    logp, adv, mask, _ = _batch()
    with pytest.raises(ValueError, match="delta"):
        policy_loss(logp, None, None, adv, mask, loss_type="sapo", delta=4.0)
    with pytest.raises(ValueError, match="clip_ratio_c"):
        policy_loss(logp, None, None, adv, mask, loss_type="cispo", clip_ratio_c=3.0)
    with pytest.raises(ValueError, match="clip_ratio_c must be > 1"):
        policy_loss(logp, None, None, adv, mask, clip_ratio_c=0.9)
    with pytest.raises(ValueError, match="gmpo"):
        policy_loss(logp, None, None, adv, mask, loss_type="gmpo", importance_sampling_level="sequence")
    with pytest.raises(ValueError, match="vespo needs token-level"):
        policy_loss(logp, None, None, adv, mask, loss_type="vespo", is_weights=torch.ones(3, 1))
    with pytest.raises(ValueError, match="is_weights"):
        policy_loss(logp, None, None, adv, mask, is_weights=torch.ones(3, 2))
    with pytest.raises(ValueError, match="off_policy_mask"):
        policy_loss(logp, None, None, adv, mask, off_policy_mask=torch.ones(2, 1))
    with pytest.raises(ValueError, match="loss_type"):
        policy_loss(logp, None, None, adv, mask, loss_type="ppo")
    with pytest.raises(ValueError, match="importance_sampling_level"):
        policy_loss(logp, None, None, adv, mask, importance_sampling_level="segment")
    with pytest.raises(ValueError, match="num_entropy_tokens"):
        policy_loss(
            logp, None, None, adv, mask, entropy=torch.ones(3, 4), entropy_coef=0.1,
            entropy_mask=torch.ones(3, 4), num_tokens=20,
        )  # fmt: skip


# ----------------------------------------------------------------------------- random inputs


def _random_inputs(seed=0, n=6, t=5, lengths=(5, 1, 3, 4, 2, 0)):
    """float64 inputs: ratios spread around the clip range, a sampler that drifted, entropies, rewards."""
    g = torch.Generator().manual_seed(seed)
    mask = sequence_mask(torch.tensor(lengths), t).double()
    adv = torch.randn(n, generator=g, dtype=F64)
    adv[1] = 0.0  # an A = 0 sequence (sign and >= / > conventions matter)
    old = -torch.rand(n, t, generator=g, dtype=F64) * 2
    logp = old + 0.4 * torch.randn(n, t, generator=g, dtype=F64)
    ref = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    sampler = old + 0.3 * torch.randn(n, t, generator=g, dtype=F64)
    entropy = torch.rand(n, t, generator=g, dtype=F64) * 3
    return logp, old, ref, sampler, adv, mask, entropy


# TRL 1.16 GRPOTrainer._compute_loss (trl/trainer/grpo_trainer.py, with get_off_policy_mask,
# get_gamma_weights and get_high_entropy_mask), transcribed as a plain function for one process,
# one micro-batch, gradient_accumulation_steps = steps_per_generation = 1, so num_items_in_batch is
# the mask's sum. The KL is TRL's k3. Not imported: TRL's own code is the specification.
def trl_compute_loss(
    per_token_logps, old_per_token_logps, ref_per_token_logps, advantages, mask, *, loss_type,
    importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, delta=None, beta=0.0,
    use_bias_correction_kl=False, sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
    importance_sampling_ratio=None, sampling_per_token_logps=None, off_policy_mask_threshold=None,
    entropies=None, top_entropy_quantile=1.0, entropy_coef=0.0, max_completion_length=None,
):  # fmt: skip
    if top_entropy_quantile < 1.0:
        local = entropies[mask.bool()].float()
        entropy_threshold_ = torch.quantile(local, 1 - top_entropy_quantile)
        entropy_mask = ((entropies * mask.float()) >= entropy_threshold_) & mask.bool()
    else:
        entropy_mask = None
    advantages = advantages.unsqueeze(1)
    if off_policy_mask_threshold is not None:
        kl_div = torch.nan_to_num(sampling_per_token_logps - per_token_logps.detach(), nan=0.0)
        avg_seq_kl = (kl_div * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
        off_policy_mask = ((advantages >= 0) | (avg_seq_kl <= off_policy_mask_threshold)).to(dtype=mask.dtype)
    log_ratio = per_token_logps - old_per_token_logps
    if importance_sampling_level == "token":
        log_importance_weights_ = log_ratio
    else:
        log_importance_weights_ = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights_)
    if beta != 0.0:
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
        if use_bias_correction_kl:
            per_token_kl = per_token_kl * coef_1
    if loss_type == "cispo":
        clamped_ratios = torch.clamp(coef_1, max=epsilon_high).detach()
        per_token_loss = -clamped_ratios * advantages * per_token_logps
    elif loss_type in ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]:
        coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token_loss = -torch.min(coef_1 * advantages, coef_2 * advantages)
    elif loss_type == "sapo":
        temperatures = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        per_token_loss = -torch.sigmoid(temperatures * (coef_1 - 1)) * 4 / temperatures * advantages
    elif loss_type == "vespo":
        with torch.no_grad():
            lower_clamp = math.log(1e-8)
            seq_log_ratio = torch.sum(torch.clamp(log_ratio, -20.0, 20.0) * mask, dim=-1, keepdim=True)
            if importance_sampling_ratio is not None:
                log_is_ratio = torch.clamp(torch.log(importance_sampling_ratio), lower_clamp, 20.0)
                seq_log_ratio += torch.sum(log_is_ratio, dim=-1, keepdim=True)
            log_w_seq = torch.clamp(seq_log_ratio, lower_clamp, 20.0)
            w_seq = torch.exp(log_w_seq)
            is_nonneg_adv = advantages >= 0
            k_seq = torch.where(is_nonneg_adv, vespo_k_pos, vespo_k_neg)
            lambda_seq = torch.where(is_nonneg_adv, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            log_phi = lambda_seq + k_seq * log_w_seq - lambda_seq * w_seq
            phi_seq = torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
        per_token_loss = -phi_seq * advantages * per_token_logps
    if off_policy_mask_threshold is not None:
        per_token_loss = per_token_loss * off_policy_mask
    if entropy_mask is not None:
        per_token_loss = per_token_loss * entropy_mask
    if importance_sampling_ratio is not None and loss_type != "vespo":
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type in ["grpo", "sapo"]:
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type in ["cispo", "dapo", "vespo"]:
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "luspo":
        loss = (per_token_loss * mask).sum(-1).mean()
    if entropy_coef != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        entropy_loss = (entropies * effective_mask).sum() / effective_mask.sum().clamp(min=1.0)
        loss = loss - entropy_coef * entropy_loss
    return loss


TRL_TYPES = [lt for lt in ALL_LOSS_TYPES if lt != "gmpo"]
TRL_OPTION_SETS = {
    "plain": {},
    "kl": {"beta": 0.04},
    "everything": {
        "beta": 0.04, "bias_correction_kl": True, "is_weights": "token_truncate",
        "off_policy_mask_threshold": 0.05, "top_entropy_quantile": 0.4, "entropy_coef": 0.01,
    },
    "sequence_is": {"beta": 0.04, "is_weights": "sequence_mask", "top_entropy_quantile": 0.6},
    "delta": {"delta": 1.5, "beta": 0.04},
}  # fmt: skip


def _ours_and_trl(loss_type, level, options, seed=0):
    """Our policy_loss and the TRL transcription on the same random inputs: (loss, grads) of each."""
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(seed)
    is_mode = options.get("is_weights")
    is_w = (
        None
        if is_mode is None
        else sampler_importance_weights(old, sampler, mask, mode=is_mode, clip_max=1.5)
    )
    rho = options.get("top_entropy_quantile", 1.0)
    threshold = options.get("off_policy_mask_threshold")
    coef = options.get("entropy_coef", 0.0)
    beta = options.get("beta", 0.0)
    delta = options.get("delta") if loss_type in CLIPPED_LOSS_TYPES else None
    eps_high = 5.0 if loss_type == "cispo" else 0.28  # TRL: epsilon_high is CISPO's cap itself

    def ours(logp, ref, entropy):
        entropy_mask = None
        if rho < 1.0:
            entropy_mask = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask.bool()], rho))
        opm = None if threshold is None else off_policy_sequence_mask(logp, sampler, adv, mask, threshold)
        return policy_loss(
            logp, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
            eps_low=0.2, eps_high=eps_high, delta=delta, beta=beta, max_completion_length=7,
            is_weights=is_w, bias_correction_kl=options.get("bias_correction_kl", False),
            off_policy_mask=opm, entropy_mask=entropy_mask, entropy=entropy, entropy_coef=coef,
        )[0]  # fmt: skip

    def trl(logp, ref, entropy):
        return trl_compute_loss(
            logp, old, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
            epsilon_low=0.2, epsilon_high=eps_high, delta=delta, beta=beta, max_completion_length=7,
            use_bias_correction_kl=options.get("bias_correction_kl", False),
            importance_sampling_ratio=is_w, sampling_per_token_logps=sampler,
            off_policy_mask_threshold=threshold, entropies=entropy, top_entropy_quantile=rho,
            entropy_coef=coef,
        )  # fmt: skip

    results = []
    for fn in (ours, trl):
        inputs = [x.clone().requires_grad_() for x in (logp, ref, entropy)]
        loss = fn(*inputs)
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, materialize_grads=True)
        results.append((loss.detach(), grads))
    return results


TRL_CASES = [
    (lt, lv, opts)
    for lt in TRL_TYPES
    for lv in LEVELS
    for opts in TRL_OPTION_SETS
    # TRL rejects sequence-level IS modes with vespo, and so do we (test_policy_loss_rejects_bad_combinations)
    if not (lt == "vespo" and opts == "sequence_is")
]


@pytest.mark.parametrize("loss_type, level, options", TRL_CASES)
def test_every_trl_loss_type_matches_a_transcription_of_trl(loss_type, level, options):
    opts = TRL_OPTION_SETS[options]
    (ours, ours_grads), (trl, trl_grads) = _ours_and_trl(loss_type, level, opts)
    _close(ours, trl)
    for a, b in zip(ours_grads, trl_grads, strict=True):  # d/d logp, d/d ref_logp, d/d entropy
        _close(a, b, rtol=1e-6, atol=1e-12)
    assert ours_grads[0].abs().sum() > 0  # the comparison is not between two zeros


def test_the_trl_comparison_can_fail():
    # the same harness with a wrong sign convention in SAPO's temperatures would not match
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(0)
    ours = policy_loss(logp, old, None, adv, mask, loss_type="sapo", sapo_temperature_neg=2.0)[0]
    trl = trl_compute_loss(logp, old, None, adv, mask, loss_type="sapo", sapo_temperature_neg=1.05)
    assert not torch.isclose(ours, trl, rtol=1e-6)


# verl 0.9 core_algos.compute_policy_loss_vanilla (dual-clip PPO) with loss_agg_mode "token-mean" and
# compute_policy_loss_geo_mean (GMPO), transcribed; advantages are [N, T] there.
def verl_vanilla(
    old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, clip_ratio_c, is_w=None
):
    negative_approx_kl = torch.clamp(log_prob - old_log_prob, min=-20.0, max=20.0)
    ratio = torch.exp(negative_approx_kl)
    pg_losses1 = -advantages * ratio
    pg_losses2 = -advantages * torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    clip_pg_losses1 = torch.maximum(pg_losses1, pg_losses2)
    pg_losses3 = -advantages * clip_ratio_c
    clip_pg_losses2 = torch.min(pg_losses3, clip_pg_losses1)
    pg_clipfrac_lower = (
        (clip_pg_losses1 > pg_losses3) * (advantages < 0) * response_mask
    ).sum() / response_mask.sum()
    pg_losses = torch.where(advantages < 0, clip_pg_losses2, clip_pg_losses1)
    if is_w is not None:
        pg_losses = pg_losses * is_w
    return (pg_losses * response_mask).sum() / response_mask.sum(), pg_clipfrac_lower


def verl_geo_mean(old_log_prob, log_prob, advantages, response_mask, clip_low, clip_high, is_w=None):
    negative_approx_kl = log_prob - old_log_prob
    sgn_advantage = torch.sign(advantages)
    negative_approx_kl_clamp = torch.clamp(negative_approx_kl, -clip_low, clip_high)
    negative_approx_kl_min = torch.min(
        sgn_advantage * negative_approx_kl, sgn_advantage * negative_approx_kl_clamp
    )
    negative_approx_kl_min = sgn_advantage * negative_approx_kl_min
    response_mask_sum = response_mask.sum(dim=-1)
    ratio = torch.exp((negative_approx_kl_min * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8))
    advantage = (advantages * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
    pg_losses = -advantage * ratio
    if is_w is not None:
        seq_is_weights = torch.exp(
            (torch.log(is_w + 1e-10) * response_mask).sum(dim=-1) / (response_mask_sum + 1e-8)
        )
        pg_losses = pg_losses * seq_is_weights
    return torch.mean(pg_losses)


@pytest.mark.parametrize("with_is", [False, True])
def test_dual_clip_matches_a_transcription_of_verl(with_is):
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(1)
    logp = old + 1.2 * torch.randn(logp.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    logp[adv < 0, 0] = old[adv < 0, 0] + 1.5  # ratio e^1.5 = 4.5 > c on a negative-advantage token
    is_w = sampler_importance_weights(old, sampler, mask, mode="token_truncate") if with_is else None
    a = logp.clone().requires_grad_()
    ours, metrics = policy_loss(
        a,
        old,
        None,
        adv,
        mask,
        loss_type="dapo",
        eps_low=0.2,
        eps_high=0.28,
        clip_ratio_c=3.0,
        is_weights=is_w,
    )
    b = logp.clone().requires_grad_()
    verl, clipfrac_lower = verl_vanilla(old, b, adv[:, None].expand_as(b), mask, 0.2, 0.28, 3.0, is_w)
    _close(ours, verl)
    _close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(verl, b)[0])
    assert metrics["clip_ratio/dual_mean"] == pytest.approx(clipfrac_lower.item())
    assert metrics["clip_ratio/dual_mean"] > 0  # the inputs do reach the second clip


@pytest.mark.parametrize("with_is", [False, True])
def test_gmpo_matches_a_transcription_of_verl(with_is):
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(2)
    is_w = sampler_importance_weights(old, sampler, mask, mode="token_truncate") if with_is else None
    a = logp.clone().requires_grad_()
    ours, metrics = policy_loss(
        a, old, None, adv, mask, loss_type="gmpo", eps_low=0.4, eps_high=0.4, is_weights=is_w
    )
    b = logp.clone().requires_grad_()
    verl = verl_geo_mean(old, b, adv[:, None].expand_as(b), mask, 0.4, 0.4, is_w)
    _close(ours, verl)
    _close(torch.autograd.grad(ours, a)[0], torch.autograd.grad(verl, b)[0])
    assert metrics["clip_ratio/region_mean"] > 0  # some log-ratios are past 0.4


def test_gmpo_kl_is_averaged_like_grpo():
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(3)
    pg, _ = policy_loss(logp, old, None, adv, mask, loss_type="gmpo")
    loss, _ = policy_loss(logp, old, ref, adv, mask, loss_type="gmpo", beta=0.1)
    kl = kl_penalty(logp, ref)
    _close(loss, pg + 0.1 * aggregate(kl, mask, "grpo"))


# ----------------------------------------------------------------------------- gradcheck


def _stop_gradient_type(loss_type):
    # cispo and vespo use a detached weight of the ratio, so their gradient is not the derivative of their
    # value: hold the weight fixed under gradcheck's perturbation by moving old_logp together with logp
    # (which also freezes the ratio of the bias-corrected KL, so that option is checked against TRL instead)
    return loss_type in ("cispo", "vespo")


@pytest.mark.parametrize("loss_type, level", TYPE_LEVELS)
def test_gradcheck_every_loss_type_and_level(loss_type, level):
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(4)
    is_w = sampler_importance_weights(old, sampler, mask, mode="token_truncate", clip_max=1.5)
    offset = logp - old
    entropy_mask = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask.bool()], 0.7))
    opm = torch.tensor([[1.0], [1], [0], [1], [1], [1]], dtype=F64)
    options = dict(delta=1.6, clip_ratio_c=2.5) if loss_type in CLIPPED_LOSS_TYPES else {}

    def f(logp, ref, entropy):
        old_logp = logp.detach() - offset if _stop_gradient_type(loss_type) else old
        return policy_loss(
            logp, old_logp, ref, adv, mask, loss_type=loss_type, importance_sampling_level=level,
            eps_low=0.2, eps_high=0.28, beta=0.04, max_completion_length=7, is_weights=is_w,
            bias_correction_kl=not _stop_gradient_type(loss_type), off_policy_mask=opm,
            entropy_mask=entropy_mask, entropy=entropy, entropy_coef=0.01, **options,
        )[0]  # fmt: skip

    inputs = tuple(x.clone().requires_grad_() for x in (logp, ref, entropy))
    assert torch.autograd.gradcheck(f, inputs)


# ----------------------------------------------------------------------------- micro-batches


def _combine(parts, key, level):
    count = metric_count_key(key, level)
    total = sum(p[count] for p in parts)
    return sum(p[key] * p[count] for p in parts) / total


@pytest.mark.parametrize("loss_type, level", TYPE_LEVELS)
def test_micro_batches_with_global_normalisers_sum_to_the_whole_batch(loss_type, level):
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(6)
    is_mode = "token_truncate" if loss_type == "vespo" else "sequence_truncate"
    is_w = sampler_importance_weights(old, sampler, mask, mode=is_mode, clip_max=1.5)
    # the trainer computes the entropy threshold and the off-policy mask over the whole batch
    entropy_mask = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask.bool()], 0.6))
    opm = off_policy_sequence_mask(logp, sampler, adv, mask, 0.05)
    options = dict(delta=1.6, clip_ratio_c=2.5) if loss_type in CLIPPED_LOSS_TYPES else {}
    counts = dict(
        num_sequences=float(mask.shape[0]),
        num_tokens=mask.sum().item(),
        num_entropy_tokens=(mask * entropy_mask).sum().item(),
    )

    def run(rows, logp):
        return policy_loss(
            logp[rows], old[rows], ref[rows], adv[rows], mask[rows], loss_type=loss_type,
            importance_sampling_level=level, beta=0.04, max_completion_length=5, is_weights=is_w[rows],
            bias_correction_kl=True, off_policy_mask=opm[rows], entropy_mask=entropy_mask[rows],
            entropy=entropy[rows], entropy_coef=0.01, **options, **counts,
        )  # fmt: skip

    whole_logp = logp.clone().requires_grad_()
    whole, whole_metrics = run(slice(0, 6), whole_logp)
    whole.backward()
    parts_logp = logp.clone().requires_grad_()
    parts = [run(rows, parts_logp) for rows in (slice(0, 2), slice(2, 6))]
    total = parts[0][0] + parts[1][0]
    total.backward()
    _close(total, whole)
    _close(parts_logp.grad, whole_logp.grad)
    assert whole_logp.grad.abs().sum() > 0
    # and with the counts of a micro-batch alone the sum would be wrong (the test can fail)
    local = policy_loss(
        logp[:2], old[:2], None, adv[:2], mask[:2], loss_type=loss_type, importance_sampling_level=level
    )
    assert local[0].item() != pytest.approx(run(slice(0, 2), logp)[0].item(), rel=1e-3)

    metrics = [p[1] for p in parts]
    for key, value in whole_metrics.items():
        if key in ("num_tokens_local", "num_sequences_local"):
            assert sum(m[key] for m in metrics) == value
        else:
            assert _combine(metrics, key, level) == pytest.approx(value, rel=1e-9, abs=1e-12), key


# ----------------------------------------------------------------------------- the old behaviour


def _old_policy_loss(logp, old_logp, ref_logp, advantages, mask, *, eps_low=0.2, eps_high=None, beta=0.0,
                     kl_estimator="k3", loss_type="grpo", max_completion_length=None):  # fmt: skip
    """grpo/loss.py's policy_loss before the GRPO family (git c1a7126), copied verbatim in substance."""
    if eps_high is None:
        eps_high = eps_low
    if old_logp is None:
        old_logp = logp.detach()
    ratio = torch.exp(logp - old_logp)
    adv = advantages[:, None]
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * kl
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        loss = (masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)).mean()
    elif loss_type == "dapo":
        loss = masked.sum() / mask.sum().clamp(min=1.0)
    else:
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        loss = masked.sum() / (per_token.shape[0] * length)
    with torch.no_grad():
        low = ((ratio < 1.0 - eps_low) & (adv < 0)).float()
        high = ((ratio > 1.0 + eps_high) & (adv > 0)).float()
        metrics = {
            "kl": masked_mean(kl, mask).item() if kl is not None else 0.0,
            "ratio_mean": masked_mean(ratio, mask).item(),
            "clip_ratio/low": masked_mean(low, mask).item(),
            "clip_ratio/high": masked_mean(high, mask).item(),
            "clip_ratio/region": masked_mean(torch.maximum(low, high), mask).item(),
        }
    return loss, metrics


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True])
def test_original_arguments_give_exactly_the_old_behaviour(loss_type, dtype, with_old):
    logp, old, ref, sampler, adv, mask, entropy = (x.to(dtype) for x in _random_inputs(7))
    kw = dict(
        eps_low=0.2, eps_high=0.28, beta=0.04, kl_estimator="k3", loss_type=loss_type, max_completion_length=9
    )
    results = []
    for fn in (policy_loss, _old_policy_loss):
        x = logp.clone().requires_grad_()
        loss, metrics = fn(x, old if with_old else None, ref, adv, mask, **kw)
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    (new_loss, new_grad, new_metrics), (old_loss, old_grad, old_metrics) = results
    assert torch.equal(new_loss, old_loss)
    assert torch.equal(new_grad, old_grad)
    for key, value in old_metrics.items():
        assert new_metrics[key] == value, key
    for key in ("low", "high", "region"):  # TRL's names carry the same numbers
        assert new_metrics[f"clip_ratio/{key}_mean"] == new_metrics[f"clip_ratio/{key}"]
    assert new_metrics["num_tokens_local"] == mask.sum().item()


def test_gmpo_entropy_mask_restricts_its_geometric_mean():
    logp, old, ref, sampler, adv, mask, entropy = _random_inputs(8)
    entropy_mask = high_entropy_mask(entropy, mask, entropy_threshold(entropy[mask.bool()], 0.5))
    masked, _ = policy_loss(logp, old, None, adv, mask, loss_type="gmpo", entropy_mask=entropy_mask)
    # the same as GMPO over the kept tokens only (a sequence left with none contributes 0)
    kept, _ = policy_loss(logp, old, None, adv, mask * entropy_mask, loss_type="gmpo")
    _close(masked, kept)
    plain, _ = policy_loss(logp, old, None, adv, mask, loss_type="gmpo")
    assert not torch.isclose(masked, plain)
