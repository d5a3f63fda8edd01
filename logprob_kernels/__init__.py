"""Fused per-token log-probabilities: pure math on (hidden, weight, targets), no model, no GRPO.

The leaf of the import graph (scripts -> grpo -> models -> kernels): ``logprob_kernels.logprobs.token_logprobs`` is
what ``models/forward.py`` calls with the final hidden states and the lm_head weight.

- ``logprobs.py``: the public ``token_logprobs`` / ``token_entropy``, the naive reference, dispatch, autograd.
- ``logprobs_torch.py``: the chunked PyTorch backend (any device).
- ``logprobs_triton.py``: the fused Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1).
"""

from logprob_kernels.logprobs import BACKENDS, token_entropy, token_logprobs

__all__ = ["BACKENDS", "token_entropy", "token_logprobs"]
