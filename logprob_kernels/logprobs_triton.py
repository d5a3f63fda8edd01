"""Triton kernels for `logprob_kernels.logprobs.token_logprobs(..., backend="triton")`.

Forward (`_logprobs_fwd_kernel`): each program owns BLOCK_M tokens and one slice of the vocabulary.
It walks that slice one [BLOCK_M, BLOCK_V] logits tile at a time (tl.dot over BLOCK_K-wide pieces of H,
float32 accumulator), and folds each tile into a running max / running sum of exponentials
(the online log-sum-exp of flash attention), picking up the target logit when its column passes by.
Only three floats per (token, slice) are written; a tiny torch reduction merges the slices. Splitting
the vocabulary gives the GPU enough programs when there are few tokens (M / BLOCK_M is small).

Backward (`_logprobs_bwd_kernel`): for one chunk of C tokens, recompute each logits tile the same way,
turn it into the logits gradient in registers,

    grad_logits[m, v] = grad_logp[m] / T * (onehot(targets[m])[v] - exp(logits[m, v] / T - lse[m])),

(when the entropy is differentiable, minus grad_entropy[m] / T * p[m, v] * (log p[m, v] + entropy[m]),
with the entropy saved by the forward), and store it into a [C, V] buffer in the input dtype. cuBLAS
then does the two big products, d_hidden[chunk] = grad_logits @ W and
d_weight += grad_logits.T @ hidden[chunk] (only when W needs a gradient). Memory: C x V for one
chunk, never M x V. A fully fused backward would have to accumulate d_hidden [BLOCK_M, H] with
H = 2048 across vocabulary tiles, which does not fit in registers, or atomically add into it once per
vocabulary tile (V / BLOCK_V ~ 1,200 times per element), so the two products are left to the matmul
library.

On CPU tensors these kernels run under Triton's interpreter, which Triton only enables when the
environment variable TRITON_INTERPRET=1 is set before `import triton` (see `interpreter_active`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _logprobs_fwd_kernel(
    hidden_ptr,  # [M, H], row stride stride_hm, unit column stride
    weight_ptr,  # [V, H], row stride stride_wv
    targets_ptr,  # [M] int
    part_max_ptr,  # [NUM_SPLITS, M] float32: max of logits / T over the slice
    part_sum_ptr,  # [NUM_SPLITS, M] float32: sum of exp(logits / T - part_max) over the slice
    part_dot_ptr,  # [NUM_SPLITS, M] float32: sum of exp(...) * logits / T (for the entropy)
    target_logit_ptr,  # [M] float32: logits[m, targets[m]] / T, written by the slice holding it
    M,
    V,
    H,
    stride_hm,
    stride_wv,
    inv_temp,
    NUM_SPLITS,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_TILES: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_split = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    offs_k = tl.arange(0, BLOCK_K)
    hidden_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :]

    # This program's vocabulary slice: a whole number of tiles.
    split_len = tl.cdiv(tl.cdiv(V, NUM_SPLITS), BLOCK_V) * BLOCK_V
    v_begin = pid_split * split_len
    v_end = tl.minimum(v_begin + split_len, V)

    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_M,), tl.float32)
    run_dot = tl.zeros((BLOCK_M,), tl.float32)
    target_logit = tl.zeros((BLOCK_M,), tl.float32)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        weight_ptrs = (
            weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_k[:, None]
        )  # [BLOCK_K, BLOCK_V]
        acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
        for k_start in range(0, H, BLOCK_K):
            k_ok = (k_start + offs_k) < H
            h = tl.load(hidden_ptrs + k_start, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(weight_ptrs + k_start, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST_TILES:  # interpreter only: its tl.dot multiplies bf16 as raw uint16 bits
                h, w = h.to(tl.float32), w.to(tl.float32)
            acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
        logits = tl.where(col_ok[None, :], acc * inv_temp, float("-inf"))

        # Online log-sum-exp: rescale what we had by exp(old_max - new_max), add this tile.
        new_max = tl.maximum(run_max, tl.max(logits, axis=1))
        rescale = tl.exp(run_max - new_max)
        probs_unnorm = tl.exp(logits - new_max[:, None])  # 0 on padded columns
        run_sum = run_sum * rescale + tl.sum(probs_unnorm, axis=1)
        if WITH_ENTROPY:
            finite_logits = tl.where(col_ok[None, :], logits, 0.0)
            run_dot = run_dot * rescale + tl.sum(probs_unnorm * finite_logits, axis=1)
        run_max = new_max
        is_target = cols[None, :] == targets[:, None]
        target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)

    out = pid_split * M + rows
    tl.store(part_max_ptr + out, run_max, mask=row_ok)
    tl.store(part_sum_ptr + out, run_sum, mask=row_ok)
    if WITH_ENTROPY:
        tl.store(part_dot_ptr + out, run_dot, mask=row_ok)
    in_slice = row_ok & (targets >= v_begin) & (targets < v_end)
    tl.store(target_logit_ptr + rows, target_logit, mask=in_slice)


@triton.jit
def _logprobs_bwd_kernel(
    hidden_ptr,  # [C, H] (one chunk of tokens)
    weight_ptr,  # [V, H]
    targets_ptr,  # [C]
    lse_ptr,  # [C] float32 log-sum-exp of logits / T, from the forward
    coef_ptr,  # [C] float32 grad_logp / T
    entropy_ptr,  # [C] float32 entropy from the forward (read only with ENTROPY_GRAD)
    coef_entropy_ptr,  # [C] float32 grad_entropy / T (read only with ENTROPY_GRAD)
    grad_logits_ptr,  # [C, V] output, input dtype, row stride stride_gm
    M,
    V,
    H,
    stride_hm,
    stride_wv,
    stride_gm,
    inv_temp,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    ENTROPY_GRAD: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    UPCAST_TILES: tl.constexpr,
):
    # Row blocks vary fastest, so the programs that run together share one weight tile (L2 reuse).
    pid_m = tl.program_id(0)
    pid_v = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < M
    col_ok = cols < V
    offs_k = tl.arange(0, BLOCK_K)
    hidden_ptrs = hidden_ptr + rows.to(tl.int64)[:, None] * stride_hm + offs_k[None, :]
    weight_ptrs = weight_ptr + cols.to(tl.int64)[None, :] * stride_wv + offs_k[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_V), tl.float32)
    for k_start in range(0, H, BLOCK_K):
        k_ok = (k_start + offs_k) < H
        h = tl.load(hidden_ptrs + k_start, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(weight_ptrs + k_start, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST_TILES:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)

    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    coef = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
    targets = tl.load(targets_ptr + rows, mask=row_ok, other=-1)
    log_probs = acc * inv_temp - lse[:, None]
    probs = tl.exp(log_probs)  # softmax rebuilt from the saved lse
    onehot = tl.where(cols[None, :] == targets[:, None], 1.0, 0.0)
    grad_logits = (onehot - probs) * coef[:, None]
    if ENTROPY_GRAD:  # d entropy / d z = -p (log p + entropy)
        entropy = tl.load(entropy_ptr + rows, mask=row_ok, other=0.0)
        coef_entropy = tl.load(coef_entropy_ptr + rows, mask=row_ok, other=0.0)
        grad_logits -= probs * (log_probs + entropy[:, None]) * coef_entropy[:, None]
    out_ptrs = grad_logits_ptr + rows.to(tl.int64)[:, None] * stride_gm + cols[None, :]
    tl.store(
        out_ptrs, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :]
    )


# ----------------------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------------------

# Under the CPU interpreter every tile is a numpy array: small tiles keep the test shapes quick and
# still exercise the masking (M, V, H that are not multiples of the tiles).
_INTERPRETER_BLOCKS = {"BLOCK_M": 16, "BLOCK_V": 64, "BLOCK_K": 32}

# GPU: tensor-core shaped tiles, picked per (H, V, dtype) by Triton's autotuner on the first call.
_GPU_CONFIGS_16BIT = [
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 256, "BLOCK_K": 64}, num_warps=8, num_stages=4),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
]
_GPU_CONFIGS_FP32 = [
    triton.Config({"BLOCK_M": 64, "BLOCK_V": 64, "BLOCK_K": 32}, num_warps=4, num_stages=3),
    triton.Config({"BLOCK_M": 128, "BLOCK_V": 64, "BLOCK_K": 32}, num_warps=8, num_stages=3),
]
DEFAULT_BACKWARD_CHUNK = 512  # tokens whose [chunk, V] logits gradient is materialised at a time
_tuned: dict[tuple[str, bool], object] = {}


def interpreter_active() -> bool:
    """True when Triton was imported with TRITON_INTERPRET=1 (kernels then run in numpy on CPU tensors)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(_logprobs_fwd_kernel, InterpretedFunction)


