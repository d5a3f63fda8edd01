"""The weights and masks applied on top of the objective (grpo/corrections.py): sampler importance
weights and their metrics, the off-policy sequence mask, the high-entropy token mask, the adaptive
entropy coefficient. The worked example of every docstring, by hand.

Their effect inside policy_loss (and against TRL's transcription) is tested in test_loss.py.
"""

import math

import pytest
import torch

from grpo.corrections import (
    adaptive_entropy_coef,
    entropy_bonus_applies,
    entropy_threshold,
    high_entropy_mask,
    importance_sampling_metrics,
    off_policy_sequence_mask,
    sampler_importance_weights,
)

F64 = torch.float64


def _close(actual, expected, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _is_example():
    old = torch.tensor([[-1.0, -2.0, -0.3], [-0.5, -1.0, -2.0]], dtype=F64)
    sampler = torch.tensor([[-1.5, -1.0, float("nan")], [-2.0, -1.0, -2.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], dtype=F64)
    return old, sampler, mask


@pytest.mark.parametrize(
    "mode, clip_min, expected",
    [
        ("token_truncate", None, [[math.exp(0.5), math.exp(-1.0), 1.0], [3.0, 1.0, 1.0]]),
        ("token_mask", None, [[math.exp(0.5), math.exp(-1.0), 1.0], [0.0, 1.0, 1.0]]),
        ("sequence_truncate", None, [[math.exp(-0.5)], [3.0]]),
        ("sequence_mask", None, [[math.exp(-0.5)], [0.0]]),
        ("token_truncate", 0.5, [[math.exp(0.5), 0.5, 1.0], [3.0, 1.0, 1.0]]),
        ("token_mask", 0.5, [[math.exp(0.5), 0.0, 1.0], [0.0, 1.0, 1.0]]),
    ],
)
def test_sampler_importance_weights_worked_example(mode, clip_min, expected):
    old, sampler, mask = _is_example()
    w = sampler_importance_weights(old, sampler, mask, mode=mode, clip_min=clip_min, clip_max=3.0)
    _close(w, torch.tensor(expected, dtype=F64))
    assert not w.isnan().any()
    assert math.exp(0.5) == pytest.approx(1.6487, abs=1e-4) and math.exp(-1) == pytest.approx(
        0.3679, abs=1e-4
    )


def test_sampler_importance_weights_bounds_and_errors():
    old, sampler, mask = _is_example()
    # no bounds at all: plain exp(d)
    w = sampler_importance_weights(old, sampler, mask, mode="sequence_truncate", clip_max=None)
    _close(w, torch.tensor([[math.exp(-0.5)], [math.exp(1.5)]], dtype=F64))
    w = sampler_importance_weights(old, sampler, mask, mode="sequence_mask", clip_min=0.7, clip_max=None)
    _close(w, torch.tensor([[0.0], [math.exp(1.5)]], dtype=F64))
    # no gradient ever flows through the weights
    g = old.clone().requires_grad_()
    assert not sampler_importance_weights(g, sampler, mask).requires_grad
    with pytest.raises(ValueError, match="vllm_importance_sampling_mode"):
        sampler_importance_weights(old, sampler, mask, mode="token")
    with pytest.raises(ValueError, match="shapes"):
        sampler_importance_weights(old, sampler[:, :2], mask)


def test_importance_sampling_metrics_worked_example():
    old, sampler, mask = _is_example()
    w = sampler_importance_weights(old, sampler, mask, mode="sequence_mask")
    m = importance_sampling_metrics(w, old, sampler, mask)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(0.6)
    assert m["sampling/sampling_logp_difference/max"] == pytest.approx(1.5)
    assert m["sampling/importance_sampling_ratio/min"] == 0.0
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(math.exp(-0.5) / 2)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(math.exp(-0.5))
    assert math.exp(-0.5) / 2 == pytest.approx(0.3033, abs=1e-4)
    # token modes: statistics over the real tokens only (the padded 1.0 is not counted)
    w = sampler_importance_weights(old, sampler, mask, mode="token_mask")
    m = importance_sampling_metrics(w, old, sampler, mask)
    assert m["sampling/importance_sampling_ratio/max"] == pytest.approx(math.exp(0.5))
    assert m["sampling/importance_sampling_ratio/mean"] == pytest.approx(
        (math.exp(0.5) + math.exp(-1) + 2) / 5
    )
    # a NaN from the sampler on a real token is left out of the difference, not counted as 0
    sampler[1, 2] = float("nan")
    m = importance_sampling_metrics(w, old, sampler, mask)
    assert m["sampling/sampling_logp_difference/mean"] == pytest.approx(3.0 / 4)
    empty = importance_sampling_metrics(w, old, sampler, torch.zeros_like(mask))
    assert all(v == 0.0 for v in empty.values())


def test_off_policy_sequence_mask_worked_example():
    logp = torch.full((3, 2), -1.0, requires_grad=True)
    gap = torch.tensor([[0.8, 0.4], [0.1, 0.3], [0.9, 0.9]])
    keep = off_policy_sequence_mask(
        logp, logp.detach() + gap, torch.tensor([-1.0, -1.0, 1.0]), torch.ones(3, 2), 0.5
    )
    _close(keep, torch.tensor([[0.0], [1.0], [1.0]]))
    # padding is not in the mean: seq 0 with its 0.8 token padded has mean 0.4 -> kept
    keep = off_policy_sequence_mask(
        logp,
        logp.detach() + gap,
        torch.tensor([-1.0, -1.0, 1.0]),
        torch.tensor([[0.0, 1.0], [1, 1], [1, 1]]),
        0.5,
    )
    assert keep[0].item() == 1.0
    # A == 0 counts as non-negative (TRL's >=)
    assert (
        off_policy_sequence_mask(
            logp[:1], logp[:1].detach() + 5, torch.zeros(1), torch.ones(1, 2), 0.5
        ).item()
        == 1.0
    )


def test_entropy_threshold_and_high_entropy_mask_worked_example():
    assert entropy_threshold(torch.tensor([0.1, 2.0, 0.5, 1.5, 0.2]), 0.2) == pytest.approx(1.6)
    assert entropy_threshold(torch.tensor([0.1, 2.0, 0.5]), 1.0) == pytest.approx(0.1)  # keeps all
    assert entropy_threshold(torch.tensor([0.1, 2.0, 0.5]), 0.0) == pytest.approx(2.0)  # keeps the top one
    assert entropy_threshold(torch.tensor([]), 0.2) == math.inf
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        entropy_threshold(torch.tensor([1.0]), 1.5)
    entropy = torch.tensor([[0.1, 2.0, 0.5], [1.5, 0.2, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    _close(high_entropy_mask(entropy, mask, 1.0), torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]))
    # threshold inf (no tokens in the batch) keeps nothing
    assert high_entropy_mask(entropy, mask, math.inf).sum().item() == 0.0


def test_adaptive_entropy_coef_and_gate_worked_example():
    assert adaptive_entropy_coef(0.01, 0.15, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.015)
    assert adaptive_entropy_coef(0.01, 0.3, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.005)
    assert adaptive_entropy_coef(0.999, 0.1, 0.2, 0.005, 0.0, 1.0) == 1.0  # bounded above
    assert adaptive_entropy_coef(0.002, 0.3, 0.2, 0.005, 0.0, 1.0) == 0.0  # and below
    assert adaptive_entropy_coef(0.01, 0.2, 0.2, 0.005, 0.0, 1.0) == pytest.approx(0.015)  # <= target rises
    assert entropy_bonus_applies(0.15, 0.2) and not entropy_bonus_applies(0.3, 0.2)
    assert not entropy_bonus_applies(math.inf, 0.2)


def test_grpo_loss_still_offers_the_corrections():
    # the public name of the correction is grpo.loss.sampler_importance_weights (README, docs/OBJECTIVES.md);
    # they are defined in grpo/corrections.py and re-exported from grpo.loss
    import grpo.corrections
    import grpo.loss

    for name in ("SAMPLER_IS_MODES", "sampler_importance_weights", "importance_sampling_metrics",
                 "off_policy_sequence_mask", "entropy_threshold", "high_entropy_mask", "adaptive_entropy_coef",
                 "entropy_bonus_applies"):  # fmt: skip
        assert getattr(grpo.loss, name) is getattr(grpo.corrections, name)


def test_the_config_knows_the_same_sampler_modes():
    # grpo/config.py keeps its own copy, so that validating a config imports no torch
    import grpo.corrections
    from grpo.config import SAMPLER_IS_MODES

    assert SAMPLER_IS_MODES == grpo.corrections.SAMPLER_IS_MODES
