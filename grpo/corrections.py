"""The weights and masks applied on top of the GRPO objective, as pure functions of tensors: which
tokens and sequences count in the loss, and by how much. None of them carries a gradient.

The trainer computes them and hands them to ``grpo.loss.policy_loss``:

- ``sampler_importance_weights`` -> ``is_weights``: pi_old / pi_sampler, the correction for the
  sampler's (vLLM's) numerical mismatch with the trainer (TRL's ``vllm_importance_sampling_mode``, one of
  SAMPLER_IS_MODES); ``importance_sampling_metrics`` reports the mismatch;
- ``off_policy_sequence_mask`` -> ``off_policy_mask``: leaves out the negative samples that the policy
  has drifted far from (DeepSeek-V3.2);
- ``entropy_threshold`` and ``high_entropy_mask`` -> ``entropy_mask``: trains on the high-entropy tokens
  only ("Beyond the 80/20 rule");
- ``adaptive_entropy_coef`` and ``entropy_bonus_applies`` -> ``entropy_coef``: the entropy bonus's
  coefficient, once per optimiser step (Skywork-OR1, TRL's adaptive entropy control).

``Corrections`` carries one micro-batch's of them to ``policy_loss`` together.

Shapes: N sequences, T tokens; ``mask`` [N, T] is 1.0 on real completion tokens. This module imports
nothing from grpo.loss; grpo.loss re-exports its names, so that ``grpo.loss.sampler_importance_weights``
(the name the project's interface documents) keeps working.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")


@dataclass
class Corrections:
    """The weights and masks of one micro-batch, as ``policy_loss`` takes them (None = off).

    is_weights: [N, T] or [N, 1], ``sampler_importance_weights`` (detached here: a correction factor, never a
      path for gradients);
    off_policy_mask: [N, 1] (or [N], made [N, 1] here), ``off_policy_sequence_mask``;
    entropy_mask: [N, T], ``high_entropy_mask``;
    entropy: [N, T] token entropies (with grad when the bonus should train them);
    entropy_coef: the entropy bonus's coefficient (0 = no bonus; then entropy only feeds the metrics).

    ``policy_loss`` multiplies is_weights and the two masks into the policy term (those an objective does not
    apply itself: ``grpo.objectives.Objective.own_corrections``) and subtracts the bonus.
    """

    is_weights: torch.Tensor | None = None
    off_policy_mask: torch.Tensor | None = None
    entropy_mask: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    entropy_coef: float = 0.0

    def __post_init__(self) -> None:
        if self.is_weights is not None:
            self.is_weights = self.is_weights.detach()
        if self.off_policy_mask is not None and self.off_policy_mask.dim() == 1:
            self.off_policy_mask = self.off_policy_mask[:, None]
        if self.entropy_coef != 0.0 and self.entropy is None:
            raise ValueError("entropy is required when entropy_coef != 0")


@torch.no_grad()
def sampler_importance_weights(
    old_logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    mask: torch.Tensor,
    mode: str = "sequence_mask",
    clip_min: float | None = None,
    clip_max: float | None = 3.0,
) -> torch.Tensor:
    """Importance weights pi_old / pi_sampler that correct for the sampler's numerical mismatch, no grad.

    old_logp: [N, T] under the trainer's weights; sampler_logp: [N, T] as the sampler (vLLM) reported
    them; mask: [N, T]. TRL 1.16's ``vllm_importance_sampling_mode``:

        d = nan_to_num((old_logp - sampler_logp) * mask)     # 0 on padding and where the sampler gave NaN
        token_*:    w = exp(d)              [N, T]   (padding gets exp(0) = 1; the loss masks it anyway)
        sequence_*: w = exp(sum_t d)        [N, 1]
        *_truncate: w = clamp(w, clip_min, clip_max)          (truncated IS, TIS)
        *_mask:     w = 0 where w < clip_min or w > clip_max  (masked IS, MIS)

    None bounds are open. The weights multiply each token's policy term in ``policy_loss``.

    Example: old [[-1.0, -2.0, -0.3], [-0.5, -1.0, -2.0]], sampler [[-1.5, -1.0, nan], [-2.0, -1.0, -2.0]],
    mask [[1, 1, 0], [1, 1, 1]] -> d = [[0.5, -1.0, 0], [1.5, 0, 0]], with clip_max 3:
    token_truncate [[1.6487, 0.3679, 1], [3.0, 1, 1]]; token_mask [[1.6487, 0.3679, 1], [0, 1, 1]];
    sequence_truncate [[0.6065], [3.0]]; sequence_mask [[0.6065], [0.0]] (exp(-0.5), exp(1.5) = 4.48).
    With clip_min 0.5 too, token_truncate lifts 0.3679 to 0.5 and token_mask sets it to 0.
    """
    if mode not in SAMPLER_IS_MODES:
        raise ValueError(f"vllm_importance_sampling_mode must be one of {SAMPLER_IS_MODES}, got {mode!r}")
    if old_logp.shape != sampler_logp.shape or old_logp.shape != mask.shape:
        raise ValueError(
            f"shapes: old_logp {tuple(old_logp.shape)}, sampler_logp {tuple(sampler_logp.shape)} and mask "
            f"{tuple(mask.shape)} must match"
        )
    log_diff = torch.nan_to_num((old_logp - sampler_logp) * mask, nan=0.0)
    if mode.startswith("sequence"):
        log_diff = log_diff.sum(dim=1, keepdim=True)
    weights = torch.exp(log_diff)
    if mode.endswith("truncate"):
        if clip_min is not None or clip_max is not None:
            weights = torch.clamp(weights, min=clip_min, max=clip_max)
        return weights
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return weights.masked_fill((weights < low) | (weights > high), 0.0)


@torch.no_grad()
def importance_sampling_metrics(
    weights: torch.Tensor, old_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """TRL's sampler-mismatch metrics of one batch (call it on the whole batch for whole-batch figures).

    weights: [N, T] (token modes) or [N, 1] (sequence modes) from ``sampler_importance_weights``;
    old_logp, sampler_logp, mask: [N, T]. Returns python floats:

    - ``sampling/sampling_logp_difference/{mean,max}``: of |old_logp - sampler_logp| over the real
      tokens where the sampler gave a number (NaN tokens are left out, not counted as 0);
    - ``sampling/importance_sampling_ratio/{min,mean,max}``: of the weights over the real tokens
      (token modes) or over all N sequences (sequence modes).

    Every figure is 0.0 when there is nothing to measure.

    Example (the one of ``sampler_importance_weights``, sequence_mask): |d| on real tokens
    [0.5, 1.0, 1.5, 0, 0] -> difference mean 0.6, max 1.5; weights [[0.6065], [0]] -> ratio min 0,
    mean 0.3033, max 0.6065.
    """
    keep = mask.bool()
    diff = torch.abs(old_logp - sampler_logp)
    diff = diff[keep & ~torch.isnan(diff)]
    flat = weights.flatten() if weights.shape[1] == 1 and mask.shape[1] != 1 else weights[keep]

    def stat(values: torch.Tensor, fn) -> float:
        return fn(values).item() if values.numel() > 0 else 0.0

    return {
        "sampling/sampling_logp_difference/mean": stat(diff, torch.mean),
        "sampling/sampling_logp_difference/max": stat(diff, torch.max),
        "sampling/importance_sampling_ratio/min": stat(flat, torch.min),
        "sampling/importance_sampling_ratio/mean": stat(flat, torch.mean),
        "sampling/importance_sampling_ratio/max": stat(flat, torch.max),
    }


@torch.no_grad()
def off_policy_sequence_mask(
    logp: torch.Tensor,
    sampler_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    threshold: float,
) -> torch.Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv 2512.02556, eq. 9; TRL ``get_off_policy_mask``).

    logp: [N, T] under the current policy; sampler_logp: [N, T] of the policy that sampled (the sampler's
    own log-probs, or old_logp without vLLM); advantages: [N]; mask: [N, T]. Returns [N, 1] of 0/1
    (mask's dtype): keep a sequence unless its advantage is negative AND its mean per-token
    sampler_logp - logp (an estimate of KL(pi_sampler || pi_theta)) exceeds threshold. A negative sample
    the current policy has drifted far from teaches little and destabilises; positives are always kept.
    Tokens where the sampler gave NaN count as 0.

    Example: threshold 0.5, sampler_logp - logp per token [[0.8, 0.4], [0.1, 0.3], [0.9, 0.9]],
    A = [-1, -1, +1] -> means 0.6, 0.2, 0.9 -> keep [[0], [1], [1]].
    """
    log_gap = torch.nan_to_num(sampler_logp - logp.detach(), nan=0.0)
    mean_gap = (log_gap * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    keep = (advantages[:, None] >= 0) | (mean_gap <= threshold)
    return keep.to(mask.dtype)


def entropy_threshold(entropies: torch.Tensor, top_entropy_quantile: float) -> float:
    """The entropy above which a token is among the top rho share ("Beyond the 80/20 rule", arXiv 2506.01939).

    entropies: 1-D, the entropies of the real tokens of the WHOLE batch (all processes: the trainer
    gathers them); top_entropy_quantile: rho in [0, 1], TRL's field. Returns
    ``torch.quantile(entropies, 1 - rho)`` (linear interpolation), or +inf when there are no tokens
    (so no token is kept, as TRL). rho = 1 keeps every token, rho = 0 only the highest.

    Example: entropies [0.1, 2.0, 0.5, 1.5, 0.2], rho 0.2 -> quantile 0.8 of the sorted
    [0.1, 0.2, 0.5, 1.5, 2.0]: position 0.8 * 4 = 3.2 -> 1.5 + 0.2 * (2.0 - 1.5) = 1.6 (keeps 2.0 only).
    """
    if not 0.0 <= top_entropy_quantile <= 1.0:
        raise ValueError(f"top_entropy_quantile must be in [0, 1], got {top_entropy_quantile}")
    if entropies.dim() != 1:
        raise ValueError(f"entropies must be 1-D (the batch's real tokens), got {tuple(entropies.shape)}")
    if entropies.numel() == 0:
        return math.inf
    return torch.quantile(entropies.detach(), 1.0 - top_entropy_quantile).item()


@torch.no_grad()
def high_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, threshold_value: float) -> torch.Tensor:
    """Tokens to keep in the policy term: real tokens whose entropy >= threshold_value (TRL's ">=").

    entropy, mask: [N, T]. Returns [N, T] of 0/1 in mask's dtype. threshold_value from
    ``entropy_threshold``.

    Example: entropy [[0.1, 2.0, 0.5], [1.5, 0.2, 9.0]], mask [[1, 1, 1], [1, 1, 0]], threshold 1.0
    -> [[0, 1, 0], [1, 0, 0]] (the 9.0 is padding).
    """
    return ((entropy * mask >= threshold_value) & mask.bool()).to(mask.dtype)


def adaptive_entropy_coef(
    coef: float, entropy: float, target: float, delta: float, coef_min: float, coef_max: float
) -> float:
    """TRL's adaptive entropy controller (Skywork-OR1, arXiv 2505.22312), once per optimiser step.

    entropy: the step's mean token entropy over the whole batch (the same tokens as the bonus). The
    coefficient rises by delta while entropy <= target and falls by delta otherwise, within
    [coef_min, coef_max] (TRL's entropy_coef_delta, entropy_coef_min, entropy_coef_max).

    Example: coef 0.01, target 0.2, delta 0.005: entropy 0.15 -> 0.015; entropy 0.3 -> 0.005.
    """
    if entropy <= target:
        return min(coef + delta, coef_max)
    return max(coef - delta, coef_min)


def entropy_bonus_applies(last_entropy: float, target: float) -> bool:
    """With adaptive entropy control, TRL applies the bonus only while the last step's entropy <= target.

    last_entropy starts at +inf (no step yet), so the first step has no bonus. Apply
    ``entropy_coef if entropy_bonus_applies(...) else 0.0``.

    Example: last 0.15, target 0.2 -> True; last 0.3 -> False; last inf -> False.
    """
    return last_entropy <= target
