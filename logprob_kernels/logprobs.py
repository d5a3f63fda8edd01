"""Per-token log-probabilities of the sampled tokens, without ever holding the [M, V] logits.

GRPO needs, for every completion token, `log pi(token | prefix)`: the log-softmax of the lm_head
logits, picked at the sampled token. The plain way,

    logits = hidden @ weight.T                      # [M, V]
    logp = log_softmax(logits / T).gather(-1, targets[:, None])

materialises M x V numbers (and their gradient). At the recipe's shape (6 completions x 2,048 tokens,
vocabulary 151,936) that is 3.7 GB of bf16 logits, 7.5 GB once cast to float32 for the softmax.

Every backend here computes the same thing,

    logp[m] = logits[m, targets[m]] / T - logsumexp_v(logits[m, v] / T),

but only the "naive" reference builds the full matrix. The others walk the tokens (torch) or the
vocabulary tiles (triton), keep one number per token, the log-sum-exp, and recompute a chunk of logits
in the backward, where

    d logp[m] / d hidden[m] = (onehot(targets[m]) - softmax(logits[m] / T)) @ weight / T.

(With a frozen weight, the recipe's tied lm_head, the torch backend computes that [M, H] gradient in
the forward instead, while each chunk's softmax is in memory: one matmul per chunk fewer.)

The per-token entropy H[m] = logsumexp(z[m]) - sum_v p[m, v] z[m, v] (z = logits / T) comes out of the same
pass. It is detached unless `entropy_grad=True` (an entropy bonus in the loss); then the backward adds

    d H[m] / d z[m, v] = -p[m, v] (log p[m, v] + H[m])

to the logits gradient, with the same recomputed p.

16-bit inputs (bf16 mode: the decoder's bf16 states and the bf16 lm_head): every backend forms float32 logits
from them, a float32 accumulator over exact bf16 x bf16 products, and never rounds the logits to 16 bits (bf16
keeps 8 significant bits: a logit near 20 would be a multiple of 0.125, its token's log-prob off by up to
0.0625, and a tiny change of the weights could flip the rounding between two passes). The softmax, the
log-probs and the entropy are float32; the gradients come back in the inputs' dtype. triton multiplies the bf16
tiles on tensor cores into its float32 accumulator; torch and naive multiply float32 copies (the torch backend
makes one float32 copy of the weight per call, V x H x 4 bytes, for the chunks to share). They run outside any
autocast region (``torch.autocast`` would turn those float32 matmuls back into 16-bit ones).

Backends: "naive" (the reference, first in this file: the definition every backend must equal),
"torch" (chunked, logprob_kernels/logprobs_torch.py, any device), "triton" (fused
kernels in logprob_kernels/logprobs_triton.py, CUDA, or CPU under TRITON_INTERPRET=1), "auto" (triton on
CUDA, torch elsewhere). docs/KERNELS.md explains the memory math and the kernels.
"""

from __future__ import annotations

import torch
from torch import Tensor

from logprob_kernels.logprobs_torch import torch_backward, torch_forward

BACKENDS = ("auto", "torch", "triton", "naive")

# ----------------------------------------------------------------------------------------------------
# The definition: "naive" holds the [M, V] logits, their float32 copy and gradient. Every other backend
# must return what this returns (tests/test_logprobs.py checks them against it).
# ----------------------------------------------------------------------------------------------------


