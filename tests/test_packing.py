"""models/packing.py: each prompt once per group.

The pure functions are checked on tiny inputs whose packed ids, positions and masks are written out by
hand. The forward is checked against the independent reference, ``models.forward.completion_logprobs``
run row by row: log-probs, entropy and the gradient of a loss w.r.t. every LoRA parameter must agree to
1e-5 relative, on the tiny Qwen2 in 4-bit and 16-bit, with and without gradient checkpointing, for the
torch and naive log-prob backends, the reference (adapter off), rows cut mid-group, and both attention
implementations that take a 4-D mask ("sdpa", the default, and "eager").
"""

from __future__ import annotations

import doctest
from contextlib import contextmanager

import pytest
import torch
import transformers.models.qwen2.modeling_qwen2 as modeling_qwen2
from tiny_run import randomise_adapter

import models.packing
from grpo.config import GRPOConfig
from models.forward import LogprobOptions, completion_logprobs, decoder_body
from models.packing import (
    attention_mask_for,
    block_causal_mask,
    decoder_token_counts,
    group_rows,
    pack_groups,
    shared_prompt_logprobs,
)
from models.policy import load_policy, reference_model
from models.tiny import TINY_MODEL

PAD = 0
REL_TOL = 1e-5

# ------------------------------------------------------------------------------------------ pure functions

# Three rows, P = 3 prompt columns, T = 2 completion columns. Rows 0 and 1 share the prompt [5, 6]
# (left-padded by one); row 2 has the prompt [4, 5, 6]. Completions: [7, 8], [9], [3].
HAND_IDS = torch.tensor([[0, 5, 6, 7, 8], [0, 5, 6, 9, 0], [4, 5, 6, 3, 0]])
HAND_MASK = torch.tensor([[0, 1, 1, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 0]])
HAND_GROUPS = [slice(0, 2), slice(2, 3)]


def test_docstring_examples():
    """The worked examples in models/packing.py's docstrings (group_rows, pack_groups, block_causal_mask,
    attention_mask_for, decoder_token_counts) are right."""
    result = doctest.testmod(models.packing)
    assert result.attempted >= 10 and result.failed == 0


def test_group_rows_joins_consecutive_identical_prompts_only():
    assert group_rows(HAND_IDS, HAND_MASK, prompt_len=3) == HAND_GROUPS
    # The same prompt again after another one starts a new group; padding width does not matter,
    # only the real tokens; two adjacent groups with one prompt merge into one.
    ids = torch.tensor([[0, 0, 5, 6, 1], [0, 0, 5, 6, 2], [0, 0, 4, 6, 1], [0, 0, 5, 6, 1], [0, 0, 5, 6, 3]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    assert group_rows(ids, mask, prompt_len=4) == [slice(0, 2), slice(2, 3), slice(3, 5)]
    # A pad id that equals a real token must not matter: the mask decides (row 1's 0 is real).
    ids = torch.tensor([[0, 0, 5, 1], [0, 0, 5, 1]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert group_rows(ids, mask, prompt_len=3) == [slice(0, 1), slice(1, 2)]


def test_pack_groups_hand_example():
    packed = pack_groups(HAND_IDS, HAND_MASK, HAND_MASK[:, 3:], HAND_GROUPS)
    # group 0: [5 6 | 7 8 | 9]; group 1: [4 5 6 | 3] and one pad
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9], [4, 5, 6, 3, PAD]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2], [0, 1, 2, 3, 0]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, 1, 2], [0, 0, 0, 1, -1]]
    assert packed.attention_mask.shape == (2, 1, 5, 5) and packed.attention_mask.dtype == torch.bool
    assert packed.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0],  # 5
        [1, 1, 0, 0, 0],  # 6
        [1, 1, 1, 0, 0],  # 7: prompt + itself
        [1, 1, 1, 1, 0],  # 8: prompt + 7 + itself
        [1, 1, 0, 0, 1],  # 9: prompt + itself, not its sibling 7 8
    ]
    assert packed.attention_mask[1, 0].int().tolist() == [
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],
        [1, 1, 1, 1, 0],
        [0, 0, 0, 0, 1],  # the pad sees only itself
    ]
    # flat index into [B * S] = [2 * 5]: 7 and 9 by the 6 at 1; 8 by the 7 at 2; 3 by the 6 at 5 + 2
    assert packed.predictor_index.tolist() == [[1, 2], [1, -1], [7, -1]]


