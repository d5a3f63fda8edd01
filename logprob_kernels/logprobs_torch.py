"""The "torch" backend of `logprob_kernels.logprobs.token_logprobs`: chunked over tokens, any device.

The forward walks the M tokens C at a time (default 128): one [C, V] float32 logits buffer, reused by every
chunk, gives each token's log-prob and log-sum-exp (kept: one number per token). The logits are float32
matmuls of float32 copies even for bf16 inputs (exact products, float32 sums, no rounding to 16 bits); the
gradient products below run in the inputs' dtype. The backward rebuilds each
chunk's softmax from the saved log-sum-exp, p = exp(logits / T - lse), and forms

    d hidden[m] = grad_logp[m] / T * (onehot(targets[m]) - p[m]) @ W
    d weight    = sum_m grad_logp[m] / T * (onehot(targets[m]) - p[m])^T hidden[m].

With a frozen weight (the recipe's tied lm_head) `torch_forward(..., hidden_grad=True)` computes the
[M, H] gradient d logp / d hidden in the forward instead, while the chunk's softmax is in memory.

When the entropy H[m] = -sum_v p[m, v] log p[m, v] is in the loss too (an entropy bonus), the backward also
gets its upstream gradient grad_entropy [M] and the saved entropy, and the logits gradient gains a term,

    d H[m] / d z[m, v] = -p[m, v] (log p[m, v] + H[m])          (z = logits / T)

(`torch_backward(..., entropy=, grad_entropy=)`), reusing the chunk's rebuilt p.
"""

from __future__ import annotations

import torch
from torch import Tensor

# Tokens per chunk: one [128, V] float32 buffer is 78 MB at V = 151,936. Measured on CPU against 64 and 256
# in docs/KERNELS.md.
DEFAULT_CHUNK_SIZE = 128


def _chunk_logits(
    hidden_chunk: Tensor, weight: Tensor, inv_temp: float, out: Tensor, shift: Tensor | None = None
) -> Tensor:
    """[C, H] x [V, H] -> [C, V] `logits / T - shift[:, None]` written into `out` [C, V] (all one dtype, float32
    or float64): alpha folds 1/T into the matmul and the shift rides in as addmm's bias (beta = 1), so neither
    costs an extra pass over [C, V]."""
    if shift is None:
        return torch.addmm(out, hidden_chunk, weight.T, beta=0.0, alpha=inv_temp, out=out)
    return torch.addmm(-shift[:, None], hidden_chunk, weight.T, alpha=inv_temp, out=out)


def _accumulation_operands(hidden: Tensor, weight: Tensor) -> tuple[torch.dtype, Tensor]:
    """(acc_dtype, weight in acc_dtype): float32 (float64 for float64 inputs, the tests' reference).

    A 16-bit weight is copied to float32 once per call, for every chunk to share: a product of two bf16 numbers
    is exact in float32, so float32 matmuls over the upcast chunks give the float32-accumulated logits, never
    rounded to 16 bits (what the triton kernel computes on tensor cores; 16-bit matmul outputs would round them).
    """
    acc_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    return acc_dtype, weight.to(acc_dtype)