def _kernel_for(name: str, tensor: Tensor):
    """The plain kernel plus fixed small blocks (interpreter), or the autotuned one (GPU)."""
    kernel = {"fwd": _logprobs_fwd_kernel, "bwd": _logprobs_bwd_kernel}[name]
    if interpreter_active():
        return kernel, dict(_INTERPRETER_BLOCKS)
    if not tensor.is_cuda:
        raise ValueError(
            "the triton backend needs CUDA tensors, or Triton's CPU interpreter: set TRITON_INTERPRET=1 in the "
            "environment before anything imports triton (or use backend='torch' on CPU)"
        )
    fp32 = tensor.dtype == torch.float32
    if (name, fp32) not in _tuned:
        configs = _GPU_CONFIGS_FP32 if fp32 else _GPU_CONFIGS_16BIT
        # M is left out of the key on purpose: it changes every batch and would retune each time.
        _tuned[(name, fp32)] = triton.autotune(configs=configs, key=["H", "V"])(kernel)
    return _tuned[(name, fp32)], {}


def _num_vocab_splits(num_tokens: int, vocab: int, device: torch.device) -> int:
    """Enough (token block, vocabulary slice) programs to fill the GPU a few times over."""
    if device.type != "cuda":
        return min(3, triton.cdiv(vocab, _INTERPRETER_BLOCKS["BLOCK_V"]))  # > 1 so tests cover the merge
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    # M = 0 counts as one block: nothing to spread, and no division by zero
    token_blocks = max(1, triton.cdiv(num_tokens, 128))
    return max(1, min(triton.cdiv(4 * sms, token_blocks), triton.cdiv(vocab, 256)))


