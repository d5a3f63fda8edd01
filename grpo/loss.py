"""The GRPO objective and its family, as pure functions of tensors.

Shapes: N completions, T completion tokens (right-padded). ``mask`` is 1.0 on real completion
tokens and is always built from completion lengths (``sequence_mask``, called by grpo/rollout.py's
collate), never from token ids, because Qwen2.5's pad token may equal its EOS token.

Per token (DeepSeekMath eq. 3, with DAPO's asymmetric clip range)::

    ratio  = exp(logp - old_logp)                       # pi_theta / pi_old
    surr   = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss_t = -surr + beta * KL_t(pi_theta || pi_ref)

then ``aggregate`` turns the [N, T] token losses into a scalar. ``policy_loss`` composes the family from
pieces, each a function of its own, chosen by the table of grpo/objectives.py (``OBJECTIVES``, one row per
``loss_type``):

1. the ratio: per token, or one per sequence (GSPO, ``log_importance_weights``);
2. the policy term of the row (grpo/surrogates.py, ``POLICY_TERMS``): PPO's clip (with ``delta`` and the dual
   clip), CISPO's capped stop-gradient weight, SAPO's soft gate, VESPO's gamma weight, GMPO's geometric mean;
3. the corrections (grpo/corrections.py, ``Corrections``) the term does not apply itself: the off-policy
   sequence mask, the high-entropy token mask, the sampler-mismatch weights;
4. plus beta times the KL penalty (``kl_penalty``);
5. the row's aggregation (``aggregate``): per-sequence token means, token means, a constant denominator;
6. minus an entropy bonus (``entropy_bonus``).

The names of grpo/surrogates.py and grpo/corrections.py (and ``LossSettings`` of grpo/objectives.py) are
re-exported here, so ``from grpo.loss import sampler_importance_weights`` keeps working.

docs/OBJECTIVES.md has the table of all of them with their papers and config fields.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# Re-exported (not all used here): grpo/metrics.py and the project's documented interface import them from
# grpo.loss.
from grpo.corrections import (  # noqa: F401
    SAMPLER_IS_MODES,
    Corrections,
    adaptive_entropy_coef,
    entropy_bonus_applies,
    entropy_threshold,
    high_entropy_mask,
    importance_sampling_metrics,
    off_policy_sequence_mask,
    sampler_importance_weights,
)
from grpo.objectives import (  # noqa: F401
    AGGREGATIONS,
    CLIPPED_LOSS_TYPES,
    CORRECTIONS,
    IMPORTANCE_SAMPLING_LEVELS,
    KL_ESTIMATORS,
    LOSS_TYPES,
    OBJECTIVES,
    LossSettings,
    Objective,
)
from grpo.surrogates import (  # noqa: F401
    POLICY_TERMS,
    PolicyTerm,
    cispo_surrogate,
    clipped_surrogate,
    dual_clip,
    gmpo_surrogate,
    sapo_surrogate,
    vespo_gamma_weights,
)

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
    aggregation: str = "grpo",
    max_completion_length: int | None = None,
    *,
    num_sequences: float | None = None,
    num_tokens: float | None = None,
) -> torch.Tensor:
    """Reduce token losses [N, T] (or [N, 1], broadcast) to a scalar, counting only tokens where mask is 1.

    aggregation: one of ``AGGREGATIONS`` (verl's names), or a loss_type, meaning its row's
    (``OBJECTIVES[loss_type].aggregation``):

    - ``seq-mean-token-mean`` (grpo, sapo, gmpo): sum over sequences of each sequence's token mean /
      num_sequences (DeepSeekMath). A long completion's tokens each weigh less than a short one's.
    - ``token-mean`` (bnpo, dapo, cispo, vespo): sum over all tokens / num_tokens (every token weighs the same).
    - ``token-sum-norm`` (dr_grpo): sum over all tokens / (num_sequences * max_completion_length), a constant
      denominator, so the loss has no length bias (Dr. GRPO). max_completion_length defaults to T.
    - ``seq-mean-token-sum`` (luspo): sum over sequences of each sequence's token SUM / num_sequences (TRL):
      a sequence-level loss weighted by the sequence's length (LUSPO).

    num_sequences and num_tokens default to this call's own counts (N and mask.sum()). The trainer passes
    the counts of the whole optimiser step instead, so that the losses of its micro-batches (and, with
    gradients summed over processes, of all processes) add up exactly to the loss of the whole batch.

    Example: per_token [[1, 3], [5, 0]], mask [[1, 1], [1, 0]]:
    grpo = mean(2, 5) = 3.5; dapo = 9 / 3 = 3.0; dr_grpo (T = 2) = 9 / 4 = 2.25; luspo = (4 + 5) / 2 = 4.5.
    As the first 2 of a batch of 6 sequences holding 10 tokens: grpo = (2 + 5) / 6, dapo = 9 / 10.
    """
    if aggregation in OBJECTIVES:
        aggregation = OBJECTIVES[aggregation].aggregation
    if aggregation not in AGGREGATIONS:
        raise ValueError(
            f"aggregation must be a loss_type ({', '.join(LOSS_TYPES)}) or one of {AGGREGATIONS}, got {aggregation!r}"
        )
    if num_sequences is not None and num_sequences <= 0:
        raise ValueError(f"num_sequences must be > 0, got {num_sequences}")
    if num_tokens is not None and num_tokens < 0:
        raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if aggregation.startswith("seq-mean"):
        per_sequence = masked.sum(dim=1)
        if aggregation == "seq-mean-token-mean":
            per_sequence = per_sequence / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.mean() if num_sequences is None else per_sequence.sum() / float(num_sequences)
    if aggregation == "token-mean":
        count = mask.sum().clamp(min=1.0) if num_tokens is None else max(float(num_tokens), 1.0)
        return masked.sum() / count
    length = mask.shape[1] if max_completion_length is None else max_completion_length  # token-sum-norm
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


@dataclass(frozen=True)
class Counts:
    """The whole optimiser step's counts (all micro-batches, all processes), which each micro-batch's loss is
    divided by so that the micro-batch losses add up to the step's loss. None = this call's own count.

    num_sequences: N of the step; num_tokens: its real tokens; num_entropy_tokens: its tokens under
    mask * entropy_mask (the entropy bonus's count; needed with an entropy mask and a global num_tokens).
    """

    num_sequences: float | None = None
    num_tokens: float | None = None
    num_entropy_tokens: float | None = None


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    settings: LossSettings | None = None,
    corrections: Corrections | None = None,
    counts: Counts | None = None,
    **keywords,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GRPO loss (or one of its family, ``settings.loss_type``) with a per-token KL penalty, and its metrics.

    logp: [N, T] log-probs of the sampled completion tokens under the policy being trained (with grad);
    old_logp: [N, T] under the policy that sampled them (no grad); None = the same policy (num_iterations 1),
      i.e. ``logp.detach()``: ratio 1, but its gradient d ratio / d logp is still 1;
    ref_logp: [N, T] under the reference (the base model); may be None when beta == 0;
    advantages: [N]; mask: [N, T] float, 1.0 on real completion tokens;
    settings: the objective (``LossSettings``; default: grpo, eps 0.2, beta 0); corrections: the micro-batch's
    weights and masks (``Corrections``); counts: the step's counts (``Counts``; default: this call's own).

    The composition, in TRL 1.16's ``_compute_loss`` order, with the pieces of ``OBJECTIVES[loss_type]``:
    ratio -> policy term -> corrections -> + beta * KL -> aggregation -> - entropy_coef * entropy bonus.

    The keyword form of the earlier signature still works: each keyword goes to the group with a field of
    its name. This call and the grouped one give the same numbers::

        policy_loss(logp, old_logp, ref_logp, advantages, mask, loss_type="dapo", eps_low=0.2, eps_high=0.28,
                    beta=0.04, is_weights=w)
        policy_loss(logp, old_logp, ref_logp, advantages, mask,
                    LossSettings(loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.04), Corrections(is_weights=w))

    Example: one sequence of two tokens, ratio 1 (old_logp None), A = [2.0], beta 0: per-token loss
    [-2, -2], grpo loss = -2.0 = -mean(A), and d loss / d logp = -A / (N * len) = -1.0 for each token.

    Returns (loss, metrics): ``_policy_metrics`` lists the metrics (python floats).
    """
    settings, corrections, counts = _grouped(settings, corrections, counts, keywords)
    objective = settings.objective
    _check_shapes(logp, advantages, mask, corrections, settings.loss_type)
    if settings.beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    old_logp = logp.detach() if old_logp is None else old_logp
    log_w = log_importance_weights(logp, old_logp, mask, settings.importance_sampling_level)
    term = POLICY_TERMS[objective.term](log_w, logp, old_logp, advantages, mask, settings, corrections)
    per_token = term.loss
    for name in CORRECTIONS:  # those the term does not apply itself
        if getattr(corrections, name) is not None and name not in objective.own_corrections:
            per_token = per_token * getattr(corrections, name)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, settings.kl_estimator)
        if settings.bias_correction_kl:  # DeepSeek-V3.2: unbiased off-policy; the ratio's gradient kept (TRL)
            kl = kl * torch.exp(log_w)
        if settings.beta != 0.0:
            per_token = per_token + settings.beta * kl
    loss = aggregate(
        per_token, mask, objective.aggregation, settings.max_completion_length,
        num_sequences=counts.num_sequences, num_tokens=counts.num_tokens,
    )  # fmt: skip
    if corrections.entropy_coef != 0.0:
        loss = loss - corrections.entropy_coef * _entropy_bonus_of(corrections, mask, counts)
    metrics = _policy_metrics(term, log_w, mask, kl, corrections.entropy, settings.importance_sampling_level)
    return loss, metrics


def _grouped(
    settings: LossSettings | None, corrections: Corrections | None, counts: Counts | None, keywords: dict
) -> tuple[LossSettings, Corrections, Counts]:
    """policy_loss's three groups, with the earlier signature's keywords folded into the group that has a field
    of that name (e.g. loss_type -> LossSettings, is_weights -> Corrections, num_tokens -> Counts)."""
    groups = []
    for group, given in ((LossSettings, settings), (Corrections, corrections), (Counts, counts)):
        mine = {f.name: keywords.pop(f.name) for f in fields(group) if f.name in keywords}
        if mine and given is not None:
            raise TypeError(f"policy_loss: {', '.join(mine)} given as keywords and in {group.__name__}")
        groups.append(group(**mine) if given is None else given)
    if keywords:
        raise TypeError(f"policy_loss() got unexpected keyword arguments: {', '.join(keywords)}")
    return groups[0], groups[1], groups[2]


def _check_shapes(
    logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor, corrections: Corrections, loss_type: str
) -> None:
    if logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"shapes: logp {tuple(logp.shape)}, mask {tuple(mask.shape)} must match and advantages "
            f"{tuple(advantages.shape)} must be [N]"
        )
    n, t = logp.shape
    is_weights = corrections.is_weights
    if is_weights is not None and OBJECTIVES[loss_type].token_is_weights and is_weights.shape != (n, t):
        raise ValueError(
            f"{loss_type} needs token-level is_weights {(n, t)}, got {tuple(is_weights.shape)} (TRL allows only "
            "the token_* importance sampling modes)"
        )
    allowed = {"is_weights": [(n, t), (n, 1)], "off_policy_mask": [(n, 1)], "entropy_mask": [(n, t)],
               "entropy": [(n, t)]}  # fmt: skip
    for name, shapes in allowed.items():
        value = getattr(corrections, name)
        if value is not None and tuple(value.shape) not in shapes:
            raise ValueError(
                f"{name} must have shape {' or '.join(map(str, shapes))}, got {tuple(value.shape)}"
            )