def torch_forward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    chunk_size: int | None,
    with_entropy: bool,
    hidden_grad: bool = False,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """Returns logp [M], lse [M], entropy [M] or None, and with `hidden_grad` also

        dlogp_dhidden [M, H] = (onehot(targets) - p) @ W / T,

    the gradient of each logp[m] with respect to its own hidden[m], computed while the chunk's
    softmax is at hand (float32; float64 for float64 inputs, which tests use as a reference).
    Extra memory: one [C, V] buffer.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, max(num_tokens, 1))
    acc_dtype, weight_acc = _accumulation_operands(hidden, weight)
    inv_temp = 1.0 / temperature
    logp = torch.empty(num_tokens, dtype=acc_dtype, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp) if with_entropy else None
    dlogp_dhidden = torch.empty(hidden.shape, dtype=acc_dtype, device=hidden.device) if hidden_grad else None
    buffer = torch.empty(chunk, vocab, dtype=acc_dtype, device=hidden.device)  # reused by every chunk
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        chunk_targets = targets[start:end, None].long()
        logits = _chunk_logits(hidden[start:end].to(acc_dtype), weight_acc, inv_temp, buffer[: end - start])
        target_logit = logits.gather(1, chunk_targets).squeeze(1)
        # In place: PyTorch's fused log_softmax (max, then sum of exp, then write) over the same buffer.
        log_probs = torch.log_softmax(logits, dim=1, out=logits)
        logp[start:end] = log_probs.gather(1, chunk_targets).squeeze(1)
        lse[start:end] = target_logit - logp[start:end]  # log_softmax = logits - lse
        if with_entropy:
            # entropy = -sum_v p_v log p_v, as a batched dot product (one temporary [C, V] for p)
            entropy[start:end] = -torch.bmm(log_probs.exp()[:, None, :], log_probs[:, :, None]).view(-1)
        if hidden_grad:
            probs = log_probs.exp_()  # in place: softmax
            p_minus_onehot = probs.scatter_add_(1, chunk_targets, probs.new_full((end - start, 1), -1.0))
            product = p_minus_onehot.to(hidden.dtype) @ weight  # [C, H], fp32 accumulation inside
            dlogp_dhidden[start:end] = product.to(acc_dtype).mul_(-inv_temp)
    return logp, lse, entropy, dlogp_dhidden


def torch_backward(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    lse: Tensor,
    grad_logp: Tensor,
    temperature: float,
    chunk_size: int | None,
    need_hidden: bool,
    need_weight: bool,
    entropy: Tensor | None = None,
    grad_entropy: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None]:
    """Gradients chunk by chunk, with coef[m] = grad_logp[m] / T and p = softmax(logits / T):

        d hidden[m] = coef[m] * (onehot(targets[m]) - p[m]) @ W        [C, V] x [V, H] per chunk
        d weight    = sum_m coef[m] * (onehot(targets[m]) - p[m])^T hidden[m]

    p is rebuilt from the saved lse: p = exp(logits / T - lse), no max or sum needed.

    With `grad_entropy` [M] (the upstream gradient of the entropy; `entropy` [M] saved by the forward),
    the logits gradient per chunk becomes

        d loss / d z[m] = grad_logp[m] (onehot - p[m]) - grad_entropy[m] p[m] (log p[m] + entropy[m])

    and d hidden = (d loss / d z) @ W / T, d weight = (d loss / d z)^T hidden / T as above.
    """
    num_tokens, vocab = hidden.shape[0], weight.shape[0]
    chunk = min(chunk_size or DEFAULT_CHUNK_SIZE, max(num_tokens, 1))
    acc_dtype, weight_acc = _accumulation_operands(hidden, weight)  # the forward's logits, to the last bit
    inv_temp = 1.0 / temperature
    coef = grad_logp.to(acc_dtype) * inv_temp  # [M]
    with_entropy_grad = grad_entropy is not None
    if with_entropy_grad:
        if entropy is None:
            raise ValueError("torch_backward: grad_entropy needs the entropy saved by the forward")
        grad_logp, grad_entropy = grad_logp.to(acc_dtype), grad_entropy.to(acc_dtype)
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    d_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if need_weight else None
    buffer = torch.empty(chunk, vocab, dtype=acc_dtype, device=hidden.device)  # reused by every chunk
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        hidden_chunk, chunk_targets = hidden[start:end].to(acc_dtype), targets[start:end, None].long()
        shifted = _chunk_logits(hidden_chunk, weight_acc, inv_temp, buffer[: end - start], lse[start:end])
        if not with_entropy_grad:
            probs = shifted.exp_()  # [C, V] softmax, in place
            # p - onehot: only C entries change. The per-token coef is applied to the [C, H] side of the
            # products below rather than to the [C, V] matrix: same result, one pass over [C, V] fewer.
            minus_dz = probs.scatter_add_(1, chunk_targets, probs.new_full((end - start, 1), -1.0))
            row_scale = -coef[start:end, None]  # [C, 1]
        else:
            # Two per-token factors (grad_logp, grad_entropy) do not fold into one [C, H] scale: apply
            # them on [C, V], leaving only the 1/T for the [C, H] side.
            minus_dz = _minus_logit_grad_with_entropy(
                shifted, chunk_targets, grad_logp[start:end], entropy[start:end], grad_entropy[start:end]
            )
            row_scale = -inv_temp
        if need_hidden:  # minus_dz @ W in the input dtype (fp32 accumulation inside the matmul)
            product = minus_dz.to(hidden.dtype) @ weight  # [C, H]
            d_hidden[start:end] = product.to(acc_dtype).mul_(row_scale)
        if need_weight:
            d_weight.addmm_(minus_dz.T, hidden_chunk * row_scale)
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight


def _minus_logit_grad_with_entropy(
    log_probs: Tensor, targets: Tensor, grad_logp: Tensor, entropy: Tensor, grad_entropy: Tensor
) -> Tensor:
    """-(d loss / d z) for one chunk, written over `log_probs` [C, V]; targets [C, 1], the other three [C]:

        p * (grad_logp + grad_entropy * (log p + entropy)) - grad_logp * onehot(targets)

    Example (one token, p = [0.8, 0.2], entropy = -0.8 log 0.8 - 0.2 log 0.2 = 0.5004; target 0,
    grad_logp = 1, grad_entropy = 1): log p + entropy = [0.2773, -1.1091], so
    p * (1 + log p + entropy) - onehot = [0.8 * 1.2773 - 1, 0.2 * -0.1091] = [0.0218, -0.0218]:
        >>> log_p = torch.tensor([[0.8, 0.2]]).log(); one = torch.ones(1)
        >>> _minus_logit_grad_with_entropy(log_p, torch.tensor([[0]]), one, torch.tensor([0.5004]), one)
        tensor([[ 0.0218, -0.0218]])
    """
    probs = log_probs.exp()  # one temporary [C, V]: p and log p are both needed
    # in place over log_probs: ((log p + entropy) * grad_entropy + grad_logp) * p
    minus_dz = log_probs.add_(entropy[:, None]).mul_(grad_entropy[:, None])
    minus_dz = minus_dz.add_(grad_logp[:, None]).mul_(probs)
    return minus_dz.scatter_add_(1, targets, -grad_logp[:, None])
