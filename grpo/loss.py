"""The GRPO objective and its family, as pure functions of tensors.

Shapes: N completions, T completion tokens (right-padded). ``mask`` is 1.0 on real completion
tokens and is always built from completion lengths (``sequence_mask``), never from token ids,
because Qwen2.5's pad token may equal its EOS token.

Per token (DeepSeekMath eq. 3, with DAPO's asymmetric clip range)::

    ratio  = exp(logp - old_logp)                       # pi_theta / pi_old
    surr   = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss_t = -surr + beta * KL_t(pi_theta || pi_ref)

then ``aggregate`` turns the [N, T] token losses into a scalar. The rest of the family changes one
piece of this at a time, each piece a function below, chosen by name in ``policy_loss``:

- the ratio: per token, or one per sequence (GSPO, ``log_importance_weights``);
- the surrogate: PPO's clip (optionally capped by ``delta`` and ``dual_clip``), CISPO's clipped
  stop-gradient weight, SAPO's soft gate, VESPO's gamma weight, GMPO's geometric mean;
- which tokens count: the high-entropy tokens only (``high_entropy_mask``), sequences that are not
  too off-policy (``off_policy_sequence_mask``), the sampler-mismatch weights
  (``sampler_importance_weights``);
- the aggregation (``aggregate``): per-sequence token means, token means, a constant denominator;
- an entropy bonus (``entropy_bonus``) with TRL's adaptive coefficient (``adaptive_entropy_coef``).

docs/OBJECTIVES.md has the table of all of them with their papers and config fields.
"""

from __future__ import annotations

import math

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "gmpo")
# loss types whose surrogate is PPO's clipped ratio (the ones delta and clip_ratio_c apply to)
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
SAMPLER_IS_MODES = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
# metrics of policy_loss that are means over the ratio's unit: tokens, or sequences at sequence level
RATIO_METRICS = (
    "ratio_mean",
    "clip_ratio/low",
    "clip_ratio/high",
    "clip_ratio/region",
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/dual_mean",
    "cispo_clip_ratio",
)


