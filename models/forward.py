"""Log-probabilities of completion tokens from hidden states, never computing the full logits.

A causal LM's forward ends with ``logits = lm_head(hidden)``: [N, L, V] numbers, 151,936 per position
for Qwen2.5. GRPO needs one of them per completion token (the sampled one, after log-softmax). So we
stop the model one step early: the decoder body gives the final hidden states [N, L, H], we keep only
the positions that predict a completion token, and ``logprob_kernels.logprobs.token_logprobs`` turns
(hidden [M, H], lm_head weight [V, H], targets [M]) into log-probs [M] without holding [M, V].

Row layout (one row per completion, N rows)::

    [ pad pad p0 p1 p2 | c0 c1 c2 pad ]      input_ids      [N, L], L = P + T
    [  0   0  1  1  1  |  1  1  1  0  ]      attention_mask [N, L]
                       [  1  1  1  0  ]      completion_mask [N, T]

The prompt is left-padded (as it was for generation), the completion right-padded. The hidden state at
position t predicts the token at t + 1, so completion token c_j (position P + j) is scored by the hidden
state at P + j - 1: the last prompt token scores c0.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch
from torch import Tensor

from logprob_kernels.logprobs import BACKENDS, token_logprobs

AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LogprobOptions:
    """How log-probs are computed, the same for every function of this module and ``models.packing``.

    temperature: the sampling temperature; the logits are divided by it, so these are the probabilities the
        sampler drew from.
    backend: the ``token_logprobs`` kernel: "auto" (triton on CUDA, torch elsewhere), "torch", "triton", "naive".
    share_prompt: ``batch_logprobs`` runs each prompt once per group (``models.packing.shared_prompt_logprobs``)
        instead of once per row (``completion_logprobs``): the same numbers either way. The functions that
        are one of the two ignore it.
    compute_dtype: the dtype the decoder forward runs in under ``torch.autocast`` (torch.bfloat16 in bf16
        mode, ``models.policy.autocast_dtype``); None = no autocast, every op in its weights' dtype (fp32 mode).
        The log-prob kernel always runs outside autocast and returns float32.
    entropy_grad: the returned entropy carries a gradient (an entropy bonus in the loss); else it is detached.

    The trainer builds one from its config (``grpo.trainer.logprob_options``):
        >>> LogprobOptions(temperature=0.9, backend="torch", compute_dtype=torch.bfloat16)
        LogprobOptions(temperature=0.9, backend='torch', share_prompt=True, compute_dtype=torch.bfloat16, entropy_grad=False)
    """

    temperature: float = 1.0
    backend: str = "auto"
    share_prompt: bool = True
    compute_dtype: torch.dtype | None = None
    entropy_grad: bool = False

    def __post_init__(self) -> None:
        if not float(self.temperature) > 0.0:
            raise ValueError(f"LogprobOptions.temperature={self.temperature}: must be > 0")
        if self.backend not in BACKENDS:
            raise ValueError(f"LogprobOptions.backend={self.backend!r}: must be one of {', '.join(BACKENDS)}")
        if self.compute_dtype is not None and self.compute_dtype not in AUTOCAST_DTYPES:
            raise ValueError(
                f"LogprobOptions.compute_dtype={self.compute_dtype}: must be torch.bfloat16, torch.float16 or "
                "None (None = no autocast: float32 weights compute in float32)"
            )


def decoder_autocast(device: torch.device | str, compute_dtype: torch.dtype | None) -> AbstractContextManager:
    """``torch.autocast(device.type, dtype=compute_dtype)`` for the decoder forward; a no-op for None.

    Under it every matmul of the decoder (the 4-bit projections, their LoRA A and B, attention) takes
    16-bit inputs and accumulates in float32 inside; the LoRA master weights stay float32 (autocast casts
    a copy per op, and the gradient flows back to the float32 parameter in float32).
    """
    if compute_dtype is None:
        return nullcontext()
    return torch.autocast(torch.device(device).type, dtype=compute_dtype)


def causal_lm(model):
    """The ``*ForCausalLM`` inside a PeftModel (or the model itself, when it has no adapter)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def decoder_body(model):
    """The transformer without its lm_head (``Qwen2Model`` inside ``Qwen2ForCausalLM``).

    LoRA layers are injected into its modules, so calling it still applies the adapter (and
    ``disable_adapter`` still switches it off).
    """
    inner = causal_lm(model)
    return getattr(inner, inner.base_model_prefix)


def lm_head_weight(model) -> Tensor:
    """The output projection weight [V, H] (tied to the input embedding in Qwen2.5-3B)."""
    head = causal_lm(model).get_output_embeddings()
    weight = head.weight
    if getattr(head, "bias", None) is not None:
        raise ValueError("lm_head has a bias; the hidden-state log-prob path assumes logits = hidden @ W.T")
    if weight.dim() != 2 or weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"lm_head weight must be an unquantised [V, H] matrix, got {weight.dtype} {tuple(weight.shape)}"
        )
    return weight


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding: the first real token is at 0, as ``generate`` numbers them.

    >>> position_ids_from_mask(torch.tensor([[0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]]))
    tensor([[0, 0, 0, 1, 2, 2],
            [0, 1, 2, 3, 4, 5]])

    (Pad positions get a harmless value: they are masked out of attention and out of the loss.)
    """
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def completion_hidden_states(
    model, input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Final hidden states at the positions that predict a real completion token.

    Args:
        input_ids: [N, L] = [left-padded prompt | right-padded completion].
        attention_mask: [N, L], 1 on real tokens.
        completion_mask: [N, T], 1 on real completion tokens (T < L).

    Returns:
        hidden: [M, H] with M = completion_mask.sum(), in row-major order of completion_mask;
        targets: [M] the completion tokens those states predict.
    """
    check_row_layout(input_ids, attention_mask, completion_mask)
    num_completion = completion_mask.shape[1]
    out = decoder_body(model)(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids_from_mask(attention_mask),
        use_cache=False,
    )
    # position t - 1 predicts token t: the states at [L - T - 1, L - 1) score the last T tokens
    hidden = out.last_hidden_state[:, -num_completion - 1 : -1]  # [N, T, H]
    keep = completion_mask.bool()
    return hidden[keep], input_ids[:, -num_completion:][keep]