def _dot_options(dtype: torch.dtype) -> dict:
    """How ``tl.dot`` multiplies the tiles: DOT_PRECISION and UPCAST_TILES for the kernels.

    - float32 inputs: "ieee", true fp32 products on the CUDA cores (tf32 would cost ~1e-3 relative error in
      the logits). The fp32 mode's path.
    - bf16 / fp16 inputs (bf16 mode): the 16-bit tiles go to the tensor cores' MMA with the float32
      accumulator; Triton reads input_precision only for float32 operands, so Triton's default ("tf32") is
      passed and never "ieee". A bf16 x bf16 product is exact in float32: the logits are what a float32
      matmul of the same bf16 numbers gives, up to summation order.
    - Triton 3.9's CPU interpreter gets a 16-bit tl.dot wrong (it multiplies the raw uint16 bits), so there
      the 16-bit tiles are upcast to float32 first: the same exact products.

    >>> _dot_options(torch.float32)["DOT_PRECISION"], _dot_options(torch.bfloat16)["DOT_PRECISION"]
    ('ieee', 'tf32')
    """
    return {
        "DOT_PRECISION": "ieee" if dtype == torch.float32 else "tf32",
        "UPCAST_TILES": interpreter_active() and dtype != torch.float32,
    }


# ----------------------------------------------------------------------------------------------------
# Host functions (called by logprob_kernels.logprobs)
# ----------------------------------------------------------------------------------------------------


