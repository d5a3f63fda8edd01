"""The trainer's own base weights as an HF model folder, so that vLLM samples from the model being trained.

The trainer holds the base in 4-bit NF4 (bitsandbytes); vLLM 0.32 cannot load bitsandbytes. Started on the
original 16-bit folder, vLLM would sample from a slightly different model (the quantisation error: 0.042 mean
|d log p| per token on the tiny model, docs/SAMPLING.md). Instead we hand it the base the trainer really
computes with:

1. every ``Linear4bit`` weight is dequantised with ``bitsandbytes.functional.dequantize_4bit`` and its
   ``quant_state`` (NF4 code of each weight x its block's absmax): the exact numbers the trainer's 4-bit
   matmul multiplies by (on CPU bitsandbytes dequantises to the compute dtype and calls ``F.linear``);
2. the LoRA adapter is left out, never merged: each LoRA layer's ``base_layer`` is read and ``lora_*``
   tensors are skipped (vLLM gets the adapter separately, each step, through a ``LoRARequest``);
3. the non-quantised tensors (embedding, norms, biases; ``prepare_model_for_kbit_training`` upcast them to
   float32) are written as they are, cast to ``dtype``;
4. tied embeddings stay tied: the lm_head is not written when it is the input embedding (Qwen2.5-3B, the tiny
   model), as in the original checkpoint;
5. ``config.json`` is the original's without ``quantization_config`` and with ``dtype``; tokenizer, chat
   template and generation config files are copied from the original folder.

Size: 2 bytes per parameter in bf16 (Qwen2.5-3B: 3.09 B parameters, about 6.2 GB), 4 in fp32 (tiny: 0.3 MB).
``export_folder`` puts it in RAM (/dev/shm) when that has room, else in the temp folder.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from models.forward import causal_lm
from models.shm import SharedMemoryError, new_folder

# Files of a model folder that hold weights (never copied: the export writes its own).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack", ".onnx")
# Names of the bitsandbytes quantisation state inside a pre-quantised checkpoint (e.g. "...weight.absmax").
QUANT_STATE_PARTS = frozenset({"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state"})


class ExportError(ValueError):
    """The base cannot be exported (unsupported layer, a folder that is not empty, ...); says which."""


# ------------------------------------------------------------------------------------ the weights


def is_4bit(param: torch.Tensor) -> bool:
    """Whether ``param`` is a bitsandbytes 4-bit weight (a ``Params4bit`` carrying its ``quant_state``)."""
    return getattr(param, "quant_state", None) is not None


def has_4bit_weights(model: Any) -> bool:
    """Whether the model's base holds any 4-bit weight (``load_in_4bit: true``)."""
    return any(is_4bit(p) for p in causal_lm(model).parameters())


def dequantize_weight(param: torch.Tensor) -> torch.Tensor:
    """The [out, in] weight a 4-bit ``Params4bit`` stands for, in ``quant_state.dtype`` (bitsandbytes, exact).

    NF4 keeps for each weight a 4-bit index into a 16-value code and for each block of 64 weights its absmax
    (itself 8-bit with double quantisation); the weight is ``code[index] * absmax[block]``.
    """
    import bitsandbytes.functional as bnb_functional

    state = param.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # models.policy.load_base_model switches this repacking off; a model loaded elsewhere may have it on.
        raise ExportError(
            "a 4-bit weight is in bitsandbytes' CPU inference layout (packing_format_for_cpu); load the "
            "model with models.policy.load_base_model, which keeps the standard layout"
        )
    return bnb_functional.dequantize_4bit(param.data, state)