def test_pack_groups_keeps_attended_but_unscored_tokens_and_skips_empty_completions():
    # Row 0 attends to [7, 8] but scores only 8; row 1 has no completion at all.
    ids = torch.tensor([[5, 6, 7, 8], [5, 6, 0, 0], [5, 6, 9, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]])
    completion_mask = torch.tensor([[0, 1], [0, 0], [1, 0]])
    packed = pack_groups(ids, mask, completion_mask, [slice(0, 3)])
    assert packed.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    assert packed.segment_ids.tolist() == [[0, 0, 1, 1, 3]]
    assert packed.predictor_index.tolist() == [[-1, 2], [-1, -1], [1, -1]]


def test_block_causal_mask_draws_the_module_docstring_picture():
    # prompt p0 p1 p2, completion a0 a1, completion b0 b1 b2, one pad
    segments = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, -1]])
    picture = """
        x........
        xx.......
        xxx......
        xxxx.....
        xxxxx....
        xxx..x...
        xxx..xx..
        xxx..xxx.
        ........x
    """
    expected = [[c == "x" for c in line.strip()] for line in picture.strip().splitlines()]
    assert block_causal_mask(segments)[0, 0].tolist() == expected


def test_attention_mask_formats():
    allowed = torch.tensor([[[[True, False], [True, True]]]])
    assert attention_mask_for(allowed, "sdpa", torch.float32) is allowed  # sdpa: True = take part
    additive = attention_mask_for(allowed, "eager", torch.bfloat16)  # eager adds the mask to the scores
    assert additive.dtype == torch.bfloat16
    assert additive[0, 0].tolist() == [[0.0, torch.finfo(torch.bfloat16).min], [0.0, 0.0]]
    for other in ("flash_attention_2", "flex_attention"):
        with pytest.raises(ValueError, match=f"attn_implementation='{other}'"):
            attention_mask_for(allowed, other, torch.float32)


def test_decoder_token_counts_hand_example():
    # row by row: 3 rows x 5 columns; packed: 2 groups x the longer one, 2 + 2 + 1 = 5 (vs 3 + 1 = 4)
    assert decoder_token_counts(HAND_IDS, HAND_MASK, HAND_MASK[:, 3:]) == {"row_by_row": 15, "packed": 10}


def test_bad_inputs_get_clear_errors():
    completion_mask = HAND_MASK[:, 3:]
    right_padded_prompt = HAND_MASK.clone()
    right_padded_prompt[0, :3] = torch.tensor([1, 1, 0])
    with pytest.raises(ValueError, match=r"rows \[0\]: the last prompt column is padding"):
        pack_groups(HAND_IDS, right_padded_prompt, completion_mask, HAND_GROUPS)
    hole = HAND_MASK.clone()
    hole[0, 3:] = torch.tensor([0, 1])
    with pytest.raises(ValueError, match=r"rows \[0\]: .* must be right-padded"):
        pack_groups(HAND_IDS, hole, hole[:, 3:], HAND_GROUPS)
    with pytest.raises(ValueError, match="completion_mask is 1 where attention_mask is 0"):
        pack_groups(HAND_IDS, HAND_MASK, torch.ones(3, 2), HAND_GROUPS)
    with pytest.raises(ValueError, match="row 2 has another prompt than row 0"):
        pack_groups(HAND_IDS, HAND_MASK, completion_mask, [slice(0, 3)])
    with pytest.raises(ValueError, match="must cover rows 0..3"):
        pack_groups(HAND_IDS, HAND_MASK, completion_mask, [slice(0, 2)])
    with pytest.raises(ValueError, match="consecutive non-empty slices"):
        pack_groups(HAND_IDS, HAND_MASK, completion_mask, [slice(0, 1), slice(2, 3)])
    with pytest.raises(ValueError, match="completion_mask must be"):
        pack_groups(HAND_IDS, HAND_MASK, HAND_MASK, HAND_GROUPS)


# ------------------------------------------------------------------------------------------ model fixtures


def make_config(**overrides) -> GRPOConfig:
    values = dict(model_name_or_path=TINY_MODEL, lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=1)
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def policies():
    """{load_in_4bit: model}, gradient checkpointing enabled as the recipe loads it, adapter randomised."""
    models = {}
    for load_in_4bit in (True, False):
        model, _ = load_policy(
            make_config(load_in_4bit=load_in_4bit, gradient_checkpointing=True), device="cpu"
        )
        randomise_adapter(model, 0.1)
        models[load_in_4bit] = model
    return models


@contextmanager
def gradient_checkpointing(model, enabled: bool):
    """Switch HF gradient checkpointing on or off for a block (restored after)."""
    base = model.get_base_model()
    was_enabled = base.is_gradient_checkpointing
    kwargs = {"gradient_checkpointing_kwargs": {"use_reentrant": False}}
    base.gradient_checkpointing_enable(**kwargs) if enabled else base.gradient_checkpointing_disable()
    try:
        yield
    finally:
        base.gradient_checkpointing_enable(**kwargs) if was_enabled else base.gradient_checkpointing_disable()