def triton_logprobs_forward(
    hidden: Tensor, weight: Tensor, targets: Tensor, temperature: float, with_entropy: bool
) -> tuple[Tensor, Tensor, Tensor | None]:
    """logp [M], lse [M] and entropy [M] (or None), all float32, from the fused forward kernel."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    num_tokens, hidden_size = hidden.shape
    if num_tokens == 0:  # no token to score (e.g. a micro-batch whose completions are all masked)
        empty = torch.empty(0, dtype=torch.float32, device=hidden.device)
        return empty, empty.clone(), empty.clone() if with_entropy else None
    vocab = weight.shape[0]
    num_splits = _num_vocab_splits(num_tokens, vocab, hidden.device)
    part_max = torch.empty(num_splits, num_tokens, dtype=torch.float32, device=hidden.device)
    part_sum = torch.empty_like(part_max)
    part_dot = torch.empty_like(part_max) if with_entropy else part_max  # unused pointer when no entropy
    target_logit = torch.empty(num_tokens, dtype=torch.float32, device=hidden.device)
    kernel, blocks = _kernel_for("fwd", hidden)

    def grid(meta):
        return (triton.cdiv(num_tokens, meta["BLOCK_M"]), num_splits)

    kernel[grid](
        hidden,
        weight,
        targets,
        part_max,
        part_sum,
        part_dot,
        target_logit,
        num_tokens,
        vocab,
        hidden_size,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        num_splits,
        WITH_ENTROPY=with_entropy,
        **_dot_options(hidden.dtype),
        **blocks,
    )
    # Merge the vocabulary slices: lse = max + log(sum_s part_sum_s * exp(part_max_s - max)).
    row_max = part_max.amax(dim=0)  # [M]
    slice_weight = torch.exp(part_max - row_max)  # [S, M]; empty slices have part_max = -inf -> 0
    sum_exp = (part_sum * slice_weight).sum(dim=0)
    lse = row_max + torch.log(sum_exp)
    logp = target_logit - lse
    entropy = None
    if with_entropy:
        mean_logit = (part_dot * slice_weight).sum(dim=0) / sum_exp  # E_p[logits / T]
        entropy = lse - mean_logit
    return logp, lse, entropy


def triton_logprobs_backward(
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
    """d_hidden [M, H] (hidden's dtype) and d_weight [V, H] (weight's dtype), each None when not needed.

    With `grad_entropy` [M] (and the forward's `entropy` [M]) the entropy's term joins the logits gradient.
    """
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.contiguous()
    num_tokens, hidden_size = hidden.shape
    if num_tokens == 0:  # nothing flows back: an empty d_hidden, a zero d_weight
        d_weight = torch.zeros_like(weight) if need_weight else None
        return (torch.empty_like(hidden) if need_hidden else None), d_weight
    vocab = weight.shape[0]
    chunk = min(chunk_size or DEFAULT_BACKWARD_CHUNK, num_tokens)
    coef = grad_logp.float() / temperature  # [M]
    entropy_grad = grad_entropy is not None
    if entropy_grad and entropy is None:
        raise ValueError("triton_logprobs_backward: grad_entropy needs the entropy saved by the forward")
    # Without the entropy term the two pointers are never read: any float32 [M] stands in for them.
    entropy = entropy.float().contiguous() if entropy_grad else coef
    coef_entropy = grad_entropy.float() / temperature if entropy_grad else coef
    d_hidden = torch.empty_like(hidden) if need_hidden else None
    # d_weight sums over every token: keep that running sum in float32 whatever the input dtype.
    d_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
    grad_logits_buffer = torch.empty(chunk, vocab, dtype=hidden.dtype, device=hidden.device)
    kernel, blocks = _kernel_for("bwd", hidden)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        grad_logits = grad_logits_buffer[: end - start]  # [C, V]

        def grid(meta, n=end - start):
            return (triton.cdiv(n, meta["BLOCK_M"]), triton.cdiv(vocab, meta["BLOCK_V"]))

        kernel[grid](
            hidden[start:end],
            weight,
            targets[start:end],
            lse[start:end],
            coef[start:end],
            entropy[start:end],
            coef_entropy[start:end],
            grad_logits,
            end - start,
            vocab,
            hidden_size,
            hidden.stride(0),
            weight.stride(0),
            grad_logits.stride(0),
            1.0 / temperature,
            ENTROPY_GRAD=entropy_grad,
            **_dot_options(hidden.dtype),
            **blocks,
        )
        if need_hidden:
            torch.mm(grad_logits, weight, out=d_hidden[start:end])
        if need_weight and hidden.dtype == torch.float32:
            d_weight.addmm_(grad_logits.T, hidden[start:end])
        elif need_weight:  # 16-bit matmul (fp32 accumulation inside), summed over chunks in fp32
            d_weight += torch.mm(grad_logits.T, hidden[start:end]).float()
    if d_weight is not None:
        d_weight = d_weight.to(weight.dtype)
    return d_hidden, d_weight
