"""The policy term of each member of the GRPO family, as pure functions of tensors: how the ratio
pi_theta / pi_old and the advantage A make each token's (or each sequence's) surrogate objective.

``grpo.loss.policy_loss`` picks one by ``loss_type``; the loss is minus the surrogate:

    grpo, bnpo, dr_grpo, dapo, luspo   clipped_surrogate (PPO's clip; delta caps the unclipped ratio),
                                       then dual_clip on the loss when clip_ratio_c is set
    cispo                              cispo_surrogate: a capped, detached IS weight times logp
    sapo                               sapo_surrogate: a soft sigmoid gate instead of the hard clip
    vespo                              vespo_gamma_weights: a weight phi per sequence, -phi * A * logp
    gmpo                               gmpo_surrogate: A times the geometric mean of the clipped ratios

Shapes: N sequences, T tokens; ``ratio`` is [N, T] (or [N, 1] at sequence level, GSPO), ``advantages``
is [N] and is broadcast over the tokens of each sequence. docs/OBJECTIVES.md has the papers and config
fields of each.
"""

from __future__ import annotations

import math

import torch


def clipped_surrogate(
    ratio: torch.Tensor,
    advantages: torch.Tensor,
    eps_low: float,
    eps_high: float,
    delta: float | None = None,
) -> torch.Tensor:
    """PPO's pessimistic surrogate per token: min(ratio * A, clamp(ratio, 1-eps_low, 1+eps_high) * A).

    ratio: [N, T] (or [N, 1] at sequence level); advantages: [N] (broadcast over the tokens of each
    sequence). Returns ratio's shape. The min makes the clip one-sided: with A > 0 the gradient stops
    once ratio > 1 + eps_high, with A < 0 once ratio < 1 - eps_low; moving back towards 1 is never
    clipped. ``delta`` (INTELLECT-2, arXiv 2505.07291) also caps the unclipped ratio at delta, so a
    token with A < 0 and a huge ratio cannot produce a huge loss: min(min(ratio, delta) * A, ...).

    Example: ratio 1.5, A = +1, eps 0.2 -> min(1.5, 1.2) = 1.2 (clipped, no gradient);
    ratio 1.5, A = -1 -> min(-1.5, -1.2) = -1.5 (not clipped: the update is pushed back);
    ratio 5.0, A = -1, delta 4 -> min(-4, -1.2) = -4 (capped, no gradient).
    """
    adv = advantages[:, None]
    unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
    return torch.minimum(unclipped * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)


def dual_clip(per_token_loss: torch.Tensor, advantages: torch.Tensor, clip_ratio_c: float) -> torch.Tensor:
    """Dual-clip PPO (arXiv 1912.09729, verl's clip_ratio_c): cap the loss of A < 0 tokens at -c * A.

    per_token_loss: [N, T] (or [N, 1]) = -clipped surrogate; advantages: [N]. Returns the same shape:

        loss = min(loss, -c * A)   where A < 0,   loss unchanged where A >= 0

    With A < 0 PPO's min leaves large ratios unclipped (loss = -ratio * A grows without bound); the
    second clip stops the gradient once ratio > c. c must be > 1 (verl asserts the same).

    Example: A = -1, c = 3: ratio 5 -> PPO loss 5, dual clip min(5, 3) = 3 (no gradient);
    ratio 2 -> loss 2 (unchanged); A = +1 is never touched.
    """
    adv = advantages[:, None]
    return torch.where(adv < 0, torch.minimum(per_token_loss, -clip_ratio_c * adv), per_token_loss)


def cispo_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, logp: torch.Tensor, eps_max: float
) -> torch.Tensor:
    """CISPO (MiniMax-M1, arXiv 2506.13585; ScaleRL, arXiv 2510.13786): sg(min(ratio, eps_max)) * A * logp.

    ratio: [N, T] or [N, 1]; advantages: [N]; logp: [N, T]. Returns [N, T]. The IS weight is capped and
    detached, so its gradient is sg(w) * A * grad(logp): unlike PPO's clip no token ever loses its
    gradient, a large ratio only stops growing its weight. eps_max is TRL's ``epsilon_high`` used as
    the cap itself (not 1 + epsilon_high); ScaleRL recommends 5.0.

    Example: ratio 7, eps_max 5, A = +1, logp -0.5 -> 5 * 1 * -0.5 = -2.5, d/d logp = 5 (not 0).
    """
    weight = torch.clamp(ratio, max=eps_max).detach()
    return weight * advantages[:, None] * logp


def sapo_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, temperature_pos: float = 1.0, temperature_neg: float = 1.05
) -> torch.Tensor:
    """SAPO's soft gate (arXiv 2511.20347): sigmoid(tau * (ratio - 1)) * 4 / tau * A.

    ratio: [N, T] or [N, 1]; advantages: [N]. Returns ratio's shape. tau = temperature_pos where A > 0,
    temperature_neg elsewhere. At ratio 1 the gate's slope is 1 (the plain policy gradient); as the ratio
    moves away it fades smoothly instead of PPO's hard cut-off.

    Example: A = +1, tau 1: ratio 1 -> 4 * sigmoid(0) = 2.0 with slope 1.0; ratio 3 ->
    4 * sigmoid(2) = 3.5232 with slope 4 * s * (1 - s) = 0.4200 (PPO's clip would give 0).
    """
    adv = advantages[:, None]
    temperature = torch.where(
        adv > 0, torch.full_like(adv, temperature_pos), torch.full_like(adv, temperature_neg)
    )
    return torch.sigmoid(temperature * (ratio - 1.0)) * 4.0 / temperature * adv


