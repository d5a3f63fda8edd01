"""How weights are loaded, adapted and served.

- ``models.policy``: ``load_policy`` (4-bit NF4 + LoRA), ``reference_model`` (the adapter switched off),
  ``save_adapter`` / ``load_adapter``, ``resolve_model_path``, ``lora_param_count``.
- ``models.forward``: ``completion_logprobs`` (hidden states -> fused log-probs, no full logits), configured by
  ``LogprobOptions`` (temperature, kernel, shared prompts, autocast dtype).
- ``models.tiny``: ``TINY_MODEL``, the tiny offline Qwen2 of the tests and the embedded default.
"""

from models.forward import LogprobOptions, completion_logprobs, lm_head_weight
from models.policy import (
    ModelLoadError,
    load_adapter,
    load_base_model,
    load_policy,
    lora_param_count,
    reference_model,
    resolve_dtype,
    resolve_model_path,
    save_adapter,
)
from models.tiny import TINY_INSTRUCT_MODEL, TINY_MODEL, build_tiny_model

__all__ = [
    "LogprobOptions",
    "TINY_INSTRUCT_MODEL",
    "TINY_MODEL",
    "ModelLoadError",
    "build_tiny_model",
    "completion_logprobs",
    "lm_head_weight",
    "load_adapter",
    "load_base_model",
    "load_policy",
    "lora_param_count",
    "reference_model",
    "resolve_dtype",
    "resolve_model_path",
    "save_adapter",
]
