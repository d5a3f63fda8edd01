"""``model.generate`` on the policy itself: the sampler that needs nothing but the model being trained.

The contract (``Sampler``, ``Completion``, ``SamplingSettings``) is in ``models/samplers.py``; this file only
says how HF generate fills it: a left-padded batch, our own temperature / top-k / top-p warpers (the model
folder's generation_config is swapped out meanwhile), and a logits processor that records the log-prob of
each sampled token under the distribution it was drawn from.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import torch

from models.samplers import Completion, Sampler, SamplingSettings, default_stop_token_ids, derive_seed


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
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
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
                torch.manual_seed(derive_seed(*seeds))  # TODO(per-row streams): one stream per batch for now
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
