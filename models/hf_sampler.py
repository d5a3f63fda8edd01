"""``model.generate`` on the policy itself: the sampler that needs nothing but the model being trained.

The contract (``Sampler``, ``Completion``, ``SamplingSettings``) is in ``models/samplers.py``; this file only
says how HF generate fills it:

1. A left-padded batch of rows ``[p0g0, ..., p0g(G-1), p1g0, ...]`` (cut in chunks of ``batch_size``).
2. generate runs in *greedy* mode with our own logits processors: temperature, top-k, top-p (HF's warpers,
   in HF's order), then :class:`DrawAndRecord` last. DrawAndRecord picks each row's token itself, with the
   Gumbel-max trick and one ``torch.Generator`` per row seeded ``completion_seed(seeds[p], g)``, and
   returns scores whose argmax is that token, so generate's greedy step only reads the choice. A row's
   completion depends on its own stream and its own logits only, not on what else is in the batch (where
   it sits, how many rows, how they are chunked): one process or eight draw the same samples. (The logits
   themselves move by float rounding, ~1e-6, with the padding and the batch shape; measured on the tiny
   models, that never changed a token.)
3. DrawAndRecord also records the log-prob of the chosen token under the distribution it was drawn
   from (the processed scores, without the noise), kept as one float per token: no [B, V] outlives its step.
4. On CPU, a 4-bit base is dequantised once per call instead of at every decoding step
   (:func:`dequantized_4bit_weights`): the same numbers, with less time and far fewer stalls on busy cores.
   Also on CPU, attention reads the shared key / value heads of grouped-query attention in place instead of
   copying the whole cache at every step (:func:`shared_kv_attention`): the same numbers again.
5. Each prompt is prefilled once per group (:func:`prefill_prompts_once`): its KV cache is computed for one row
   and copied to the G rows of its completions, instead of G identical prefills (what generate's own
   ``num_return_sequences`` does: it repeats the input ids first). The same samples (tested against samples
   recorded before the change).
6. The model folder's generation_config is swapped out meanwhile (Qwen2.5-Instruct ships top_k 20 and a
   repetition penalty that generate would otherwise add), and the global RNG is never touched.

Why not ``do_sample=True``: HF draws every row from the one global stream with ``torch.multinomial``, so
row r's sample depends on the r - 1 rows drawn before it in that step.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any, Optional

import torch

from models.forward import causal_lm, decoder_autocast
from models.samplers import Completion, Sampler, SamplingSettings, completion_seed, default_stop_token_ids


def add_gumbel_noise(scores: torch.Tensor, generators: Sequence[torch.Generator]) -> torch.Tensor:
    """``scores + G`` with G standard Gumbel noise; row b's noise comes from ``generators[b]`` alone.

    scores: [B, V] float32, the logits after temperature / top-k / top-p (-inf = filtered out). Returns
    [B, V]. The Gumbel-max trick: ``argmax(scores[b] + G[b])`` is a sample of ``softmax(scores[b])``, because
    for independent Gumbel G_i, P(argmax_i (s_i + G_i) = k) = exp(s_k) / sum_j exp(s_j). A -inf score stays
    -inf, so a filtered token is never drawn. Row b uses the next V draws of its own generator, so it does
    not depend on the other rows.

    Worked example: scores log([0.5, 0.3, 0.2]) perturbed by many independent generators: the argmax is
    token 0, 1, 2 with frequencies 0.5, 0.3, 0.2; after top-k = 2, [log 0.5, log 0.3, -inf]: tokens 0 and 1
    with frequencies 0.625 and 0.375, and never 2.

    G = -log(-log(U)) with U drawn in float64 and kept above 0, so G is finite (U = 0 would give -inf and
    could leave a top-k = 1 row with nothing to pick).
    """
    uniform = torch.stack(
        [
            torch.rand(scores.shape[1], generator=g, device=scores.device, dtype=torch.float64)
            for g in generators
        ]
    )
    uniform.clamp_(min=torch.finfo(torch.float64).tiny)
    return scores + (-torch.log(-torch.log(uniform))).to(scores.dtype)


def chosen_token_logprobs(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log_softmax(scores)[b, tokens[b]]``: [B] float32. scores: [B, V] (may hold -inf), tokens: [B].

    Worked example: scores [[0, ln 3]] (probabilities 1/4, 3/4) and token 1 -> ln 3 - ln(e^0 + e^(ln 3)) =
    ln 0.75 = -0.2877. The [B, V] log-softmax lives for one step only. (``score - logsumexp`` would avoid it
    but measured slower on CPU: logsumexp runs as several kernels, log_softmax as one.)
    """
    return torch.log_softmax(scores.float(), dim=-1).gather(1, tokens[:, None]).squeeze(1)