def completion_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    options: LogprobOptions = LogprobOptions(),
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """log pi(c_t | prompt, c_<t) for every completion token, with the logits divided by the temperature.

    Args:
        model: the policy (a PeftModel; inside ``reference_model(model)`` this is the reference),
            or a plain ``*ForCausalLM``.
        input_ids: [N, L] LongTensor, each row [left-padded prompt | right-padded completion];
            the completion occupies the last T positions.
        attention_mask: [N, L], 1 on real prompt and completion tokens.
        completion_mask: [N, T], 1.0 on real completion tokens (from lengths: pad may equal EOS).
        options: temperature (the sampler's, so these are the probabilities it used), kernel backend,
            autocast dtype of the decoder forward, entropy_grad (``LogprobOptions``; share_prompt is not read).
        return_entropy: also return the per-token entropy [N, T] (0 where masked; detached unless
            ``options.entropy_grad``, for an entropy bonus in the loss).

    Returns:
        logp: [N, T] float32, 0.0 where completion_mask is 0; differentiable w.r.t. the LoRA weights.

    Example: a prompt [5, 6] (left-padded to 3) and completion [7, 8] give row
    input_ids [pad, 5, 6, 7, 8], completion_mask [1, 1]: logp[0, 0] scores 7 from the state at 6,
    logp[0, 1] scores 8 from the state at 7.
    """
    with decoder_autocast(input_ids.device, options.compute_dtype):
        hidden, targets = completion_hidden_states(model, input_ids, attention_mask, completion_mask)
    return logprobs_from_states(model, hidden, targets, completion_mask, options, return_entropy)


def logprobs_from_states(
    model,
    hidden: Tensor,
    targets: Tensor,
    completion_mask: Tensor,
    options: LogprobOptions = LogprobOptions(),
    return_entropy: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
    """The fused log-probs (and entropies) of the tokens ``targets`` [M] predicted by ``hidden`` [M, H], put back
    at the places of ``completion_mask`` [N, T] (row-major, M = completion_mask.sum()); 0 elsewhere.

    The kernel gets the states in the lm_head weight's dtype (bf16 in bf16 mode, where the decoder's last norm
    already gives bf16) and returns float32; it runs outside autocast (its matmuls choose their own precision).
    """
    weight = lm_head_weight(model)
    result = token_logprobs(
        hidden.to(weight.dtype),
        weight,
        targets,
        options.temperature,
        options.backend,
        return_entropy=return_entropy,
        entropy_grad=options.entropy_grad and return_entropy,
    )
    keep = completion_mask.bool()
    if return_entropy:
        logp, entropy = result
        return _scatter(logp, keep), _scatter(entropy, keep)
    return _scatter(result, keep)


def _scatter(values: Tensor, keep: Tensor) -> Tensor:
    """Put the [M] values back at the True places of `keep` [N, T]; zeros elsewhere (differentiable)."""
    return torch.zeros(keep.shape, dtype=values.dtype, device=values.device).masked_scatter(keep, values)


def check_row_layout(input_ids: Tensor, attention_mask: Tensor, completion_mask: Tensor) -> None:
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [N, L], got shape {tuple(input_ids.shape)}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} must have the shape of input_ids {tuple(input_ids.shape)}"
        )
    n, length = input_ids.shape
    if (
        completion_mask.dim() != 2
        or completion_mask.shape[0] != n
        or not 0 < completion_mask.shape[1] < length
    ):
        raise ValueError(
            f"completion_mask must be [N={n}, T] with 0 < T < L={length} (a prompt token must precede the "
            f"completion), got shape {tuple(completion_mask.shape)}"
        )
    tail = attention_mask[:, -completion_mask.shape[1] :].bool()
    if (completion_mask.bool() & ~tail).any():
        raise ValueError(
            "completion_mask is 1 where attention_mask is 0: completion tokens must be attended to"
        )


# ---------------------------------------------------------------------------- a batch, micro-batch by micro-batch


def micro_batches(n: int, size: int) -> list[slice]:
    """Slices of the N completions, ``size`` at a time (the last may be shorter). Example: 5, 2 -> 0:2, 2:4, 4:5."""
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def batch_logprobs(
    model,
    input_ids: Tensor,
    attention_mask: Tensor,
    completion_mask: Tensor,
    options: LogprobOptions = LogprobOptions(),
) -> tuple[Tensor, Tensor]:
    """log-probs and entropies [n, T] of a (micro-)batch of rows (layout above) under the model as it is now.

    options.share_prompt: each prompt runs once per group (``models.packing.shared_prompt_logprobs``), else once
    per row (``completion_logprobs``): the same numbers either way. options.entropy_grad: the entropy carries a
    gradient (for an entropy bonus in the loss).
    """
    from models.packing import shared_prompt_logprobs  # packing builds on this module

    logprobs = shared_prompt_logprobs if options.share_prompt else completion_logprobs
    return logprobs(model, input_ids, attention_mask, completion_mask, options, return_entropy=True)