def _naive(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float,
    return_entropy: bool,
    entropy_grad: bool = False,
):
    # float32 logits from the (possibly bf16) inputs: a product of two bf16 numbers is exact in float32, so
    # this is what a float32 accumulator gives, without rounding the logits to 16 bits (the triton kernel's
    # numbers; see "16-bit inputs" in the module docstring)
    acc_dtype = _accumulation_dtype(hidden.dtype)
    logits = (hidden.to(acc_dtype) @ weight.to(acc_dtype).T) / temperature  # [M, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets[:, None].long()).squeeze(-1).float()
    if not return_entropy:
        return logp
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):  # plain autograd when asked
        entropy = -(log_probs.exp() * log_probs).sum(-1).float()
    return logp, entropy


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for 16-bit and float32 inputs; float64 stays float64 (tests use it as a reference)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
    return_entropy: bool = False,
    entropy_grad: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """Log-probability of each target token under `softmax(hidden @ weight.T / temperature)`.

    Args:
        hidden: [M, H] final hidden states (one row per token), bf16/fp16/fp32 (M may be 0).
        weight: [V, H] lm_head weight, same dtype and device as `hidden`. 16-bit inputs are multiplied
            into float32 logits, never rounded to 16 bits (module docstring, "16-bit inputs").
        targets: [M] integer token ids in [0, V).
        temperature: the sampling temperature (> 0); logits are divided by it.
        backend: "auto" | "torch" | "triton" | "naive".
        chunk_size: tokens per chunk. torch backend: forward and backward (default 128);
            triton backend: backward only (the [chunk, V] softmax gradient lives there; default 512).
        return_entropy: also return the per-token entropy of the same distribution.
        entropy_grad: make that entropy differentiable too (needs `return_entropy=True`); set it when the
            entropy enters the loss (an entropy bonus), since the forward cannot know. Off: the entropy is
            detached and every backend runs exactly as without it. On, with a frozen weight, the torch
            backend recomputes the softmax in the backward instead of computing the gradient in the
            forward (the same three matmuls per chunk, and [M] saved instead of two [M, H]).

    Returns:
        logp: [M] float32 (float64 from the torch backend for float64 inputs), differentiable with respect
        to `hidden` and to `weight` when it requires grad.
        With `return_entropy=True`, `(logp, entropy)` with entropy [M] float32, detached unless
        `entropy_grad=True`, where d entropy[m] / d z[m, v] = -p[m, v] (log p[m, v] + entropy[m]).

    Example (V = 3, one token, weight = identity so the logits are the hidden state itself):
        >>> h = torch.tensor([[0.0, 0.0, 1.0]]); w = torch.eye(3); t = torch.tensor([2])
        >>> token_logprobs(h, w, t, backend="torch")  # log(e / (1 + 1 + e)) = 1 - log(2 + e)
        tensor([-0.5514])

    Example, entropy gradient (same logits [0, 0, 1]: p = [0.2119, 0.2119, 0.5761],
    entropy = -sum p log p = 0.9753, d entropy / d z = -p (log p + entropy) = [0.1221, 0.1221, -0.2442]):
        >>> h = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
        >>> _, entropy = token_logprobs(h, w, t, backend="torch", return_entropy=True, entropy_grad=True)
        >>> entropy.sum().backward(); h.grad
        tensor([[ 0.1221,  0.1221, -0.2442]])
    """
    with torch.autocast(hidden.device.type, enabled=False):  # each backend picks its own precision
        return _token_logprobs(
            hidden, weight, targets, temperature, backend, chunk_size, return_entropy, entropy_grad
        )


def _token_logprobs(hidden, weight, targets, temperature, backend, chunk_size, return_entropy, entropy_grad):
    backend = _resolve_backend(backend, hidden)
    _check_inputs(hidden, weight, targets, temperature, backend)
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if entropy_grad and not return_entropy:
        raise ValueError(
            "entropy_grad=True needs return_entropy=True (it makes the returned entropy differentiable)"
        )

    if backend == "naive":
        return _naive(hidden, weight, targets, temperature, return_entropy, entropy_grad)

    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if not needs_grad:
        # No autograd graph needed (old / reference log-probs): a plain streaming forward, nothing saved.
        logp, _lse, entropy = _forward(
            backend, hidden, weight, targets, temperature, chunk_size, return_entropy
        )
        return (logp, entropy) if return_entropy else logp

    logp, entropy = _StreamingLogprobs.apply(
        hidden, weight, targets, float(temperature), backend, chunk_size, return_entropy, entropy_grad
    )
    return (logp, entropy) if return_entropy else logp


