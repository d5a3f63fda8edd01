"""Re-export of the fused log-prob kernels, which live in the leaf package ``logprob_kernels`` (logprobs.py).

Kept because ``grpo.logprobs.token_logprobs`` is the documented public name (README, docs/KERNELS.md) that
users and benchmarks import; the kernels themselves import nothing from ``grpo``.
"""

from logprob_kernels.logprobs import BACKENDS, token_entropy, token_logprobs  # noqa: F401
