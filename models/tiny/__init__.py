"""The offline model factory: tiny Qwen2 models built from this repository, and Qwen2.5-3B's shape with
random weights. Used by the tests, the embedded default and the benchmarks; never by the real recipe.

- ``build.py``: ``TINY_MODEL`` ("tiny-random-qwen2") and ``TINY_INSTRUCT_MODEL`` ("tiny-qwen2-instruct"),
  built deterministically and cached (``resolve_tiny_model``); ``models.policy.resolve_model_path`` knows
  both names.
- ``warm_start.py``: the short supervised warm start that turns the random tiny model into the instruct one,
  on formatted examples of the bundled data fixtures.
- ``random_qwen.py``: ``write_random_qwen``, Qwen2.5-3B's architecture with random weights (benchmarks).
"""

from models.tiny.build import (
    CORPUS_PATH,
    TINY_CONFIG,
    TINY_INSTRUCT_MODEL,
    TINY_MODEL,
    TINY_MODELS,
    build_tiny_model,
    resolve_tiny_model,
    train_tiny_tokenizer,
)

__all__ = [
    "CORPUS_PATH",
    "TINY_CONFIG",
    "TINY_INSTRUCT_MODEL",
    "TINY_MODEL",
    "TINY_MODELS",
    "build_tiny_model",
    "resolve_tiny_model",
    "train_tiny_tokenizer",
]
