"""Re-export: the fused log-prob kernels live in the leaf package ``kernels`` (kernels/logprobs.py)."""

from kernels.logprobs import BACKENDS, token_entropy, token_logprobs  # noqa: F401