def warpers(settings: SamplingSettings) -> list[Any]:
    """HF's temperature, top-k and top-p warpers for ``settings``, in HF's order (none for greedy).

    They turn the logits into the scores a token is drawn from (``softmax(scores)``): logits / T, then every
    score outside the top k, then outside the top-p nucleus, set to -inf.
    """
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    if settings.greedy:
        return []
    chosen: list[Any] = []
    if settings.temperature != 1.0:
        chosen.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k > 0:
        chosen.append(TopKLogitsWarper(settings.top_k))
    if settings.top_p < 1.0:
        chosen.append(TopPLogitsWarper(settings.top_p))
    return chosen


class DrawAndRecord:
    """The last logits processor: chooses each row's next token and records its log-prob.

    generators: one per row (sampling), or None (greedy). It returns the scores the token is chosen from,
    ``add_gumbel_noise(scores, generators)`` when sampling and the scores themselves when greedy; generate
    (run with ``do_sample=False``) takes their argmax. It also appends ``log_softmax(scores)[token]`` to
    ``self.logprobs`` (one [B] float32 per step): the log-prob under the distribution the token was drawn
    from (temperature, top-k, top-p applied), without the noise.
    """

    def __init__(self, generators: Optional[list[torch.Generator]]) -> None:
        self.generators = generators
        self.logprobs: list[torch.Tensor] = []  # one [B] per generated token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        choice_scores = scores if self.generators is None else add_gumbel_noise(scores, self.generators)
        tokens = choice_scores.argmax(dim=-1)  # the same argmax generate's greedy step takes next
        self.logprobs.append(chosen_token_logprobs(scores, tokens))
        return choice_scores

    def stacked(self) -> torch.Tensor:
        """[B, T]: the log-prob of every generated token (T = the steps generate ran)."""
        return torch.stack(self.logprobs, dim=1)


class _DequantizedLinear4bit:
    """A bitsandbytes ``Linear4bit.forward`` that dequantises its weight on the first call only.

    It computes what ``Linear4bit.forward`` computes (input cast to the compute dtype, the dequantised weight,
    ``F.linear``, output cast back) with the weight ``bitsandbytes.functional.dequantize_4bit`` gives, the
    function bitsandbytes calls itself before its matmul (except in its single-row CUDA GEMV kernel).
    """

    def __init__(self, layer: torch.nn.Module, dequantize_4bit: Any) -> None:
        self.layer = layer
        self.dequantize_4bit = dequantize_4bit  # bitsandbytes.functional.dequantize_4bit
        self.weight: Optional[torch.Tensor] = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        layer = self.layer
        if not layer.compute_type_is_set:  # what bitsandbytes does on a layer's first call
            layer.set_compute_type(x)
            layer.compute_type_is_set = True
        dtype = layer.compute_dtype or x.dtype
        if self.weight is None or self.weight.dtype != dtype:
            self.weight = self.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(dtype)
        bias = None if layer.bias is None else layer.bias.to(dtype)
        return torch.nn.functional.linear(x.to(dtype), self.weight, bias).to(x.dtype)


@contextmanager
def dequantized_4bit_weights(model: torch.nn.Module) -> Iterator[int]:
    """Inside the block, every bitsandbytes 4-bit linear layer of ``model`` dequantises its weight once.

    bitsandbytes dequantises a 4-bit weight on every forward, so generating T tokens would dequantise the
    whole base model T times, for the same numbers each time (the weights do not change during
    generate). Inside this block each layer keeps its dequantised weight after its first forward: the same
    logits (bit-identical on CPU, tested), at the price of holding the 4-bit layers in the compute dtype
    meanwhile (Qwen2.5-3B in bf16: about 5.5 GB). Measured on the embedded default's sampling
    (scripts/bench_hf_sampler.py, 2-core CPU): 8% less CPU time with one thread; with two threads on a busy
    machine, median 0.58x the wall-clock time (two small multi-threaded bitsandbytes kernels per layer and
    step, 56 on the tiny model, each stalling while other jobs hold the cores). Yields the number of layers
    switched (0 for a 16-bit model).
    """
    bnb = sys.modules.get("bitsandbytes")  # a model with 4-bit layers has imported it; else nothing to do
    layers = [
        m
        for m in (model.modules() if bnb is not None else [])
        if isinstance(m, bnb.nn.Linear4bit)
        # bitsandbytes' CPU inference layout (models.policy turns it off) is not what dequantize_4bit reads
        and not getattr(m.weight.quant_state, "packing_format_for_cpu", False)
    ]
    for layer in layers:
        # an instance attribute shadows the class's forward; deleting it brings that back
        layer.forward = _DequantizedLinear4bit(layer, bnb.functional.dequantize_4bit)
    try:
        yield len(layers)
    finally:
        for layer in layers:
            del layer.forward