def sequence_mask(lengths: torch.Tensor, max_len: int) -> torch.Tensor:
    """Float mask [N, max_len] with mask[i, t] = 1.0 for t < lengths[i].

    Example: lengths [2, 0, 3], max_len 3 -> [[1, 1, 0], [0, 0, 0], [1, 1, 1]].
    """
    positions = torch.arange(max_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None]).float()


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi_theta || pi_ref) from log-probs of the sampled tokens.

    logp, ref_logp: [N, T] (any matching shape). Returns the same shape. With d = ref_logp - logp:

        k1 = logp - ref_logp = -d           (unbiased, can be negative)
        k2 = 0.5 * d**2                     (biased, low variance)
        k3 = exp(d) - d - 1                 (unbiased, always >= 0: Schulman's estimator, GRPO's)

    Example: logp = -1.0, ref_logp = -1.5 -> d = -0.5: k1 = 0.5, k2 = 0.125,
    k3 = exp(-0.5) + 0.5 - 1 = 0.10653.
    """
    if estimator == "k1":
        return logp - ref_logp
    d = ref_logp - logp
    if estimator == "k2":
        return 0.5 * d**2
    if estimator == "k3":
        return torch.exp(d) - d - 1.0
    raise ValueError(f"kl estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [N, T] over the tokens where mask is 1 (0 when the mask is empty)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1.0)


# ----------------------------------------------------------------------------- the ratio


def log_importance_weights(
    logp: torch.Tensor, old_logp: torch.Tensor, mask: torch.Tensor, level: str = "token"
) -> torch.Tensor:
    """log(pi_theta / pi_old), per token [N, T] or one per sequence [N, 1] (GSPO).

        token:     log_w[i, t] = logp[i, t] - old_logp[i, t]
        sequence:  log_w[i]    = sum_t mask[i, t] * (logp - old_logp)[i, t] / |y_i|

    The sequence ratio exp(log_w[i]) is the geometric mean of the token ratios (GSPO,
    arXiv 2507.18071): one trust region per completion, matching a reward given per completion.

    Example: logp - old_logp = [[0.2, -0.1, 9.0]], mask [[1, 1, 0]] -> token [[0.2, -0.1, 9.0]],
    sequence [[0.05]] (the padded 9.0 never counts): one ratio exp(0.05) = 1.0513 for the sequence.
    """
    log_ratio = logp - old_logp
    if level == "token":
        return log_ratio
    if level == "sequence":
        summed = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio)).sum(dim=1, keepdim=True)
        return summed / mask.sum(dim=1, keepdim=True).clamp(min=1.0)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


# ----------------------------------------------------------------------------- the surrogates


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


# ----------------------------------------------------------------------------- aggregation


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
    *,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce token losses [N, T] (or [N, 1], broadcast) to a scalar, counting only tokens where mask is 1.

    - ``grpo``, ``sapo``, ``gmpo``: sum over sequences of each sequence's token mean / num_sequences
      (DeepSeekMath). A long completion's tokens each weigh less than a short one's. (gmpo's policy term
      is one number per sequence, so this is verl's mean over sequences of the GMPO loss.)
    - ``bnpo``, ``dapo``, ``cispo``, ``vespo``: sum over all tokens / num_tokens (every token weighs the
      same).
    - ``dr_grpo``: sum over all tokens / (num_sequences * max_completion_length), a constant denominator,
      so the loss has no length bias (Dr. GRPO). max_completion_length defaults to T.
    - ``luspo``: sum over sequences of each sequence's token SUM / num_sequences (TRL): a sequence-level
      loss weighted by the sequence's length (LUSPO).

    num_sequences and num_tokens default to this call's own counts (N and mask.sum()). The trainer passes
    the counts of the whole optimiser step instead, so that the losses of its micro-batches (and, with
    gradients summed over processes, of all processes) add up exactly to the loss of the whole batch.

    Example: per_token [[1, 3], [5, 0]], mask [[1, 1], [1, 0]]:
    grpo = mean(2, 5) = 3.5; dapo = 9 / 3 = 3.0; dr_grpo (T = 2) = 9 / 4 = 2.25; luspo = (4 + 5) / 2 = 4.5.
    As the first 2 of a batch of 6 sequences holding 10 tokens: grpo = (2 + 5) / 6, dapo = 9 / 10.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if num_sequences is not None and num_sequences <= 0:
        raise ValueError(f"num_sequences must be > 0, got {num_sequences}")
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if loss_type in ("grpo", "sapo", "gmpo", "luspo"):
        per_sequence = masked.sum(dim=1)
        if loss_type != "luspo":
            per_sequence = per_sequence / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.mean() if num_sequences is None else per_sequence.sum() / float(num_sequences)
    if loss_type in ("bnpo", "dapo", "cispo", "vespo"):
        count = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
        return masked.sum() / count
    # dr_grpo
    length = mask.shape[1] if max_completion_length is None else max_completion_length
    sequences = mask.shape[0] if num_sequences is None else float(num_sequences)
    return masked.sum() / (sequences * length)


def entropy_bonus(entropy: torch.Tensor, mask: torch.Tensor, num_tokens: float | None = None) -> torch.Tensor:
    """Mean entropy per token over mask: sum(entropy * mask) / num_tokens (None = mask.sum()).

    entropy: [N, T] (may carry gradient); mask: [N, T]. Returns a scalar. The bonus enters the loss as
    ``loss - entropy_coef * entropy_bonus`` and is NOT rescaled by the loss type (TRL: "entropy_coef
    has the same meaning for every loss type").

    Example: entropy [[1.0, 3.0], [2.0, 9.0]], mask [[1, 1], [1, 0]] -> 6 / 3 = 2.0; as part of a
    batch of 12 such tokens: 6 / 12 = 0.5.
    """
    count = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
    return torch.where(mask.bool(), entropy, torch.zeros_like(entropy)).sum() / count


# ----------------------------------------------------------------------------- the loss


def _check_shape(name: str, value: torch.Tensor | None, allowed: list[tuple[int, ...]]) -> None:
    if value is not None and tuple(value.shape) not in allowed:
        raise ValueError(f"{name} must have shape {' or '.join(map(str, allowed))}, got {tuple(value.shape)}")


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str = "grpo",
    importance_sampling_level: str = "token",
    eps_low: float = 0.2,
    eps_high: float | None = None,
    delta: float | None = None,
    clip_ratio_c: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    max_completion_length: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    is_weights: torch.Tensor | None = None,
    bias_correction_kl: bool = False,
    off_policy_mask: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
    num_entropy_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss (or one of its family) with a per-token KL penalty, and its detached metrics.

    logp: [N, T] log-probs of the sampled completion tokens under the policy being trained (with grad);
    old_logp: [N, T] under the policy that sampled them (no grad); None means "the same policy"
      (num_iterations == 1), i.e. ``logp.detach()``, so ratio == 1 but its gradient is still
      d ratio / d logp = 1;
    ref_logp: [N, T] under the reference (base model, adapter off); may be None when beta == 0;
    advantages: [N]; mask: [N, T] float, 1.0 on real completion tokens.

    Per token: ``-min(ratio*A, clamp(ratio, 1-eps_low, 1+eps_high)*A) + beta*kl`` (eps_high None ->
    eps_low), then ``aggregate`` with ``loss_type``. The family, in TRL 1.16's ``_compute_loss`` order:

    1. ratio = exp(``log_importance_weights``) at ``importance_sampling_level`` (token, or sequence = GSPO);
    2. the policy term by loss_type: grpo/bnpo/dr_grpo/dapo/luspo -> ``clipped_surrogate`` (with ``delta``)
       then ``dual_clip`` when ``clip_ratio_c`` is set (verl); cispo -> ``cispo_surrogate`` with cap
       eps_high; sapo -> ``sapo_surrogate``; vespo -> -phi * A * logp with phi = ``vespo_gamma_weights``
       (which takes ``is_weights`` in its log w); gmpo -> ``gmpo_surrogate``, one term per sequence
       (token level only; its geometric mean runs over mask * entropy_mask and a token-level
       ``is_weights`` enters as its geometric mean over the same tokens, as verl does);
    3. times ``off_policy_mask`` [N, 1] (``off_policy_sequence_mask``), ``entropy_mask`` [N, T]
       (``high_entropy_mask``) and ``is_weights`` [N, T] or [N, 1] (``sampler_importance_weights``,
       detached; not for vespo and gmpo, which use it as said above);
    4. plus beta * KL (``kl_penalty``), times the ratio (gradient kept) when ``bias_correction_kl``;
    5. ``aggregate`` with num_sequences / num_tokens (None = this call's own counts);
    6. minus ``entropy_coef * entropy_bonus(entropy, mask * entropy_mask, num_entropy_tokens)``. With
       num_tokens given and no entropy_mask, num_entropy_tokens defaults to num_tokens; with an
       entropy_mask pass the global count of mask * entropy_mask (it differs from num_tokens).

    delta and clip_ratio_c apply only to the clipped loss types; setting them with another is an error.

    Example: one sequence of two tokens, ratio 1 (old_logp None), A = [2.0], beta 0:
    per-token loss [-2, -2], grpo loss = -2.0 = -mean(A), and d loss / d logp = -A / (N * len) = -1.0
    for each token.

    Returns (loss, metrics) with metrics (python floats, detached):
    token means over the mask: ``kl`` (of the KL term as added, 0 when ref_logp is None), ``entropy``
    (when entropy is given);
    means over the ratio's unit (tokens at token level, sequences at sequence level, as TRL logs them):
    ``ratio_mean``, ``clip_ratio/low_mean`` (ratio < 1 - eps_low with A < 0: the clip removed the
    gradient), ``clip_ratio/high_mean`` (ratio > 1 + eps_high with A > 0), ``clip_ratio/region_mean``
    (either), the same three under their old names ``clip_ratio/low|high|region``,
    ``clip_ratio/dual_mean`` (when clip_ratio_c is set: A < 0 and the dual clip acted), and for cispo
    ``cispo_clip_ratio`` (ratio > eps_high with A > 0; also reported as clip_ratio/high). For gmpo the
    clip fractions are of the log-ratio clip; sapo and vespo have no hard clip and report 0;
    sequence means: ``vespo/phi_seq_mean`` (vespo);
    counts, to combine micro-batches exactly: ``num_tokens_local`` (mask.sum()) and
    ``num_sequences_local`` (N). ``metric_count_key`` says which count weighs which metric.
    """
    if eps_high is None:
        eps_high = eps_low
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_SAMPLING_LEVELS:
        raise ValueError(
            f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, "
            f"got {importance_sampling_level!r}"
        )
    if beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    if logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"shapes: logp {tuple(logp.shape)}, mask {tuple(mask.shape)} must match and advantages "
            f"{tuple(advantages.shape)} must be [N]"
        )
    n, t = logp.shape
    _check_shape("is_weights", is_weights, [(n, t), (n, 1)])
    _check_shape("entropy_mask", entropy_mask, [(n, t)])
    _check_shape("entropy", entropy, [(n, t)])
    _check_shape("off_policy_mask", off_policy_mask, [(n, 1), (n,)])
    if delta is not None and loss_type not in CLIPPED_LOSS_TYPES:
        raise ValueError(f"delta applies to the clipped loss types {CLIPPED_LOSS_TYPES}, not {loss_type!r}")
    if clip_ratio_c is not None:
        if loss_type not in CLIPPED_LOSS_TYPES:
            raise ValueError(
                f"clip_ratio_c applies to the clipped loss types {CLIPPED_LOSS_TYPES}, not {loss_type!r}"
            )
        if clip_ratio_c <= 1.0:
            raise ValueError(f"clip_ratio_c must be > 1 (dual-clip PPO), got {clip_ratio_c}")
    if loss_type == "gmpo" and importance_sampling_level != "token":
        raise ValueError(
            "gmpo already takes one geometric-mean ratio per sequence: use importance_sampling_level 'token'"
        )
    if loss_type == "vespo" and is_weights is not None and is_weights.shape[1] == 1 and t != 1:
        raise ValueError(
            "vespo needs token-level is_weights [N, T] (TRL allows only the token_* importance "
            "sampling modes)"
        )
    if entropy_coef != 0.0:
        if entropy is None:
            raise ValueError("entropy is required when entropy_coef != 0")
        if entropy_mask is not None and num_tokens is not None and num_entropy_tokens is None:
            raise ValueError(
                "entropy_coef with an entropy_mask and a global num_tokens needs num_entropy_tokens "
                "(the global count of mask * entropy_mask)"
            )
    if old_logp is None:
        old_logp = logp.detach()
    if is_weights is not None:
        is_weights = is_weights.detach()  # a correction factor, never a path for gradients
    if off_policy_mask is not None:
        off_policy_mask = off_policy_mask.reshape(n, 1)

    log_w = log_importance_weights(logp, old_logp, mask, importance_sampling_level)
    ratio = torch.exp(log_w)
    adv = advantages[:, None]

    # 2. the policy term
    phi = None
    if loss_type in CLIPPED_LOSS_TYPES:
        per_token = -clipped_surrogate(ratio, advantages, eps_low, eps_high, delta)
        if clip_ratio_c is not None:
            per_token = dual_clip(per_token, advantages, clip_ratio_c)
    elif loss_type == "cispo":
        per_token = -cispo_surrogate(ratio, advantages, logp, eps_high)
    elif loss_type == "sapo":
        per_token = -sapo_surrogate(ratio, advantages, sapo_temperature_pos, sapo_temperature_neg)
    elif loss_type == "vespo":
        phi = vespo_gamma_weights(
            advantages, logp - old_logp, mask, is_weights,
            vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg,
        )  # fmt: skip
        per_token = -phi * adv * logp
    else:  # gmpo: one term per sequence, over the tokens the policy term keeps
        policy_mask = mask if entropy_mask is None else mask * entropy_mask
        per_token = -gmpo_surrogate(logp - old_logp, advantages, policy_mask, eps_low, eps_high)
        if is_weights is not None:
            per_token = per_token * _geometric_mean_weights(is_weights, policy_mask)

    # 3. which tokens (and sequences) count, and the sampler-mismatch correction
    if off_policy_mask is not None:
        per_token = per_token * off_policy_mask
    if entropy_mask is not None and loss_type != "gmpo":
        per_token = per_token * entropy_mask
    if is_weights is not None and loss_type not in ("vespo", "gmpo"):
        per_token = per_token * is_weights

    # 4. the KL penalty
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        if bias_correction_kl:
            kl = kl * ratio  # DeepSeek-V3.2: makes the KL gradient unbiased off-policy; gradient kept (TRL)
        if beta != 0.0:
            per_token = per_token + beta * kl

    # 5. aggregation, 6. entropy bonus
    loss = aggregate(
        per_token, mask, loss_type, max_completion_length, num_sequences=num_sequences, num_tokens=num_tokens
    )
    if entropy_coef != 0.0:
        effective_mask = mask if entropy_mask is None else mask * entropy_mask
        count = num_entropy_tokens
        if count is None and entropy_mask is None:
            count = num_tokens
        loss = loss - entropy_coef * entropy_bonus(entropy, effective_mask, count)

    metrics = _policy_metrics(
        loss_type, importance_sampling_level, log_w, ratio, adv, mask, kl, entropy, phi,
        eps_low, eps_high, delta, clip_ratio_c,
    )  # fmt: skip
    return loss, metrics