def base_state_dict(model: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The trainer's base as an HF state dict on CPU in ``dtype``: 4-bit weights dequantised, LoRA left out.

    model: the PEFT policy (or a bare ``*ForCausalLM``). Names are the original checkpoint's
    (``model.layers.0.self_attn.q_proj.weight``): PEFT's ``.base_layer`` is dropped from each name and every
    ``lora_*`` tensor is skipped. With tied embeddings only the input embedding is written.
    """
    inner = causal_lm(model)
    head, embedding = inner.get_output_embeddings(), inner.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    head_name = next((f"{n}.weight" for n, m in inner.named_modules() if m is head), None)
    weights: dict[str, torch.Tensor] = {}
    for name, param in inner.named_parameters(remove_duplicate=False):
        parts = name.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue  # the adapter: vLLM gets it each step as a LoRARequest, never merged into the base
        if "modules_to_save" in parts or "original_module" in parts:
            raise ExportError(
                f"{name}: PEFT modules_to_save are not supported (this project's LoRA has none)"
            )
        hf_name = ".".join(part for part in parts if part != "base_layer")
        if tied and hf_name == head_name:
            continue  # the lm_head is the input embedding: written once, under the embedding's name
        if is_4bit(param):
            tensor = dequantize_weight(param)
        elif param.is_floating_point():
            tensor = param.detach()
        else:
            raise ExportError(f"{name}: {param.dtype} parameter that is not a bitsandbytes 4-bit weight")
        weights[hf_name] = tensor.to(device="cpu", dtype=dtype).contiguous()
    return weights


def export_size_bytes(model: Any, dtype: torch.dtype) -> int:
    """Bytes of ``base_state_dict(model, dtype)`` without building it (4-bit weights count at full size)."""
    inner = causal_lm(model)
    seen: set[int] = set()
    numel = 0
    for name, param in inner.named_parameters():  # shared (tied) tensors once
        if "lora_" in name or id(param) in seen:
            continue
        seen.add(id(param))
        numel += param.quant_state.shape.numel() if is_4bit(param) else param.numel()
    return numel * torch.empty((), dtype=dtype).element_size()


# ------------------------------------------------------------------------------------ the folder


def checkpoint_tensor_names(model_path: str) -> Optional[set[str]]:
    """The tensor names in a model folder's safetensors files (headers only), or None when it has none."""
    from safetensors import safe_open

    files = sorted(f for f in os.listdir(model_path) if f.endswith(".safetensors"))
    if not files:
        return None
    names: set[str] = set()
    for file in files:
        with safe_open(os.path.join(model_path, file), framework="pt") as handle:
            names.update(handle.keys())
    return names


def _check_names(exported: set[str], model_path: str, tied_head: Optional[str]) -> None:
    """The export must hold exactly the original checkpoint's tensors (a missing one would be left random)."""
    original = checkpoint_tensor_names(model_path)
    if original is None:
        return  # a .bin-only folder: nothing cheap to compare with
    # a pre-quantised (bitsandbytes) checkpoint also stores each weight's quantisation state
    original = {n for n in original if not QUANT_STATE_PARTS.intersection(n.split("."))}
    optional = {tied_head} if tied_head else set()  # a tied lm_head: some checkpoints store it, some not
    missing, unexpected = sorted(original - exported - optional), sorted(exported - original - optional)
    if missing or unexpected:
        raise ExportError(
            f"the export of {model_path} does not match its checkpoint: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )


def as_torch_dtype(dtype: Union[torch.dtype, str]) -> torch.dtype:
    """torch.bfloat16 for torch.bfloat16, "bfloat16" or "torch.bfloat16"; ExportError for a non-float name."""
    if isinstance(dtype, torch.dtype):
        return dtype
    resolved = getattr(torch, str(dtype).removeprefix("torch."), None)
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ExportError(f"dtype={dtype!r}: expected a floating dtype such as 'bfloat16' or 'float32'")
    return resolved


def export_base_for_sampler(
    model: Any, folder: str, dtype: Union[torch.dtype, str], model_path: Optional[str] = None
) -> str:
    """Write the trainer's base (NF4 dequantised, adapter off) as a complete HF model folder; return it.

    model: the PEFT policy from ``models.policy.load_policy`` (4-bit or not: a 16-bit base is written as it
    is). folder: where to write; created, and must be empty. dtype: of the written tensors, normally the
    trainer's compute dtype (the dtype bitsandbytes dequantises to, so nothing is rounded twice).
    model_path: the original model folder, for config.json, tokenizer and generation config (default: the
    folder the model was loaded from, ``model.config.name_or_path``).

    The folder loads with ``AutoModelForCausalLM.from_pretrained(folder)`` and with ``vllm.LLM(folder)``
    and gives the logits of the trainer's model with the adapter switched off.
    """
    dtype = as_torch_dtype(dtype)
    inner = causal_lm(model)
    model_path = model_path or getattr(inner.config, "name_or_path", None) or ""
    config_file = os.path.join(model_path, "config.json")
    if not os.path.isfile(config_file):
        raise ExportError(
            f"model_path={model_path!r}: no config.json there (expected the original model folder)"
        )
    if os.path.isdir(folder) and os.listdir(folder):
        raise ExportError(f"export folder {folder!r} is not empty")
    os.makedirs(folder, exist_ok=True)

    from huggingface_hub import save_torch_state_dict

    weights = base_state_dict(model, dtype)
    head, embedding = inner.get_output_embeddings(), inner.get_input_embeddings()
    tied = head is not None and embedding is not None and head.weight is embedding.weight
    tied_head = next((f"{n}.weight" for n, m in inner.named_modules() if m is head), None) if tied else None
    _check_names(set(weights), model_path, tied_head)
    save_torch_state_dict(weights, folder)  # model.safetensors, or 5 GB shards + index
    del weights

    with open(config_file) as fh:
        config = json.load(fh)
    config.pop("quantization_config", None)  # a pre-quantised original; the export is plain dtype weights
    config.pop("torch_dtype", None)  # transformers 5 calls it "dtype"
    config["dtype"] = str(dtype).removeprefix("torch.")
    with open(os.path.join(folder, "config.json"), "w") as fh:
        json.dump(config, fh, indent=2)
    for name in sorted(os.listdir(model_path)):
        source = os.path.join(model_path, name)
        is_weights = name.endswith(WEIGHT_SUFFIXES) or name.endswith(".index.json")
        if os.path.isfile(source) and not is_weights and name != "config.json":
            shutil.copyfile(source, os.path.join(folder, name))  # follows the HF cache's symlinks
    return folder


def export_folder(
    size_bytes: int,
    candidates: Optional[Sequence[str]] = None,
    run: str = "run",
    say: Optional[Callable[[str], None]] = print,
) -> str:
    """A new empty folder for an export of ``size_bytes``: in RAM (/dev/shm) if it has room, else temp dir.

    candidates: parent folders in order of preference (default /dev/shm, then ``tempfile.gettempdir()``).
    A parent is taken when it exists, is writable and has ``size_bytes`` + 5% free (``models.shm.new_folder``,
    which names the folder ``grpo-<run>-<pid>-base-<random>`` and prints one line when it falls back).
    Docker's default /dev/shm is 64 MB: Qwen2.5-3B (6.2 GB in bf16) then goes to the temp dir (disk) instead.
    """
    try:
        return new_folder("base", run, size_bytes, candidates, say=say)
    except SharedMemoryError as err:
        raise ExportError(str(err)) from None


# ------------------------------------------------------------------------------------ the adapter


def adapter_size_bytes(model: Any, dtype: torch.dtype) -> int:
    """Bytes of the LoRA tensors of ``model`` written in ``dtype`` (what ``save_adapter_for_sampler`` writes).

    Example: rank 64 on the seven projections of Qwen2.5-3B: 119.7 M parameters, 239.4 MB in bf16.
    """
    numel = sum(p.numel() for name, p in model.named_parameters() if "lora_" in name)
    return numel * torch.empty((), dtype=dtype).element_size()


def save_adapter_for_sampler(model: Any, folder: str, dtype: Union[torch.dtype, str]) -> str:
    """Write the LoRA adapter of ``model`` in PEFT's format, its tensors in ``dtype`` (the engine's); return folder.

    The same files as ``models.policy.save_adapter`` (``adapter_config.json`` + ``adapter_model.safetensors``,
    PEFT's names) with the tensors cast: vLLM casts a LoRA to its own dtype when it loads it, so writing it in
    that dtype changes no number vLLM computes with and halves the bytes in bf16. The trainer's master
    weights stay fp32.
    """
    dtype = as_torch_dtype(dtype)
    lora = {name: p.detach().to(dtype) for name, p in model.named_parameters() if "lora_" in name}
    model.save_pretrained(folder, safe_serialization=True, save_embedding_layers=False, state_dict=lora)
    return folder


__all__ = [
    "ExportError",
    "adapter_size_bytes",
    "as_torch_dtype",
    "base_state_dict",
    "checkpoint_tensor_names",
    "dequantize_weight",
    "export_base_for_sampler",
    "export_folder",
    "export_size_bytes",
    "has_4bit_weights",
    "is_4bit",
    "save_adapter_for_sampler",
]