SHARED_KV_SDPA = "sdpa_shared_kv"  # our name for sdpa_shared_kv in transformers' attention registry


def sdpa_shared_kv(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    dropout: float = 0.0,
    scaling: Optional[float] = None,
    is_causal: Optional[bool] = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' "sdpa" attention without copying the key / value heads of grouped-query attention.

    query: [B, H, Q, D]; key, value: [B, Hkv, K, D], H a multiple of Hkv (Qwen2.5-3B: 16 and 2; the tiny
    models: 4 and 2); attention_mask: None or [B, 1, Q, K] (True = attend). Returns ([B, Q, H, D], None), as
    transformers' attention functions do.

    Whenever a mask is given (always, with left padding), transformers' sdpa first repeats each KV head
    H / Hkv times (``repeat_kv``): a copy of the whole KV cache, in every layer at every decoding step, because
    CUDA's fused kernels take no mask with GQA. CPU's kernel does: ``enable_gqa=True`` reads each shared head
    in place. The same numbers (bit-identical on CPU: tests/test_samplers.py), a third less time per
    sampling call on the embedded default (docs/BENCHMARKS.md). As transformers does, no ``is_causal`` when a
    mask is given or for one query, and with an empty static cache (K > Q, no mask) only the first Q keys.
    """
    q_len, kv_len = query.shape[2], key.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    causal = q_len > 1 and attention_mask is None and causal
    if causal and kv_len > q_len:
        key, value = key[:, :, :q_len], value[:, :, :q_len]
    out = torch.nn.functional.scaled_dot_product_attention(
        query,
        key,
        value,
        attn_mask=attention_mask,
        dropout_p=dropout,
        scale=scaling,
        is_causal=causal,
        enable_gqa=query.shape[1] != key.shape[1],
    )
    return out.transpose(1, 2).contiguous(), None


@contextmanager
def shared_kv_attention(model: torch.nn.Module) -> Iterator[bool]:
    """Inside the block, a model on transformers' "sdpa" attention uses :func:`sdpa_shared_kv` instead.

    Registered once in transformers' attention registry (and its mask registry, with sdpa's own masks), then
    selected by the model config's ``_attn_implementation`` and put back on exit. Yields whether it switched
    (False for another attention implementation: eager, flash).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    config = causal_lm(model).config
    saved = getattr(config, "_attn_implementation", None)
    if saved != "sdpa":
        yield False
        return
    AttentionInterface.register(SHARED_KV_SDPA, sdpa_shared_kv)
    ALL_MASK_ATTENTION_FUNCTIONS.register(SHARED_KV_SDPA, sdpa_mask)
    config._attn_implementation = SHARED_KV_SDPA
    try:
        yield True
    finally:
        config._attn_implementation = saved


