"""models/: the 4-bit LoRA policy, the reference as the adapter switched off, the hidden-state log-prob
path, adapter save/load, and the tiny offline Qwen2 (all on CPU, on the tiny model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import randomise_adapter

from grpo.config import LORA_TARGETS, GRPOConfig
from models.forward import LogprobOptions, completion_logprobs, lm_head_weight, position_ids_from_mask
from models.policy import (
    ModelLoadError,
    load_adapter,
    load_base_model,
    load_policy,
    lora_param_count,
    reference_model,
    resolve_dtype,
    resolve_model_path,
    save_adapter,
)
from models.tiny import TINY_MODEL, build_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
)


# ------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def make_config(path: str, **overrides) -> GRPOConfig:
    values = dict(model_name_or_path=path, lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=1)
    values.update(overrides)
    return GRPOConfig(**values)


@pytest.fixture(scope="module")
def policy(tiny_path):
    """A 4-bit policy that tests do not modify (tests that train load their own)."""
    return load_policy(make_config(tiny_path), device="cpu")


def make_batch(tokenizer, prompts: list[str], completions: list[list[int]]):
    """[left-padded chat prompt | right-padded completion] rows, as the trainer builds them.

    Returns input_ids [N, P + T], attention_mask [N, P + T], completion_mask [N, T].
    """
    chats = [[{"role": "user", "content": p}] for p in prompts]
    enc = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    n, t = len(completions), max(len(c) for c in completions)
    completion_ids = torch.full((n, t), tokenizer.pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(n, t, dtype=torch.long)
    for i, c in enumerate(completions):
        completion_ids[i, : len(c)] = torch.tensor(c)
        completion_mask[i, : len(c)] = 1
    input_ids = torch.cat([enc["input_ids"], completion_ids], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], completion_mask], dim=1)
    return input_ids, attention_mask, completion_mask


def batch_of(tokenizer):
    """Three prompts of different lengths (so two rows are left-padded) and completions of 5, 2, 4 tokens."""
    prompts = [
        "Does aspirin thin the blood? Answer with yes, no or maybe.",
        "What is 2 + 3?",
        "A ward has 8 rooms with 4 beds each. How many beds?",
    ]
    completions = [
        tokenizer("<reasoning>\n2 + 3 = 5").input_ids[:5],
        tokenizer(" yes").input_ids[:2],
        tokenizer("<answer>\n32").input_ids[:4],
    ]
    batch = make_batch(tokenizer, prompts, completions)
    assert (batch[1][:, 0] == 0).sum() == 2, "two rows must start with left padding"
    return batch


def full_logits_logprobs(model, input_ids, attention_mask, completion_mask, temperature):
    """The plain reference: the model's own [N, L, V] logits, log_softmax, pick the next token."""
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
    t = completion_mask.shape[1]
    logp = torch.log_softmax(logits[:, -t - 1 : -1].float() / temperature, dim=-1)
    return logp.gather(-1, input_ids[:, -t:, None]).squeeze(-1) * completion_mask


def lora_layer_names(model) -> set[str]:
    return {name.rsplit(".lora_A", 1)[0] for name, _ in model.named_modules() if name.endswith(".lora_A")}


# ------------------------------------------------------------------------------------------ tiny model


def test_tiny_build_is_deterministic(tiny_path, tmp_path):
    # a second build in a fresh process with another hash seed: every file byte for byte
    code = f"from models.tiny import build_tiny_model; build_tiny_model({str(tmp_path / 'again')!r})"
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=REPO)
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO, capture_output=True)
    for name in TINY_FILES:
        with open(os.path.join(tiny_path, name), "rb") as a, open(tmp_path / "again" / name, "rb") as b:
            assert a.read() == b.read(), name
    first = load_file(os.path.join(tiny_path, "model.safetensors"))
    second = load_file(tmp_path / "again" / "model.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_tiny_config_is_a_small_qwen25(tiny_path):
    config = json.load(open(os.path.join(tiny_path, "config.json")))
    assert config["architectures"] == ["Qwen2ForCausalLM"]
    assert (config["hidden_size"], config["num_hidden_layers"]) == (128, 4)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is True and config["vocab_size"] == 512
    weights = load_file(os.path.join(tiny_path, "model.safetensors"))
    assert "lm_head.weight" not in weights  # tied: stored once, as the embedding
    generation = json.load(open(os.path.join(tiny_path, "generation_config.json")))
    assert generation["eos_token_id"] == [2, 0] and generation["pad_token_id"] == 0


def test_tiny_tokenizer_special_tokens_digits_and_chat_template(tiny_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_path)
    assert tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<|endoftext|>")
    # digits are single tokens, as with Qwen2's pre-tokenizer
    assert tok.tokenize("1024") == ["1", "0", "2", "4"]
    assert tok.decode(tok("The answer is 1,250.").input_ids) == "The answer is 1,250."

    chat = [{"role": "system", "content": "Respond in XML."}, {"role": "user", "content": "Is 7 prime?"}]
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == (
        "<|im_start|>system\nRespond in XML.<|im_end|>\n"
        "<|im_start|>user\nIs 7 prime?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # no system turn -> Qwen2.5's default one; an assistant turn is closed like the others
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "yes"}]
    assert tok.apply_chat_template(chat, tokenize=False) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>\n"
    )
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> ... two <|im_end|> (system, user)