def _entropy_bonus_of(corrections: Corrections, mask: torch.Tensor, counts: Counts) -> torch.Tensor:
    """The entropy bonus over the tokens the policy term trains on (mask * entropy_mask), over the step's count
    of them: num_entropy_tokens, or num_tokens when there is no entropy mask (None = this call's count)."""
    if corrections.entropy_mask is None:
        count = counts.num_tokens if counts.num_entropy_tokens is None else counts.num_entropy_tokens
        return entropy_bonus(corrections.entropy, mask, count)
    if counts.num_entropy_tokens is None and counts.num_tokens is not None:
        raise ValueError(
            "entropy_coef with an entropy_mask and a global num_tokens needs num_entropy_tokens "
            "(the global count of mask * entropy_mask)"
        )
    return entropy_bonus(corrections.entropy, mask * corrections.entropy_mask, counts.num_entropy_tokens)


@torch.no_grad()
def _policy_metrics(
    term: PolicyTerm,
    log_w: torch.Tensor,
    mask: torch.Tensor,
    kl: torch.Tensor | None,
    entropy: torch.Tensor | None,
    level: str,
) -> dict[str, float]:
    """policy_loss's metrics, python floats:

    token means over the mask: ``kl`` (of the KL term as added, 0 when ref_logp is None), ``entropy`` (when
    given); means over the ratio's unit (tokens at token level, sequences at sequence level, as TRL logs them):
    ``ratio_mean``, ``clip_ratio/low_mean`` (A < 0 and the clip took the gradient away), ``clip_ratio/high_mean``
    (A > 0), ``clip_ratio/region_mean`` (either), the same three under their old names ``clip_ratio/low|high|region``
    (0 for the terms without a hard clip, sapo and vespo); then the term's own (``clip_ratio/dual_mean``,
    ``cispo_clip_ratio``, ``vespo/phi_seq_mean``); counts, to combine micro-batches exactly:
    ``num_tokens_local`` (mask.sum()) and ``num_sequences_local`` (N). ``metric_count_key`` says which count
    weighs which metric.
    """

    def mean(name: str, values: torch.Tensor) -> float:  # over the unit metric_count_key gives the name
        if values.dtype == torch.bool:
            values = values.to(mask.dtype)
        if metric_count_key(name, level) == "num_sequences_local":
            return values.mean().item()
        return masked_mean(values.expand_as(mask), mask).item()

    no_clip = torch.zeros_like(log_w, dtype=torch.bool)
    low = no_clip if term.clipped_low is None else term.clipped_low
    high = no_clip if term.clipped_high is None else term.clipped_high
    clip = {"low": mean("clip_ratio/low", low), "high": mean("clip_ratio/high", high),
            "region": mean("clip_ratio/region", low | high)}  # fmt: skip
    metrics = {
        "kl": masked_mean(kl, mask).item() if kl is not None else 0.0,
        "ratio_mean": mean("ratio_mean", torch.exp(log_w)),
        **{f"clip_ratio/{key}": value for key, value in clip.items()},
        **{f"clip_ratio/{key}_mean": value for key, value in clip.items()},
        "num_tokens_local": mask.sum().item(),
        "num_sequences_local": float(mask.shape[0]),
    }
    metrics.update({name: mean(name, values) for name, values in term.metrics.items()})
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