@torch.no_grad()
def vespo_gamma_weights(
    advantages: torch.Tensor,
    log_ratio: torch.Tensor,
    mask: torch.Tensor,
    is_weights: torch.Tensor | None = None,
    k_pos: float = 2.0,
    lambda_pos: float = 3.0,
    k_neg: float = 3.0,
    lambda_neg: float = 2.0,
) -> torch.Tensor:
    """VESPO's gamma weight of each sequence (arXiv 2602.10693; TRL ``get_gamma_weights``), no grad.

    advantages: [N]; log_ratio: [N, T] = logp - old_logp per token; mask: [N, T]; is_weights: [N, T]
    sampler-mismatch weights (optional). Returns phi [N, 1]:

        log w  = clamp(sum_t mask * clamp(log_ratio, -20, 20) + sum_t mask * log(is_w), log 1e-8, 20)
        phi(w) = exp(lambda + k * log w - lambda * w)      (= w^k e^(lambda (1 - w)), phi(1) = 1)

    with (k, lambda) = (k_pos, lambda_pos) where A >= 0, else (k_neg, lambda_neg). The loss is
    -phi * A * logp: phi only scales the gradient, down-weighting sequences whose ratio is far from 1.
    log(is_w) is clamped to [log 1e-8, 20] before the sum, as TRL does.

    Example: w = 1 -> phi = 1; w = 2 with A > 0 (k 2, lambda 3): log phi = 3 + 2 ln 2 - 6 = -1.6137,
    phi = 0.1991; w = 0.5: log phi = 3 - 2 ln 2 - 1.5 = 0.1137, phi = 1.1204 (the peak is at w = k/lambda).
    """
    lower = math.log(1e-8)
    keep = mask.bool()
    log_ratio = torch.where(keep, torch.clamp(log_ratio, -20.0, 20.0), torch.zeros_like(log_ratio))
    seq_log_ratio = log_ratio.sum(dim=1, keepdim=True)
    if is_weights is not None:
        log_is = torch.clamp(torch.log(is_weights), lower, 20.0)
        log_is = torch.where(keep, log_is, torch.zeros_like(log_is))
        seq_log_ratio = seq_log_ratio + log_is.sum(dim=1, keepdim=True)
    log_w = torch.clamp(seq_log_ratio, lower, 20.0)
    nonneg = advantages[:, None] >= 0
    k = torch.where(nonneg, torch.full_like(log_w, k_pos), torch.full_like(log_w, k_neg))
    lam = torch.where(nonneg, torch.full_like(log_w, lambda_pos), torch.full_like(log_w, lambda_neg))
    lam = lam.clamp(min=1e-4)
    log_phi = lam + k * log_w - lam * torch.exp(log_w)
    return torch.exp(log_phi).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def gmpo_surrogate(
    log_ratio: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """GMPO (arXiv 2507.20673; verl ``compute_policy_loss_geo_mean``): A * geometric mean of clipped ratios.

    log_ratio: [N, T] = logp - old_logp; advantages: [N]; mask: [N, T]. Returns [N, 1]:

        l_t = sign(A) * min(sign(A) * l_t, sign(A) * clamp(l_t, -eps_low, eps_high))   (PPO's one-sided clip)
        surr_i = A_i * exp(sum_t mask * l_t / |y_i|)                                 (0 for an empty y_i)

    The clip acts on the LOG-ratio (verl uses clip_ratio_low/high that way; the GMPO paper uses 0.4,
    i.e. ratios in (e^-0.4, e^0.4)). A geometric mean is less swayed by one outlier token than the
    arithmetic mean of GRPO's per-token ratios.

    Example: log ratios [[0.1, 0.6]], eps 0.4: A = +1 -> clipped [0.1, 0.4], mean 0.25,
    surr = exp(0.25) = 1.2840 (the 0.6 token gets no gradient); A = -1 -> only the lower bound acts,
    [0.1, 0.6] stay, surr = -exp(0.35) = -1.4191.
    """
    sign = torch.sign(advantages)[:, None]
    clamped = torch.clamp(log_ratio, -eps_low, eps_high)
    clipped = sign * torch.minimum(sign * log_ratio, sign * clamped)
    lengths = mask.sum(dim=1, keepdim=True)
    mean_log = torch.where(mask.bool(), clipped, torch.zeros_like(clipped)).sum(dim=1, keepdim=True)
    mean_log = mean_log / lengths.clamp(min=1.0)
    return advantages[:, None] * (lengths > 0) * torch.exp(mean_log)