def test_tiny_model_name_resolves_to_an_atomic_cached_build(tmp_path, monkeypatch):
    monkeypatch.setenv("GRPO_CACHE", str(tmp_path))
    path = resolve_model_path(TINY_MODEL)
    assert os.path.dirname(path) == str(tmp_path) and os.path.basename(path).startswith(TINY_MODEL)
    assert all(os.path.isfile(os.path.join(path, f)) for f in TINY_FILES)
    stamp = os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns
    assert resolve_model_path(TINY_MODEL) == path  # second call: the cached build, not a new one
    assert os.stat(os.path.join(path, "model.safetensors")).st_mtime_ns == stamp
    assert os.listdir(tmp_path) == [os.path.basename(path)]  # no temporary folder left behind


# ------------------------------------------------------------------------------------------ loading


def test_4bit_load_quantises_the_seven_projections_and_adapts_exactly_them(policy):
    import bitsandbytes as bnb

    model, tokenizer = policy
    causal_lm = model.get_base_model()
    expected = {
        f"base_model.model.model.layers.{i}.{block}.{name}"
        for i in range(4)
        for block, names in (("self_attn", LORA_TARGETS[:4]), ("mlp", LORA_TARGETS[4:]))
        for name in names
    }
    assert lora_layer_names(model) == expected
    for name in expected:
        layer = model.get_submodule(name)
        assert isinstance(layer.base_layer, bnb.nn.Linear4bit), name
        assert layer.base_layer.weight.quant_state.quant_type == "nf4"
    # the embedding / tied lm_head stays a full-precision matrix, shared by both
    assert lm_head_weight(model) is causal_lm.model.embed_tokens.weight
    assert lm_head_weight(model).dtype == torch.float32
    # trainable = the LoRA matrices only
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    # generation needs left padding; pad = <|endoftext|> (not EOS) as in Qwen2.5-Instruct
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2
    # gradient checkpointing, non-reentrant, on every decoder layer
    for layer in causal_lm.model.layers:
        assert layer.gradient_checkpointing
        assert layer._gradient_checkpointing_func.keywords == {"use_reentrant": False}


def test_trainable_count_matches_the_closed_form(policy):
    model, _ = policy
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # tiny model, r = 8, per layer: q 128+128, k 128+64, v 128+64, o 128+128,
    # gate 128+384, up 128+384, down 384+128 = 2,432; x 8 x 4 layers = 77,824
    assert trainable == lora_param_count(model.config, 8, LORA_TARGETS) == 77_824


def test_lora_param_count_for_qwen25_3b():
    from transformers import Qwen2Config

    config = Qwen2Config(
        hidden_size=2048,
        num_hidden_layers=36,
        intermediate_size=11008,
        num_attention_heads=16,
        num_key_value_heads=2,
        vocab_size=151936,
        tie_word_embeddings=True,
    )
    # head_dim = 2048 / 16 = 128, so k/v project 2048 -> 2 x 128 = 256. Per layer, r x (in + out):
    #   q 2048+2048 = 4096, k 2048+256 = 2304, v 2304, o 4096,
    #   gate 2048+11008 = 13056, up 13056, down 11008+2048 = 13056     -> 51,968
    # x r = 64 -> 3,325,952 per layer; x 36 layers -> 119,734,272
    assert lora_param_count(config, 64, LORA_TARGETS) == 119_734_272
    assert lora_param_count(config, 64, ["q_proj", "v_proj"]) == (4096 + 2304) * 64 * 36 == 14_745_600
    with pytest.raises(ValueError, match="embed_tokens"):
        lora_param_count(config, 64, ["q_proj", "embed_tokens"])