@torch.no_grad()
def token_entropy(
    hidden: Tensor,
    weight: Tensor,
    temperature: float = 1.0,
    backend: str = "auto",
    *,
    chunk_size: int | None = None,
) -> Tensor:
    """Entropy of `softmax(hidden @ weight.T / temperature)` for each row, streamed; no gradient.

    `entropy[m] = logsumexp(z[m]) - sum_v softmax(z[m])_v * z[m, v]` with `z = hidden @ weight.T / T`.

    Args:
        hidden: [M, H]; weight: [V, H]; temperature > 0; backend as in `token_logprobs`.

    Returns:
        entropy: [M] float32.

    Example (two equal logits and one much smaller: close to log 2 = 0.6931):
        >>> h = torch.tensor([[1.0, 1.0, -30.0]]); w = torch.eye(3)
        >>> token_entropy(h, w, backend="torch")
        tensor([0.6931])
    """
    targets = (
        torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device) if hidden.dim() == 2 else None
    )
    _logp, entropy = token_logprobs(
        hidden, weight, targets, temperature, backend, chunk_size=chunk_size, return_entropy=True
    )
    return entropy


# ----------------------------------------------------------------------------------------------------
# Input checks (bad input gets a message naming the problem, not a CUDA/Triton traceback)
# ----------------------------------------------------------------------------------------------------


