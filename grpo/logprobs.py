"""Re-export: the fused log-prob kernels live in the leaf package ``kernels`` (logprob_kernels/logprobs.py)."""

from logprob_kernels.logprobs import BACKENDS, token_entropy, token_logprobs  # noqa: F401