def _geometric_mean_weights(is_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """verl's GMPO use of token-level IS weights [N, T]: their geometric mean over mask, [N, 1]."""
    if is_weights.shape[1] == 1:
        return is_weights
    log_w = torch.where(mask.bool(), torch.log(is_weights + 1e-10), torch.zeros_like(is_weights))
    return torch.exp(log_w.sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp(min=1.0))


@torch.no_grad()
def _policy_metrics(
    loss_type: str,
    level: str,
    log_w: torch.Tensor,
    ratio: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
    phi: torch.Tensor | None,
    eps_low: float,
    eps_high: float,
    delta: float | None,
    clip_ratio_c: float | None,
) -> dict[str, float]:
    def unit_mean(values: torch.Tensor) -> float:
        # TRL: one value per sequence at sequence level (a mean over sequences), else a token mean
        if values.dtype == torch.bool:
            values = values.to(mask.dtype)
        if level == "sequence":
            return values.mean().item()
        return masked_mean(values.expand_as(mask), mask).item()

    zeros = torch.zeros_like(ratio, dtype=torch.bool)
    low, high = zeros, zeros
    if loss_type in CLIPPED_LOSS_TYPES:
        low = (ratio < 1.0 - eps_low) & (adv < 0)
        high = (ratio > 1.0 + eps_high) & (adv > 0)
    elif loss_type == "gmpo":  # the clip acts on the log-ratio
        low = (log_w < -eps_low) & (adv < 0)
        high = (log_w > eps_high) & (adv > 0)
    elif loss_type == "cispo":
        high = (ratio > eps_high) & (adv > 0)
    low_mean, high_mean, region_mean = unit_mean(low), unit_mean(high), unit_mean(low | high)
    metrics = {
        "kl": masked_mean(kl, mask).item() if kl is not None else 0.0,
        "ratio_mean": unit_mean(ratio),
        "clip_ratio/low": low_mean,
        "clip_ratio/high": high_mean,
        "clip_ratio/region": region_mean,
        "clip_ratio/low_mean": low_mean,
        "clip_ratio/high_mean": high_mean,
        "clip_ratio/region_mean": region_mean,
        "num_tokens_local": mask.sum().item(),
        "num_sequences_local": float(mask.shape[0]),
    }
    if clip_ratio_c is not None:
        # A < 0: PPO's loss is -A * max(min(ratio, delta), clip(ratio)), above -c * A exactly when this holds
        capped = ratio if delta is None else torch.clamp(ratio, max=delta)
        metrics["clip_ratio/dual_mean"] = unit_mean((adv < 0) & (capped > clip_ratio_c))
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"] = high_mean
    if phi is not None:
        metrics["vespo/phi_seq_mean"] = phi.mean().item()
    if entropy is not None:
        metrics["entropy"] = masked_mean(entropy.detach(), mask).item()
    return metrics


def metric_count_key(name: str, importance_sampling_level: str = "token") -> str:
    """Which count of ``policy_loss``'s metrics a metric is a mean over, to combine micro-batches exactly.

    Returns "num_tokens_local" or "num_sequences_local". The whole batch's value of a metric m is
    sum_k m_k * c_k / sum_k c_k over micro-batches (and processes) k, with c = metrics[metric_count_key(m)].

    Example: "kl" -> "num_tokens_local"; "ratio_mean" at sequence level -> "num_sequences_local";
    "vespo/phi_seq_mean" -> "num_sequences_local".
    """
    if name == "vespo/phi_seq_mean" or (importance_sampling_level == "sequence" and name in RATIO_METRICS):
        return "num_sequences_local"
    return "num_tokens_local"


# ----------------------------------------------------------------------------- token and sequence selection


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