class HFSampler(Sampler):
    """``model.generate`` on the policy itself (adapter on), batched with left padding.

    Needs no extra process or copy of the model, and is always in step with the policy (``update_policy`` is a
    no-op); the price is speed: HF generate decodes a padded batch step by step without paged attention.
    ``batch_size`` caps the completions per generate call (None = all N at once); it changes no sample.
    ``dequantize_once``: dequantise a 4-bit base once per ``generate`` call rather than at every decoding step
    (``dequantized_4bit_weights``: the same numbers, faster on CPU, the base held in the compute dtype
    meanwhile). None (default) = on for a CPU model; off on GPU, where it is not measured yet and would hold
    about 5.5 GB more at Qwen2.5-3B's shape.
    ``prefill_once``: run each prompt through the model once and give its KV cache to its G rows
    (``prefill_prompts_once``; the same samples); False = every row prefills its own copy of the prompt.
    ``share_kv_heads``: attend to grouped-query KV heads in place instead of copying them at every step
    (``shared_kv_attention``: the same numbers). None (default) = on for a CPU model; off on GPU, where
    torch's fused kernels take no mask with GQA and this would fall back to the slow math kernel.
    """

    name = "hf"

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        settings: SamplingSettings,
        stop_token_ids: Optional[Sequence[int]] = None,
        batch_size: Optional[int] = None,
        dequantize_once: Optional[bool] = None,
        prefill_once: bool = True,
        share_kv_heads: Optional[bool] = None,
    ) -> None:
        hf_model = causal_lm(model)
        gen_cfg = getattr(hf_model, "generation_config", None)
        super().__init__(tokenizer, settings, stop_token_ids or default_stop_token_ids(tokenizer, gen_cfg))
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad_token_id (left padding needs one)")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size={batch_size}: must be >= 1 (or None for all rows at once)")
        self.model = model
        self.batch_size = batch_size
        self.dequantize_once = dequantize_once
        self.prefill_once = prefill_once
        self.share_kv_heads = share_kv_heads

    def update_policy(self, model: Any) -> None:
        self.model = model  # generate runs on the live policy: nothing to copy

    def _generate(
        self, prompt_ids: list[list[int]], num_generations: int, seeds: list[int], settings: SamplingSettings
    ) -> list[Completion]:
        # One row per completion, with the seed of its own random stream.
        rows = [
            (p, ids, completion_seed(seeds[p], g))
            for p, ids in enumerate(prompt_ids)
            for g in range(num_generations)
        ]
        chunk = self.batch_size or len(rows)
        outputs: list[Completion] = []
        was_training = self.model.training
        self.model.eval()  # no dropout; gradient checkpointing only acts in training mode
        on_cpu = next(self.model.parameters()).device.type == "cpu"
        dequantize_once = on_cpu if self.dequantize_once is None else self.dequantize_once
        dequantized = dequantized_4bit_weights(self.model) if dequantize_once else nullcontext()
        share_kv_heads = on_cpu if self.share_kv_heads is None else self.share_kv_heads
        shared_kv = shared_kv_attention(self.model) if share_kv_heads else nullcontext()
        # bf16 mode (models.policy keeps the frozen weights, lm_head included, in bf16): generate under the
        # trainer's bf16 autocast, so the LoRA matmuls sample in the precision the trainer scores them in
        hf_model = causal_lm(self.model)
        bf16_mode = hf_model.get_output_embeddings().weight.dtype == torch.bfloat16
        autocast = decoder_autocast(
            next(self.model.parameters()).device, torch.bfloat16 if bf16_mode else None
        )
        try:
            with torch.no_grad(), dequantized, shared_kv, autocast:
                for start in range(0, len(rows), chunk):
                    outputs += self._generate_batch(rows[start : start + chunk], settings)
        finally:
            self.model.train(was_training)
        return outputs

    def _generate_batch(
        self, rows: list[tuple[int, list[int], int]], settings: SamplingSettings
    ) -> list[Completion]:
        """rows: (prompt index, prompt ids, completion seed). Returns one Completion per row, in order."""
        from transformers import GenerationConfig, LogitsProcessorList

        device = next(self.model.parameters()).device
        pad_id = self.tokenizer.pad_token_id
        input_ids, attention_mask = left_pad([ids for _, ids, _ in rows], pad_id)
        width = input_ids.shape[1]

        # Our own warpers, then DrawAndRecord, which sees the scores the token is drawn from. Greedy decoding
        # takes no warper and no random stream.
        generators = None
        if not settings.greedy:
            generators = [torch.Generator(device).manual_seed(seed) for _, _, seed in rows]
        draw = DrawAndRecord(generators)

        # do_sample=False: generate's own step is an argmax over what DrawAndRecord returns.
        generation_config = GenerationConfig(
            do_sample=False,
            max_new_tokens=settings.max_completion_length,
            eos_token_id=self.stop_token_ids,
            pad_token_id=pad_id,
            use_cache=True,
            repetition_penalty=1.0,
        )
        hf_model = causal_lm(self.model)
        input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
        # Each prompt once: its KV cache (all but its last token), copied to the rows of its completions.
        prompt_cache = None
        if self.prefill_once and width > 1:
            prompt_cache = prefill_prompts_once(
                self.model, input_ids, attention_mask, [p for p, _, _ in rows]
            )
        # generate fills every unset field from model.generation_config (Qwen2.5-Instruct ships
        # temperature 0.7, top_k 20, top_p 0.8, repetition_penalty 1.05): swap in a neutral one meanwhile.
        saved_config = hf_model.generation_config
        hf_model.generation_config = GenerationConfig()
        try:
            sequences = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                past_key_values=prompt_cache,
                generation_config=generation_config,
                logits_processor=LogitsProcessorList([*warpers(settings), draw]),
            )
        finally:
            hf_model.generation_config = saved_config
        new_tokens = sequences[:, width:]
        logprobs = draw.stacked()[:, : new_tokens.shape[1]]
        lengths = completion_lengths(new_tokens, self.stop_token_ids)

        token_lists = new_tokens.cpu().tolist()
        logprob_lists = logprobs.cpu().tolist()
        return [
            self._completion(
                prompt_index, token_lists[i][:n], logprob_lists[i][:n], settings.max_completion_length
            )
            for i, ((prompt_index, _, _), n) in enumerate(zip(rows, lengths.tolist(), strict=True))
        ]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) [B, W] of the prompts left-padded to the longest, as generate wants them.

    Example: [[5, 6], [7]] with pad 0 -> [[5, 6], [0, 7]] and mask [[1, 1], [0, 1]].
    """
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, ids in enumerate(prompts):
        input_ids[i, width - len(ids) :] = torch.tensor(list(ids), dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def first_rows(prompt_indices: Sequence[int]) -> tuple[list[int], list[int]]:
    """(the first row of each run of equal prompt indices, the run each row belongs to).

    Rows come in groups (``[p0g0, p0g1, p1g0, ...]``), possibly cut by a chunk. Example: [3, 3, 3, 4, 4] ->
    ([0, 3], [0, 0, 0, 1, 1]): prompt 3 is prefilled from row 0 for rows 0-2, prompt 4 from row 3 for 3-4.
    """
    firsts: list[int] = []
    owners: list[int] = []
    for row, prompt in enumerate(prompt_indices):
        if row == 0 or prompt != prompt_indices[row - 1]:
            firsts.append(row)
        owners.append(len(firsts) - 1)
    return firsts, owners


def prefill_prompts_once(
    model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_indices: Sequence[int]
) -> Any:
    """The KV cache of every row's prompt but its last token, computed once per prompt: a DynamicCache.

    input_ids, attention_mask: [B, W], left-padded, one row per completion (a prompt's G rows are equal);
    prompt_indices: [B] the prompt of each row. The P distinct prompts run through the model once ([P, W - 1]),
    then each one's cache is copied to its rows (``batch_select_indices`` with repeated indices), so a prompt
    is prefilled once per group instead of G times. ``generate`` then feeds each row's last prompt token
    (which yields the first completion token's logits) and decodes as before: with G = 8, 7/8 of the prompt
    work is gone, and the samples are the same (the last prompt token and every later one attend to the same
    keys and values; only the float rounding of the prompt's matmuls, [P, ...] instead of [B, ...], may move).

    Positions are generate's own: ``cumsum(mask) - 1``, padding set to 1 (masked out anyway).
    """
    from transformers import DynamicCache

    firsts, owners = first_rows(prompt_indices)
    ids, mask = input_ids[firsts, :-1], attention_mask[firsts, :-1]
    positions = (mask.long().cumsum(-1) - 1).masked_fill(mask == 0, 1)
    cache = DynamicCache()
    # logits_to_keep=1: the prompt's logits are not needed (generate computes the last token's), only its cache
    model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=positions,
        past_key_values=cache,
        use_cache=True,
        logits_to_keep=1,
    )
    cache.batch_select_indices(torch.tensor(owners, device=input_ids.device))
    return cache


def completion_lengths(new_tokens: torch.Tensor, stop_token_ids: Sequence[int]) -> torch.Tensor:
    """[B] lengths of generate's new tokens [B, T]: up to and including the first stop token, else T.

    After a row stops, generate writes pad_id (which may itself be a stop token): only the first counts.
    Example: stop ids {2}, rows [[5, 2, 2], [5, 6, 7]] -> [2, 3].
    """
    is_stop = torch.isin(new_tokens, torch.tensor(list(stop_token_ids), device=new_tokens.device))
    first_stop = torch.where(is_stop.any(dim=1), is_stop.int().argmax(dim=1) + 1, new_tokens.shape[1])
    return first_stop.cpu()