def _resolve_backend(backend: str, hidden: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    if backend == "auto":
        return "triton" if hidden.is_cuda and _triton_importable() else "torch"
    return backend


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_inputs(
    hidden: Tensor, weight: Tensor, targets: Tensor | None, temperature: float, backend: str
) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() != 2:
        raise ValueError(
            f"hidden must be a 2-D tensor [M, H], got shape {tuple(getattr(hidden, 'shape', ()))}"
        )
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        raise ValueError(
            f"weight must be a 2-D tensor [V, H], got shape {tuple(getattr(weight, 'shape', ()))}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden [M, H] = {tuple(hidden.shape)} and weight [V, H] = {tuple(weight.shape)} disagree on H"
        )
    if not isinstance(targets, Tensor) or targets.shape != (hidden.shape[0],):
        raise ValueError(
            f"targets must be a 1-D tensor of length M = {hidden.shape[0]}, got shape "
            f"{tuple(getattr(targets, 'shape', ()))}"
        )
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must hold integer token ids, got dtype {targets.dtype}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must have the same dtype")
    allowed = (torch.float16, torch.bfloat16, torch.float32)
    if backend != "triton":
        allowed = allowed + (torch.float64,)
    if hidden.dtype not in allowed:
        raise ValueError(f"backend {backend!r} supports dtypes {allowed}, got {hidden.dtype}")
    if not (hidden.device == weight.device == targets.device):
        raise ValueError(
            f"hidden, weight and targets must be on one device, got {hidden.device}, {weight.device}, {targets.device}"
        )
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if targets.numel() > 0:
        lo, hi = int(targets.min()), int(targets.max())  # one sync; an id out of range would read garbage
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(
                f"targets must be token ids in [0, V = {weight.shape[0]}), got values in [{lo}, {hi}] "
                "(mask padding positions instead of using a negative ignore index)"
            )


# ----------------------------------------------------------------------------------------------------
# Dispatch to the streaming backends (triton is imported lazily: it is optional and reads
# TRITON_INTERPRET on import)
# ----------------------------------------------------------------------------------------------------


def _forward(backend, hidden, weight, targets, temperature, chunk_size, with_entropy):
    """(logp, lse, entropy or None) from the torch or triton backend."""
    if backend == "torch":
        return torch_forward(hidden, weight, targets, temperature, chunk_size, with_entropy)[:3]
    from logprob_kernels.logprobs_triton import triton_logprobs_forward

    return triton_logprobs_forward(hidden, weight, targets, temperature, with_entropy)


def _backward(
    backend,
    hidden,
    weight,
    targets,
    lse,
    grad_logp,
    temperature,
    chunk_size,
    need_hidden,
    need_weight,
    entropy=None,
    grad_entropy=None,
):
    """(d_hidden, d_weight) from the torch or triton backend (None where not needed).

    `grad_entropy` (with the saved `entropy`) adds the entropy's term to the logits gradient; None: logp only.
    """
    args = (hidden, weight, targets, lse, grad_logp, temperature, chunk_size, need_hidden, need_weight)
    if backend == "torch":
        return torch_backward(*args, entropy=entropy, grad_entropy=grad_entropy)
    from logprob_kernels.logprobs_triton import triton_logprobs_backward

    return triton_logprobs_backward(*args, entropy=entropy, grad_entropy=grad_entropy)


class _StreamingLogprobs(torch.autograd.Function):
    """Autograd wrapper of the torch and triton backends. Two ways to get the gradient:

    - recompute (triton always; torch when the weight is trained or the entropy needs a gradient): save
      lse [M] (and the entropy [M] when it is differentiable) besides the inputs, and in the backward
      rebuild each chunk's softmax from it (logprob_kernels/logprobs_torch.py docstring formula).
    - gradient in the forward (torch with a frozen weight, the recipe's tied lm_head): logp[m] depends
      on hidden[m] only, so d loss / d hidden[m] = grad_logp[m] * dlogp_dhidden[m]. The forward computes
      dlogp_dhidden [M, H] while each chunk's softmax is in memory and the backward just scales it:
      two matmuls over [C, V] per chunk instead of three (the same trick as Liger's fused linear
      cross-entropy). Only useful because a forward with grad enabled is always followed by a backward.
      With `entropy_grad` it would need a second [M, H] (d entropy / d hidden) and a second matmul per
      chunk in the forward: three matmuls, as many as recomputing, and more memory, so that case recomputes.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, backend, chunk_size, with_entropy, entropy_grad):
        if entropy_grad:
            # An output that did not reach the loss then gets None in backward, not a zeros tensor: a
            # loss without the entropy skips its term (without entropy_grad the entropy never gets one).
            ctx.set_materialize_grads(False)
        frozen_weight = ctx.needs_input_grad[0] and not ctx.needs_input_grad[1]
        ctx.grad_in_forward = backend == "torch" and frozen_weight and not entropy_grad
        if ctx.grad_in_forward:
            logp, _lse, entropy, dlogp_dhidden = torch_forward(
                hidden, weight, targets, temperature, chunk_size, with_entropy, hidden_grad=True
            )
            ctx.save_for_backward(dlogp_dhidden)
        else:
            logp, lse, entropy = _forward(
                backend, hidden, weight, targets, temperature, chunk_size, with_entropy
            )
            saved_entropy = (entropy,) if entropy_grad else ()
            ctx.save_for_backward(hidden, weight, targets, lse, *saved_entropy)
        ctx.temperature, ctx.backend, ctx.chunk_size = temperature, backend, chunk_size
        ctx.hidden_dtype = hidden.dtype
        if entropy is None:
            entropy = torch.empty(0, device=hidden.device)
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        if ctx.grad_in_forward:  # the entropy is non-differentiable here, so grad_logp is a tensor
            (dlogp_dhidden,) = ctx.saved_tensors
            d_hidden = (dlogp_dhidden * grad_logp[:, None].to(dlogp_dhidden.dtype)).to(ctx.hidden_dtype)
            return d_hidden, None, None, None, None, None, None, None
        hidden, weight, targets, lse, *saved_entropy = ctx.saved_tensors
        entropy = saved_entropy[0] if saved_entropy else None
        if grad_logp is None:  # entropy_grad, and only the entropy reached the loss
            grad_logp = torch.zeros_like(lse)
        d_hidden, d_weight = _backward(
            ctx.backend,
            hidden,
            weight,
            targets,
            lse,
            grad_logp.contiguous(),
            ctx.temperature,
            ctx.chunk_size,
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[1],  # a frozen (tied) lm_head: the d_weight matmuls are skipped
            entropy=entropy,
            grad_entropy=None if grad_entropy is None or entropy is None else grad_entropy.contiguous(),
        )
        return d_hidden, d_weight, None, None, None, None, None, None
