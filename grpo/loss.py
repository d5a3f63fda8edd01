"""The GRPO objective as pure functions of tensors.

Shapes: N completions, T completion tokens (right-padded). ``mask`` is 1.0 on real completion
tokens and is always built from completion lengths (``sequence_mask``), never from token ids,
because Qwen2.5's pad token may equal its EOS token.

Per token (DeepSeekMath eq. 3, with DAPO's asymmetric clip range)::

    ratio  = exp(logp - old_logp)                       # pi_theta / pi_old
    surr   = min(ratio * A, clamp(ratio, 1 - eps_low, 1 + eps_high) * A)
    loss_t = -surr + beta * KL_t(pi_theta || pi_ref)

then one of three aggregations turns the [N, T] token losses into a scalar (``aggregate``).
"""

from __future__ import annotations

import torch

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
KL_ESTIMATORS = ("k1", "k2", "k3")


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


def clipped_surrogate(
    ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
) -> torch.Tensor:
    """PPO's pessimistic surrogate per token: min(ratio * A, clamp(ratio, 1-eps_low, 1+eps_high) * A).

    ratio: [N, T]; advantages: [N] (broadcast over the tokens of each sequence). Returns [N, T].
    The min makes the clip one-sided: with A > 0 the gradient stops once ratio > 1 + eps_high, with
    A < 0 once ratio < 1 - eps_low; moving back towards 1 is never clipped.

    Example: ratio 1.5, A = +1, eps 0.2 -> min(1.5, 1.2) = 1.2 (clipped, no gradient);
    ratio 1.5, A = -1 -> min(-1.5, -1.2) = -1.5 (not clipped: the update is pushed back).
    """
    adv = advantages[:, None]
    return torch.minimum(ratio * adv, torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * adv)


def aggregate(
    per_token: torch.Tensor,
    mask: torch.Tensor,
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> torch.Tensor:
    """Reduce token losses [N, T] to a scalar, counting only tokens where mask [N, T] is 1.

    - ``grpo``: mean over sequences of each sequence's token mean (DeepSeekMath). A long
      completion's tokens each weigh less than a short one's.
    - ``dapo``: sum over all tokens / number of tokens (every token weighs the same).
    - ``dr_grpo``: sum over all tokens / (N * max_completion_length), a constant denominator, so the
      loss has no length bias (Dr. GRPO). max_completion_length defaults to T.

    Example: per_token [[1, 3], [5, 0]], mask [[1, 1], [1, 0]]:
    grpo = mean(2, 5) = 3.5; dapo = 9 / 3 = 3.0; dr_grpo (T = 2) = 9 / 4 = 2.25.
    """
    masked = torch.where(mask.bool(), per_token, torch.zeros_like(per_token))
    if loss_type == "grpo":
        per_sequence = masked.sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
        return per_sequence.mean()
    if loss_type == "dapo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        length = per_token.shape[1] if max_completion_length is None else max_completion_length
        return masked.sum() / (per_token.shape[0] * length)
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values [N, T] over the tokens where mask is 1 (0 when the mask is empty)."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum() / mask.sum().clamp(min=1.0)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor | None,
    ref_logp: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    eps_low: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    loss_type: str = "grpo",
    max_completion_length: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped GRPO loss with a per-token KL penalty, and its detached metrics.

    logp: [N, T] log-probs of the sampled completion tokens under the policy being trained (with grad);
    old_logp: [N, T] under the policy that sampled them (no grad); None means "the same policy"
      (num_iterations == 1), i.e. ``logp.detach()``, so ratio == 1 but its gradient is still
      d ratio / d logp = 1;
    ref_logp: [N, T] under the reference (base model, adapter off); may be None when beta == 0;
    advantages: [N]; mask: [N, T] float, 1.0 on real completion tokens.

    Per token: ``-min(ratio*A, clamp(ratio, 1-eps_low, 1+eps_high)*A) + beta*kl`` (eps_high None ->
    eps_low), then ``aggregate`` with ``loss_type``.

    Example: one sequence of two tokens, ratio 1 (old_logp None), A = [2.0], beta 0:
    per-token loss [-2, -2], grpo loss = -2.0 = -mean(A), and d loss / d logp = -A / (N * len) = -1.0
    for each token.

    Returns (loss, metrics) with metrics (python floats, token means over the mask):
    ``kl`` (0 when ref_logp is None), ``ratio_mean``, ``clip_ratio/low`` (ratio < 1 - eps_low with
    A < 0: the clip removed the gradient), ``clip_ratio/high`` (ratio > 1 + eps_high with A > 0) and
    ``clip_ratio/region`` (either).
    """
    if eps_high is None:
        eps_high = eps_low
    if beta != 0.0 and ref_logp is None:
        raise ValueError("ref_logp is required when beta != 0")
    if logp.shape != mask.shape or advantages.shape != logp.shape[:1]:
        raise ValueError(
            f"shapes: logp {tuple(logp.shape)}, mask {tuple(mask.shape)} must match and advantages "
            f"{tuple(advantages.shape)} must be [N]"
        )
    if old_logp is None:
        old_logp = logp.detach()

    ratio = torch.exp(logp - old_logp)
    per_token = -clipped_surrogate(ratio, advantages, eps_low, eps_high)
    kl = None
    if ref_logp is not None:
        kl = kl_penalty(logp, ref_logp, kl_estimator)
        if beta != 0.0:
            per_token = per_token + beta * kl
    loss = aggregate(per_token, mask, loss_type, max_completion_length)

    with torch.no_grad():
        adv = advantages[:, None].expand_as(ratio)
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
