"""The GRPO objective and its family, as pure functions of tensors.

Shapes: N completions, T completion tokens (right-padded). ``mask`` is 1.0 on real completion
tokens and is always built from completion lengths (``sequence_mask``), never from token ids,
because Qwen2.5's pad token may equal its EOS token.

Per token (DeepSeekMath eq. 3, with DAPO's asymmetric clip range)::

    ratio  = exp(logp - old_logp)                       # pi_theta / pi_old
    surr   = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss_t = -surr + beta * KL_t(pi_theta || pi_ref)

then ``aggregate`` turns the [N, T] token losses into a scalar. The rest of the family changes one
piece of this at a time, each piece a function of its own, chosen by name in ``policy_loss``:

- the ratio: per token, or one per sequence (GSPO, ``log_importance_weights``);
- the surrogate: PPO's clip (optionally capped by ``delta`` and ``dual_clip``), CISPO's clipped
  stop-gradient weight, SAPO's soft gate, VESPO's gamma weight, GMPO's geometric mean
  (grpo/surrogates.py);
- which tokens count: the high-entropy tokens only (``high_entropy_mask``), sequences that are not
  too off-policy (``off_policy_sequence_mask``), the sampler-mismatch weights
  (``sampler_importance_weights``), all in grpo/corrections.py;
- the aggregation (``aggregate``): per-sequence token means, token means, a constant denominator;
- an entropy bonus (``entropy_bonus``) with TRL's adaptive coefficient (``adaptive_entropy_coef``,
  grpo/corrections.py).

This file assembles the objective: the ratio, the KL, the aggregation, ``policy_loss`` and its
metrics. The names of grpo/surrogates.py and grpo/corrections.py are re-exported here, so
``from grpo.loss import sampler_importance_weights`` keeps working (DESIGN.md's contract).

docs/OBJECTIVES.md has the table of all of them with their papers and config fields.
"""

from __future__ import annotations

import torch

# grpo/corrections.py: the weights and masks applied on top of the objective. Re-exported (not used here):
# the trainer, grpo/metrics.py and DESIGN.md's contract import them from grpo.loss.
from grpo.corrections import (  # noqa: F401
    SAMPLER_IS_MODES,
    adaptive_entropy_coef,
    entropy_bonus_applies,
    entropy_threshold,
    high_entropy_mask,
    importance_sampling_metrics,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from grpo.surrogates import (
    cispo_surrogate,
    clipped_surrogate,
    dual_clip,
    gmpo_surrogate,
    sapo_surrogate,
    vespo_gamma_weights,
)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo", "gmpo")
# loss types whose surrogate is PPO's clipped ratio (the ones delta and clip_ratio_c apply to)
CLIPPED_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")
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