@contextmanager
def count_mlp_calls():
    """Count Qwen2MLP.forward calls: one per layer per forward, one more per layer when recomputed."""
    calls = []
    original = modeling_qwen2.Qwen2MLP.forward

    def counting(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    modeling_qwen2.Qwen2MLP.forward = counting
    try:
        yield calls
    finally:
        modeling_qwen2.Qwen2MLP.forward = original


def make_rows(groups, extra_prompt_pad: int = 0, extra_completion_pad: int = 0):
    """[left-padded prompt | right-padded completion] rows from (prompt, [completions]) token lists.

    Returns input_ids [N, P + T], attention_mask [N, P + T], completion_mask [N, T] (float, from lengths).
    """
    prompt_len = max(len(prompt) for prompt, _ in groups) + extra_prompt_pad
    completion_len = max(len(c) for _, completions in groups for c in completions) + extra_completion_pad
    ids, mask = [], []
    for prompt, completions in groups:
        for c in completions:
            left, right = prompt_len - len(prompt), completion_len - len(c)
            ids.append([PAD] * left + prompt + c + [PAD] * right)
            mask.append([0] * left + [1] * (len(prompt) + len(c)) + [0] * right)
    input_ids, attention_mask = torch.tensor(ids), torch.tensor(mask)
    return input_ids, attention_mask, attention_mask[:, prompt_len:].float()


def tokens(gen: torch.Generator, n: int) -> list[int]:
    return torch.randint(3, 500, (n,), generator=gen).tolist()


def mixed_batch():
    """Groups of different prompt lengths (7, 12, 4) and completion lengths, incl. a completion of one
    token, a row with no completion at all, and a row whose last two tokens are attended but not scored."""
    gen = torch.Generator().manual_seed(0)
    spec = [(7, [5, 1, 0]), (12, [8, 3, 6]), (4, [2, 8])]
    groups = [(tokens(gen, p), [tokens(gen, c) for c in lengths]) for p, lengths in spec]
    input_ids, attention_mask, completion_mask = make_rows(groups, extra_prompt_pad=2, extra_completion_pad=1)
    completion_mask[4, 4:6] = 0  # row 4 (8 tokens) scores only its first 4 and last 2
    assert completion_mask[2].sum() == 0 and completion_mask[1].sum() == 1
    return input_ids, attention_mask, completion_mask


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def logp_entropy_and_grads(fn, model, input_ids, attention_mask, completion_mask, backend="torch"):
    """Run `fn` (row-by-row or shared), backprop sum(logp * fixed weights), return logp, entropy, grads."""
    loss_weights = torch.randn(completion_mask.shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    logp, entropy = fn(
        model,
        input_ids,
        attention_mask,
        completion_mask,
        LogprobOptions(temperature=0.9, backend=backend),
        return_entropy=True,
    )
    (logp * loss_weights).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return logp.detach(), entropy, grads


def assert_same_as_row_by_row(model, input_ids, attention_mask, completion_mask, backend="torch"):
    expected = logp_entropy_and_grads(
        completion_logprobs, model, input_ids, attention_mask, completion_mask, backend
    )
    actual = logp_entropy_and_grads(
        shared_prompt_logprobs, model, input_ids, attention_mask, completion_mask, backend
    )
    for name, got, want in (("logp", actual[0], expected[0]), ("entropy", actual[1], expected[1])):
        assert got.shape == want.shape == completion_mask.shape and got.dtype == torch.float32
        assert torch.equal(got[completion_mask == 0], torch.zeros_like(got[completion_mask == 0])), name
        assert rel_err(got, want) < REL_TOL, name
    assert (
        expected[2].keys() == actual[2].keys() and len(expected[2]) == 2 * 7 * 4
    )  # A and B, 7 targets, 4 layers
    for name, want in expected[2].items():
        assert want.abs().max() > 0, f"{name}: zero gradient, the comparison would be vacuous"
        assert rel_err(actual[2][name], want) < REL_TOL, name


# ------------------------------------------------------------------------------------------ model tests


def test_tiny_model_attends_with_sdpa_and_full_attention(policies):
    for model in policies.values():
        assert model.config._attn_implementation == "sdpa"
        assert set(model.config.layer_types) == {"full_attention"}


@pytest.mark.parametrize("backend", ["torch", "naive"])
@pytest.mark.parametrize("checkpointing", [True, False], ids=["checkpointing", "no-checkpointing"])
@pytest.mark.parametrize("load_in_4bit", [True, False], ids=["4bit", "16bit"])
def test_logp_entropy_and_lora_gradients_equal_row_by_row(policies, load_in_4bit, checkpointing, backend):
    model = policies[load_in_4bit]
    model.train()  # HF only checkpoints layers in training mode
    batch = mixed_batch()
    with gradient_checkpointing(model, checkpointing):
        assert_same_as_row_by_row(model, *batch, backend=backend)
        with count_mlp_calls() as calls:  # one packed forward + backward
            logp = shared_prompt_logprobs(model, *batch, LogprobOptions(backend=backend))
            forward_calls = len(calls)
            logp.sum().backward()
        model.zero_grad(set_to_none=True)
    layers = model.config.num_hidden_layers
    assert forward_calls == layers  # all groups in one batched decoder call
    assert len(calls) == (2 * layers if checkpointing else layers)  # recomputed in the backward iff on


def test_rows_cut_mid_group_by_a_micro_batch(policies):
    """Rows 0..4 of a G = 4 batch: one full group, then the first row of the next on its own."""
    gen = torch.Generator().manual_seed(2)
    groups = [
        (tokens(gen, 9), [tokens(gen, n) for n in (4, 6, 2, 5)]),
        (tokens(gen, 5), [tokens(gen, n) for n in (3, 7, 1, 4)]),
    ]
    input_ids, attention_mask, completion_mask = make_rows(groups)
    rows = slice(0, 5)
    micro = input_ids[rows], attention_mask[rows], completion_mask[rows]
    assert group_rows(micro[0], micro[1], prompt_len=input_ids.shape[1] - completion_mask.shape[1]) == [
        slice(0, 4),
        slice(4, 5),
    ]
    model = policies[True]
    model.train()
    assert_same_as_row_by_row(model, *micro)


def test_reference_model_under_no_grad(policies):
    model = policies[True]
    batch = mixed_batch()
    with torch.no_grad():
        with reference_model(model):
            expected = completion_logprobs(model, *batch)
            actual = shared_prompt_logprobs(model, *batch)
        with_adapter = shared_prompt_logprobs(model, *batch)
    assert not actual.requires_grad
    assert rel_err(actual, expected) < REL_TOL
    assert (with_adapter - actual).abs().max() > 1e-3, "the adapter must matter, or this test proves nothing"


def test_sdpa_receives_the_boolean_block_mask(policies, monkeypatch):
    """No silent fallback: every layer's SDPA call gets our [B, 1, S, S] mask, and is_causal is off."""
    model = policies[False]
    batch = mixed_batch()
    packed = pack_groups(*batch, group_rows(batch[0], batch[1], batch[0].shape[1] - batch[2].shape[1]))
    seen = []
    original = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, *args, is_causal=False, **kwargs):
        seen.append((attn_mask, is_causal))
        return original(query, key, value, attn_mask, *args, is_causal=is_causal, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    with torch.no_grad():
        shared_prompt_logprobs(model, *batch)
    assert len(seen) == model.config.num_hidden_layers
    for mask, is_causal in seen:
        assert not is_causal and mask.dtype == torch.bool and torch.equal(mask, packed.attention_mask)


def test_eager_attention_gets_an_additive_mask_and_the_same_results(policies, monkeypatch):
    model = policies[False]
    base = model.get_base_model()
    seen = []
    original = modeling_qwen2.eager_attention_forward

    def recording(module, query, key, value, attention_mask, *args, **kwargs):
        seen.append(attention_mask)
        return original(module, query, key, value, attention_mask, *args, **kwargs)

    monkeypatch.setattr(modeling_qwen2, "eager_attention_forward", recording)
    base.set_attn_implementation("eager")
    try:
        assert decoder_body(model).config._attn_implementation == "eager"
        model.train()
        batch = mixed_batch()
        with gradient_checkpointing(model, False):
            assert_same_as_row_by_row(model, *batch)
    finally:
        base.set_attn_implementation("sdpa")
    masks = [m for m in seen if m is not None and m.shape[0] == 3]  # the packed call: 3 groups
    assert masks and all(
        m.is_floating_point() and m.max() == 0 and m.min() == torch.finfo(m.dtype).min for m in masks
    )


def test_unsupported_attention_or_sliding_window_is_refused(policies, monkeypatch):
    model = policies[False]
    config = decoder_body(model).config
    batch = mixed_batch()
    monkeypatch.setattr(config, "_attn_implementation", "flash_attention_2")
    with pytest.raises(ValueError, match="attn_implementation='flash_attention_2'"):
        shared_prompt_logprobs(model, *batch)
    monkeypatch.undo()
    monkeypatch.setattr(config, "layer_types", ["full_attention", "sliding_attention"] * 2)
    with pytest.raises(ValueError, match="full-attention layers only"):
        shared_prompt_logprobs(model, *batch)
