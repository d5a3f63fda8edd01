"""The policy term of each member of the GRPO family, as pure functions of tensors: how the ratio
pi_theta / pi_old and the advantage A make each token's (or each sequence's) loss.

Two layers. The surrogates are the formulas of the papers (``clipped_surrogate``, ``dual_clip``,
``cispo_surrogate``, ``sapo_surrogate``, ``vespo_gamma_weights``, ``gmpo_surrogate``). The policy terms are
what ``grpo.loss.policy_loss`` calls: one small function per term, registered by name in ``POLICY_TERMS``
(verl's ``register_policy_loss``), all with one signature, each returning minus its surrogate and where its
clip acted (``PolicyTerm``). The table of grpo/objectives.py says which term each ``loss_type`` uses:

    ppo_clip    grpo, bnpo, dr_grpo, dapo, luspo: PPO's clip (delta caps the unclipped ratio), then the
                dual clip when clip_ratio_c is set
    cispo       a capped, detached IS weight times logp
    sapo        a soft sigmoid gate instead of the hard clip
    vespo       a gamma weight phi per sequence: -phi * A * logp
    gmpo        A times the geometric mean of the clipped ratios, one term per sequence

Shapes: N sequences, T tokens; ``log_w`` is [N, T] (or [N, 1] at sequence level, GSPO), ``advantages`` is
[N] and is broadcast over the tokens of each sequence. docs/OBJECTIVES.md has the papers and config
fields of each.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from grpo.corrections import Corrections
from grpo.objectives import LossSettings


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
    if clip_ratio_c <= 1.0:
        raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
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


# ----------------------------------------------------------------------------- the policy terms


@dataclass
class PolicyTerm:
    """What a policy term hands back to ``policy_loss``: its loss and where its clip acted.

    loss: [N, T], or [N, 1] for one term per sequence: minus the surrogate.
    clipped_low / clipped_high: bool, log_w's shape, or None (no hard clip): A < 0 (A > 0) and the clip took
      the gradient away; logged as ``clip_ratio/low_mean`` / ``clip_ratio/high_mean``.
    metrics: more of the term's metrics, name -> values not yet averaged (a bool or float tensor, averaged over
      the unit ``grpo.loss.metric_count_key`` gives the name: tokens, or sequences).
    """

    loss: torch.Tensor
    clipped_low: torch.Tensor | None = None
    clipped_high: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


# One signature for every term: (log_w [N, T] or [N, 1] (the ratio's log at importance_sampling_level),
# logp [N, T], old_logp [N, T], advantages [N], mask [N, T], LossSettings, Corrections) -> PolicyTerm
Tensor = torch.Tensor
PolicyTermFn = Callable[[Tensor, Tensor, Tensor, Tensor, Tensor, LossSettings, Corrections], PolicyTerm]
POLICY_TERMS: dict[str, PolicyTermFn] = {}


def register_term(name: str) -> Callable[[PolicyTermFn], PolicyTermFn]:
    """Add the decorated function to ``POLICY_TERMS`` under ``name`` (the ``term`` of a row of the table)."""

    def add(fn: PolicyTermFn) -> PolicyTermFn:
        POLICY_TERMS[name] = fn
        return fn

    return add


@register_term("ppo_clip")
def ppo_clip_term(
    log_w, logp, old_logp, advantages, mask, settings: LossSettings, corrections: Corrections
) -> PolicyTerm:
    """PPO's clipped term (DeepSeekMath eq. 3, with DAPO's eps_high; grpo, bnpo, dr_grpo, dapo, luspo):

        loss = -min(min(r, delta) A, clamp(r, 1 - eps_low, 1 + eps_high) A),   r = exp(log_w)
        loss = min(loss, -c A) where A < 0, with c = clip_ratio_c               (dual-clip PPO, verl)

    log_w: [N, T], or [N, 1] at sequence level (GSPO); advantages: [N]. Returns loss of log_w's shape;
    flags low (A < 0, r < 1 - eps_low), high (A > 0, r > 1 + eps_high), ``clip_ratio/dual_mean`` (the dual
    clip acted).

    Example: r = [[1.5, 0.5, 5.0]], A = [-1], eps 0.2, c = 3 -> PPO's loss [[1.5, 0.8, 5.0]], dual clip
    [[1.5, 0.8, 3.0]]; low [[F, T, F]], dual [[F, F, T]]; with delta 4 the 5.0 is 4.0 before the dual clip.
    """
    ratio = torch.exp(log_w)
    adv = advantages[:, None]
    loss = -clipped_surrogate(ratio, advantages, settings.eps_low, settings.eps_high, settings.delta)
    metrics = {}
    if settings.clip_ratio_c is not None:
        loss = dual_clip(loss, advantages, settings.clip_ratio_c)
        capped = ratio if settings.delta is None else torch.clamp(ratio, max=settings.delta)
        metrics["clip_ratio/dual_mean"] = (adv < 0) & (capped > settings.clip_ratio_c)
    low = (ratio < 1.0 - settings.eps_low) & (adv < 0)
    high = (ratio > 1.0 + settings.eps_high) & (adv > 0)
    return PolicyTerm(loss, low, high, metrics)


@register_term("cispo")
def cispo_term(
    log_w, logp, old_logp, advantages, mask, settings: LossSettings, corrections: Corrections
) -> PolicyTerm:
    """CISPO (MiniMax-M1, arXiv 2506.13585; ScaleRL, arXiv 2510.13786): a capped, detached IS weight.

        loss = -sg(min(r, eps_high)) A logp,   r = exp(log_w)

    log_w: [N, T] or [N, 1]; logp: [N, T]; advantages: [N]. Returns [N, T]; flag high (A > 0 and r > eps_high:
    the weight was capped, the token keeps its gradient), also logged as ``cispo_clip_ratio``.

    Example: r 7, eps_high 5, A = +1, logp -0.5 -> loss 2.5 and d loss / d logp = -5 (not 0); high True.
    """
    ratio = torch.exp(log_w)
    loss = -cispo_surrogate(ratio, advantages, logp, settings.eps_high)
    high = (ratio > settings.eps_high) & (advantages[:, None] > 0)
    return PolicyTerm(loss, None, high, {"cispo_clip_ratio": high})


@register_term("sapo")
def sapo_term(
    log_w, logp, old_logp, advantages, mask, settings: LossSettings, corrections: Corrections
) -> PolicyTerm:
    """SAPO (arXiv 2511.20347): a soft sigmoid gate instead of PPO's hard clip.

        loss = -sigmoid(tau (r - 1)) 4 / tau A,   r = exp(log_w),
        tau = sapo_temperature_pos where A > 0, else sapo_temperature_neg

    log_w: [N, T] or [N, 1]; advantages: [N]. Returns log_w's shape; no hard clip (no flags).

    Example: r = [[1, 3]], A = [+1], tau 1 -> loss [[-2.0, -3.5232]], slopes d loss / d r [[-1.0, -0.4200]]
    (PPO's clip would give the second 0).
    """
    ratio = torch.exp(log_w)
    return PolicyTerm(
        -sapo_surrogate(ratio, advantages, settings.sapo_temperature_pos, settings.sapo_temperature_neg)
    )


@register_term("vespo")
def vespo_term(
    log_w, logp, old_logp, advantages, mask, settings: LossSettings, corrections: Corrections
) -> PolicyTerm:
    """VESPO (arXiv 2602.10693; TRL 1.16): the policy gradient scaled by a gamma weight of the sequence ratio.

        loss = -phi A logp,   phi = vespo_gamma_weights(A, log_w, mask, is_weights, k, lambda)   (no grad)

    phi forms its own sequence ratio w from the token log-ratios logp - old_logp (so log_w, the ratio at
    importance_sampling_level, is not used). logp, old_logp, mask: [N, T]; advantages: [N];
    ``corrections.is_weights`` [N, T] (or None) enter phi's log w (its own correction, not multiplied in
    again). Returns [N, T]; metric ``vespo/phi_seq_mean`` (phi [N, 1], a mean over sequences). No hard clip.

    Example: logp = old_logp (w = 1, phi = 1), no is_weights, logp [[-0.5, -1.0]], A = [2] -> loss
    [[1.0, 2.0]]: the plain policy gradient; with logp - old_logp summing to ln 2, phi = 0.1991 scales it.
    """
    phi = vespo_gamma_weights(
        advantages, logp - old_logp, mask, corrections.is_weights,
        settings.vespo_k_pos, settings.vespo_lambda_pos, settings.vespo_k_neg, settings.vespo_lambda_neg,
    )  # fmt: skip
    return PolicyTerm(-phi * advantages[:, None] * logp, metrics={"vespo/phi_seq_mean": phi})


@register_term("gmpo")
def gmpo_term(
    log_w, logp, old_logp, advantages, mask, settings: LossSettings, corrections: Corrections
) -> PolicyTerm:
    """GMPO (arXiv 2507.20673; verl ``compute_policy_loss_geo_mean``): one term per sequence.

        loss_i = -gmpo_surrogate(log_w, A, mask * entropy_mask, eps_low, eps_high)_i * g_i

    where g_i is the geometric mean of the token is_weights over the same tokens (verl; 1 without them).
    Both corrections are its own: the geometric mean runs over the tokens the entropy mask keeps. Token level
    only (it is its own sequence ratio): log_w = logp - old_logp, mask: [N, T]; advantages: [N]. Returns [N, 1]; flags on the LOG-ratio clip: low (A < 0,
    log_w < -eps_low), high (A > 0, log_w > eps_high).

    Example: log_w [[0.1, 0.6]], A = [1], eps 0.4 -> loss [[-exp(0.25)]] = -1.2840 and high [[F, T]];
    with entropy_mask [[1, 0]] -> -exp(0.1) = -1.1052; with is_weights [[4, 1]] too -> -1.1052 * 4 = -4.4207.
    """
    if settings.importance_sampling_level != "token":
        raise ValueError(
            "gmpo already takes one geometric-mean ratio per sequence: use importance_sampling_level 'token'"
        )
    policy_mask = mask if corrections.entropy_mask is None else mask * corrections.entropy_mask
    loss = -gmpo_surrogate(log_w, advantages, policy_mask, settings.eps_low, settings.eps_high)
    if corrections.is_weights is not None:
        loss = loss * _geometric_mean_weights(corrections.is_weights, policy_mask)
    adv = advantages[:, None]
    return PolicyTerm(loss, (log_w < -settings.eps_low) & (adv < 0), (log_w > settings.eps_high) & (adv > 0))


def _geometric_mean_weights(is_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's GMPO use of token-level IS weights [N, T]: their geometric mean over mask, [N, 1]."""
    if is_weights.shape[1] == 1:
        return is_weights
    log_w = torch.where(mask.bool(), torch.log(is_weights + 1e-10), torch.zeros_like(is_weights))
    return torch.exp(log_w.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0))