def test_16bit_variant_loads_without_bitsandbytes_layers(tiny_path):
    import bitsandbytes as bnb

    model, tokenizer = load_policy(make_config(tiny_path, load_in_4bit=False), device="cpu")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    layer = model.get_submodule("base_model.model.model.layers.0.mlp.down_proj")
    assert type(layer.base_layer) is torch.nn.Linear and layer.base_layer.weight.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 77_824
    batch = batch_of(tokenizer)
    with torch.no_grad():
        logp = completion_logprobs(model, *batch)
        with reference_model(model):
            ref = completion_logprobs(model, *batch)
    assert torch.equal(logp, ref) and (logp[batch[2] == 1] < 0).all()


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("fp16", "cpu") == torch.float16
    with pytest.raises(ValueError, match="dtype='int8'"):
        resolve_dtype("int8", "cpu")


def test_missing_local_path_gives_a_clear_error(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no such folder") as err:
        load_policy(make_config(missing), device="cpu")
    assert missing in str(err.value) and "model_name_or_path" in str(err.value)
    with pytest.raises(ModelLoadError, match="has no config.json"):
        resolve_model_path(str(tmp_path))


@pytest.mark.parametrize("offline", ["1", "0"])
def test_unreachable_hub_id_gives_a_clear_error(offline, monkeypatch):
    # Nothing can be downloaded here: with HF_HUB_OFFLINE=1 the cache miss is the answer; without it
    # the one hub request fails at once (no network) or answers 404 (network): both are ModelLoadError.
    monkeypatch.setenv("HF_HUB_OFFLINE", offline)
    name = "grpo-medical-tests/no-such-model-0"
    with pytest.raises(ModelLoadError, match="not in the Hugging Face cache") as err:
        resolve_model_path(name)
    assert f"model_name_or_path={name!r}" in str(err.value)
    assert ("HF_HUB_OFFLINE=1" in str(err.value)) == (offline == "1")


# ------------------------------------------------------------------------------------------ log-probs


def test_hidden_state_path_equals_log_softmax_of_the_models_logits(tiny_path):
    model, tokenizer = load_policy(make_config(tiny_path), device="cpu")
    randomise_adapter(model, 0.05)  # so the LoRA path is part of what is compared
    input_ids, attention_mask, completion_mask = batch_of(tokenizer)
    temperature = 0.7

    expected = full_logits_logprobs(model, input_ids, attention_mask, completion_mask, temperature)
    for backend in ("naive", "torch"):
        options = LogprobOptions(temperature=temperature, backend=backend)
        got = completion_logprobs(model, input_ids, attention_mask, completion_mask, options)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
        assert (got[completion_mask == 0] == 0).all()

    # the gradients reaching the LoRA weights agree too
    params = [p for p in model.parameters() if p.requires_grad]
    grads_full = torch.autograd.grad(expected.sum(), params)
    options = LogprobOptions(temperature=temperature, backend="torch")
    got = completion_logprobs(model, input_ids, attention_mask, completion_mask, options)
    grads_hidden = torch.autograd.grad(got.sum(), params)
    for a, b in zip(grads_full, grads_hidden, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

    # entropy of the same distribution, 0 on padding
    with torch.no_grad():
        _, entropy = completion_logprobs(
            model, input_ids, attention_mask, completion_mask, options, return_entropy=True
        )
        positions = position_ids_from_mask(attention_mask)
        logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).logits
        logp_all = torch.log_softmax(logits[:, -completion_mask.shape[1] - 1 : -1] / temperature, -1)
        expected_entropy = -(logp_all.exp() * logp_all).sum(-1) * completion_mask
    torch.testing.assert_close(entropy, expected_entropy, atol=1e-5, rtol=1e-5)


def test_logprobs_match_what_generate_sampled_with(policy):
    """Greedy generate on left-padded prompts: its per-step logits give the same log-probs."""
    model, tokenizer = policy
    chats = [[{"role": "user", "content": p}] for p in ("Is 7 prime?", "What organ makes bile? Answer A-D.")]
    enc = tokenizer.apply_chat_template(
        chats, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
    )
    assert enc["attention_mask"][0, 0] == 0  # the shorter prompt is left-padded
    model.eval()
    with torch.no_grad():
        out = model.generate(
            **enc, max_new_tokens=6, do_sample=False, repetition_penalty=1.0, output_logits=True,
            return_dict_in_generate=True, eos_token_id=None,
        )  # fmt: skip
    prompt_len = enc["input_ids"].shape[1]
    completion = out.sequences[:, prompt_len:]
    from_generate = torch.stack(out.logits, dim=1).float().log_softmax(-1)
    from_generate = from_generate.gather(-1, completion[..., None]).squeeze(-1)
    attention_mask = torch.cat([enc["attention_mask"], torch.ones_like(completion)], dim=1)
    with torch.no_grad():
        ours = completion_logprobs(model, out.sequences, attention_mask, torch.ones_like(completion))
    torch.testing.assert_close(ours, from_generate, atol=1e-4, rtol=1e-4)


def test_reference_is_the_base_model_before_and_after_training(tiny_path):
    config = make_config(tiny_path)
    model, tokenizer = load_policy(config, device="cpu")
    base = load_base_model(config, device="cpu")  # the same weights, no adapter at all
    batch = batch_of(tokenizer)

    def logprobs(m):
        with torch.no_grad():
            return completion_logprobs(m, *batch)

    def reference_logprobs():
        with reference_model(model):
            return logprobs(model)

    base_logp = logprobs(base)
    # PEFT initialises B = 0: the adapted model starts exactly as the base
    assert torch.equal(logprobs(model), reference_logprobs())
    assert torch.equal(reference_logprobs(), base_logp)

    # one optimiser step on the adapter (train mode: gradient checkpointing active)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    loss = -completion_logprobs(model, *batch).sum()
    loss.backward()
    optimizer.step()
    model.eval()

    after = logprobs(model)
    assert (after - base_logp).abs().max() > 1e-3  # the policy moved ...
    assert (after[batch[2] == 1] > base_logp[batch[2] == 1]).float().mean() > 0.5  # ... up, mostly
    assert torch.equal(reference_logprobs(), base_logp)  # ... the reference did not
    assert torch.equal(logprobs(model), after)  # and the adapter is back on after the context


# ------------------------------------------------------------------------------------------ save / load


def test_saved_adapter_reloads_with_peft_and_load_adapter(tiny_path, tmp_path):
    from peft import PeftModel

    config = make_config(tiny_path)
    model, tokenizer = load_policy(config, device="cpu")
    randomise_adapter(model, 0.05, seed=3)
    batch = batch_of(tokenizer)
    with torch.no_grad():
        expected = completion_logprobs(model, *batch)

    save_adapter(model, str(tmp_path / "adapter"))
    adapter_config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert adapter_config["base_model_name_or_path"] == tiny_path
    assert (adapter_config["r"], adapter_config["lora_alpha"]) == (8, 16)
    assert set(adapter_config["target_modules"]) == set(LORA_TARGETS)
    keys = load_file(tmp_path / "adapter" / "adapter_model.safetensors").keys()
    assert len(keys) == 2 * 7 * 4 and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)

    reloaded = PeftModel.from_pretrained(load_base_model(config, device="cpu"), str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(reloaded, *batch), expected, atol=0, rtol=0)

    fresh, _ = load_policy(config, device="cpu")
    load_adapter(fresh, str(tmp_path / "adapter"))
    with torch.no_grad():
        torch.testing.assert_close(completion_logprobs(fresh, *batch), expected, atol=0, rtol=0)

    other_rank, _ = load_policy(make_config(tiny_path, lora_r=4), device="cpu")
    with pytest.raises(ValueError, match="r=8 but the model has 4"):
        load_adapter(other_rank, str(tmp_path / "adapter"))


# ------------------------------------------------------------------------------------------ bad input


def test_completion_logprobs_rejects_inconsistent_masks(policy):
    model, tokenizer = policy
    input_ids, attention_mask, completion_mask = batch_of(tokenizer)
    bad = completion_mask.clone()
    bad[1, -1] = 1  # row 1 has 2 completion tokens: its last position is padding
    with pytest.raises(ValueError, match="completion_mask is 1 where attention_mask is 0"):
        completion_logprobs(model, input_ids, attention_mask, bad)
    with pytest.raises(ValueError, match="0 < T < L"):
        completion_logprobs(model, input_ids, attention_mask, attention_mask)


def test_an_adapter_of_a_tiny_model_names_its_base_portably():
    """adapter_config.json records the tiny model's name (resolve_model_path builds it on any machine), not
    the cache folder of the machine that trained it."""
    model, _ = load_policy(GRPOConfig(model_name_or_path=TINY_MODEL, lora_r=4, lora_alpha=8), device="cpu")
    assert model.peft_config["default"].base_model_name_or_path == TINY_MODEL
