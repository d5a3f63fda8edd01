"""bf16 mode (``dtype: bf16``, the recipe's ``auto`` on a GPU) on the CPU, on the tiny 4-bit policy.

What docs/TRAINING.md ("Which dtype where") says, checked: the frozen weights that are not 4-bit (norms, q/k/v
biases, the tied embedding = lm_head) are bf16 and the LoRA A/B float32; every matmul of the decoder forward
and backward (the seven projections, their LoRA A and B, attention) takes bf16 inputs, in the old, reference
and update passes and in HF generate; the fused kernel gets bf16 states and the bf16 lm_head and returns
float32; the LoRA parameters get float32 gradients; the log-probs stay within a measured distance of the fp32
mode's on the same weights; and a short training run in bf16 ends finite with a moved adapter. fp32 mode is
left as it was (float32 everywhere, no autocast).
"""

from __future__ import annotations

import collections
import math

import pytest
import torch
from tiny_run import randomise_adapter, tiny
from torch.utils._python_dispatch import TorchDispatchMode

import models.forward
from grpo.config import GRPOConfig, load_config
from grpo.rollout import StepBatch, collate
from grpo.trainer import logprob_options, no_grad_logprobs
from models.forward import LogprobOptions, batch_logprobs, completion_logprobs
from models.hf_sampler import HFSampler
from models.policy import autocast_dtype, load_policy, reference_model
from models.samplers import SamplingSettings

MODEL = "tiny-qwen2-instruct"
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# The matmuls of a forward and backward as they reach the CPU kernels (F.linear becomes mm / addmm).
MATMULS = {"mm", "addmm", "bmm", "baddbmm"}

# Per-token log-probs in bf16 mode against fp32 mode on the same weights (``share_weights``), the tiny
# instruct model (hidden 128, 4 layers), 6 completions x 12 tokens (72 tokens): measured max |difference|
# 0.018 (mean 0.0015) with the adapter on, 0.011 (mean 0.00084) with it off (the reference), on the 2-core
# CPU dev machine. That is the decoder in bf16 (8 significant bits per activation), not the kernel, which
# adds about 1e-6 (tests/test_logprobs.py). Stated tolerances: about 3x the measured values.
BF16_VS_FP32_MAX = 0.05
BF16_VS_FP32_MEAN = 0.005

PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "user", "content": "Does aspirin thin the blood? Answer with yes, no or maybe."}],
]


def config(dtype: str, **overrides) -> GRPOConfig:
    values = dict(model_name_or_path=MODEL, lora_r=8, lora_alpha=16, lora_dropout=0.0, seed=1, dtype=dtype)
    values.update(overrides)
    return GRPOConfig(**values)


def share_weights(source, target) -> None:
    """Give `target` (bf16 mode) exactly the 4-bit weights and the LoRA of `source` (fp32 mode).

    Loaded from one checkpoint, the two would still differ: bitsandbytes quantises the bf16-rounded copy in
    bf16 mode, and a value next to a boundary between two NF4 levels takes the other one (about 1% of the
    codes of the tiny model, up to 26% of a layer's largest weight); PEFT rounds LoRA A's initial values to
    bf16 in bf16 mode. With this, what differs is only what bf16 mode is: the non-4-bit frozen weights
    rounded to bf16, and the compute.
    """
    import copy

    import bitsandbytes as bnb

    target_modules = dict(target.named_modules())
    with torch.no_grad():
        for name, module in source.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = target_modules[name].weight
                weight.data.copy_(module.weight.data)  # the NF4 codes
                state = copy.deepcopy(module.weight.quant_state)  # block scales (double-quantised)
                state.dtype = weight.quant_state.dtype  # dequantise into bf16, as bf16 mode does
                weight.quant_state = state
        target_params = dict(target.named_parameters())
        for name, param in source.named_parameters():
            if param.requires_grad:
                target_params[name].copy_(param)


@pytest.fixture(scope="module")
def policies():
    """{"fp32": ..., "bf16": ..., "tokenizer": ...}: the tiny 4-bit policy loaded in each mode, with one random
    adapter (B too, so adapter on != off and the LoRA path gets gradients) and the same 4-bit weights."""
    loaded = {}
    for dtype in ("fp32", "bf16"):
        loaded[dtype], loaded["tokenizer"] = load_policy(config(dtype), device="cpu")
    randomise_adapter(loaded["fp32"], 0.05, seed=3)
    share_weights(loaded["fp32"], loaded["bf16"])
    return loaded


@pytest.fixture(scope="module")
def batch(policies):
    """6 completions (2 prompts x 3) sampled by the bf16 policy with HF generate, collated as the trainer does."""
    sampler = HFSampler(
        policies["bf16"],
        policies["tokenizer"],
        SamplingSettings(temperature=1.0, max_completion_length=12),
    )
    prompt_ids = sampler.encode(PROMPTS)
    outputs = sampler.generate(prompt_ids, 3, seeds=[11, 12])
    padded = collate(prompt_ids, outputs, pad_id=policies["tokenizer"].pad_token_id)
    mask = padded["completion_mask"]
    return StepBatch(
        input_ids=padded["input_ids"],
        attention_mask=padded["attention_mask"],
        completion_lengths=padded["completion_lengths"],
        completion_mask=mask,
        loss_mask=mask,
        sampler_logp=padded["sampler_logp"],
        advantages=torch.zeros(len(outputs)),
        num_sequences=float(len(outputs)),
        num_tokens=float(mask.sum()),
        tokens_seen=0,
        metrics={},
    )


class MatmulDtypes(TorchDispatchMode):
    """Records the input dtypes of every matmul (and attention) op that runs while it is active and not paused."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: collections.Counter = collections.Counter()
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not self.paused and (name in MATMULS or "attention" in name):
            tensors = [a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()]
            if "attention" in name:
                # the [B, heads, L, d] operands (q, k, v; in the backward also grad_out and out), not the
                # [B, heads, L] log-sum-exp the flash backward gets from its forward (float32 by design)
                tensors = [t for t in tensors if t.dim() == 4]
            self.seen[(name, tuple(t.dtype for t in tensors))] += 1
        return func(*args, **(kwargs or {}))

    def not_bf16(self) -> list:
        return [op for op in self.seen if any(d != torch.bfloat16 for d in op[1])]


@pytest.fixture
def spies(monkeypatch):
    """(matmuls, kernel_calls, projection_inputs): the dispatch recorder (paused inside the kernel, which does
    its own float32 math), the (hidden, weight) dtypes each kernel call got, and the input dtypes each of the
    seven projection modules saw, per module name."""
    matmuls = MatmulDtypes()
    kernel_calls: list[tuple[torch.dtype, torch.dtype, torch.dtype]] = []
    real_kernel = models.forward.token_logprobs

    def kernel_spy(hidden, weight, *args, **kwargs):
        matmuls.paused = True
        try:
            result = real_kernel(hidden, weight, *args, **kwargs)
        finally:
            matmuls.paused = False
        logp = result[0] if isinstance(result, tuple) else result
        kernel_calls.append((hidden.dtype, weight.dtype, logp.dtype))
        return result

    monkeypatch.setattr(models.forward, "token_logprobs", kernel_spy)
    return matmuls, kernel_calls


def projection_hooks(model) -> tuple[dict[str, set], list]:
    """Forward pre-hooks on the 28 projection modules (7 per layer, the LoRA-wrapped ones): input dtypes seen."""
    seen: dict[str, set] = collections.defaultdict(set)
    handles = []
    for name, module in model.named_modules():
        if name.rsplit(".", 1)[-1] in PROJECTIONS:

            def hook(module, args, name=name):
                seen[name].add(args[0].dtype)

            handles.append(module.register_forward_pre_hook(hook))
    assert len(handles) == 7 * 4
    return seen, handles


# ------------------------------------------------------------------------------------------ what is in which dtype


def test_bf16_mode_keeps_frozen_weights_bf16_and_lora_float32(policies):
    model = policies["bf16"]
    kinds = collections.Counter()
    for name, param in model.named_parameters():
        if param.requires_grad:
            assert "lora_" in name and param.dtype == torch.float32, name
            kinds["lora"] += 1
        elif param.dtype.is_floating_point:  # norms, q/k/v biases, the embedding
            assert param.dtype == torch.bfloat16, name
            kinds["frozen"] += 1
        else:
            assert type(param).__name__ == "Params4bit", name
            kinds["4bit"] += 1
    # 28 adapted projections: A and B each; 4-bit weights; 9 norms + 12 biases + 1 embedding
    assert kinds == {"lora": 56, "4bit": 28, "frozen": 22}
    head = model.get_output_embeddings().weight
    assert head is model.get_input_embeddings().weight and head.dtype == torch.bfloat16  # still tied
    # fp32 mode as before: every float parameter float32
    assert {p.dtype for p in policies["fp32"].parameters() if p.dtype.is_floating_point} == {torch.float32}


def test_autocast_dtype_and_the_trainers_options():
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16
    assert autocast_dtype("fp32", "cpu") is None and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("fp16", "cpu") is None  # fp16 keeps its own scheme (no loss scaler here)
    options = logprob_options(
        config("bf16", temperature=0.9, logprob_backend="torch"), "cpu", entropy_grad=True
    )
    assert options == LogprobOptions(
        temperature=0.9, backend="torch", share_prompt=True, compute_dtype=torch.bfloat16, entropy_grad=True
    )
    assert logprob_options(config("fp32"), "cpu").compute_dtype is None
    with pytest.raises(ValueError, match="compute_dtype"):
        LogprobOptions(compute_dtype=torch.float32)
    with pytest.raises(ValueError, match="backend"):
        LogprobOptions(backend="cuda")


# ------------------------------------------------------------------------------------------ the passes of a step


@pytest.mark.parametrize("share_prompt", [True, False], ids=["shared-prompt", "row-by-row"])
def test_every_decoder_matmul_runs_in_bf16_and_the_kernel_gets_bf16(policies, batch, spies, share_prompt):
    """The old and reference passes (no grad), then the update's forward and backward, as the trainer calls
    them: all 28 projections see bf16 inputs, every matmul of the decoder (LoRA A and B included) and of its
    backward has bf16 inputs, each kernel call gets bf16 states and the bf16 lm_head and returns float32, and
    the LoRA parameters receive float32 gradients."""
    model = policies["bf16"]
    matmuls, kernel_calls = spies
    options = LogprobOptions(backend="torch", share_prompt=share_prompt, compute_dtype=torch.bfloat16)
    seen, handles = projection_hooks(model)
    try:
        with matmuls:
            old_logp, _ = no_grad_logprobs(model, batch, 4, options)  # two micro-batches
            with reference_model(model):
                ref_logp, _ = no_grad_logprobs(model, batch, 4, options)
            model.train()
            micro = batch.micro_batch(slice(0, 6))
            logp, entropy = batch_logprobs(
                model, micro.input_ids, micro.attention_mask, micro.completion_mask, options
            )
            model.zero_grad(set_to_none=True)
            (logp * micro.completion_mask).sum().backward()
    finally:
        for handle in handles:
            handle.remove()
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen.values()), dict(seen)
    assert len(seen) == 28
    assert sum(count for (name, _), count in matmuls.seen.items() if name in MATMULS) > 100
    assert any("attention" in name for name, _ in matmuls.seen)
    assert not matmuls.not_bf16(), matmuls.not_bf16()
    assert len(kernel_calls) == 5  # 2 old, 2 reference, 1 update
    assert set(kernel_calls) == {(torch.bfloat16, torch.bfloat16, torch.float32)}
    assert old_logp.dtype == ref_logp.dtype == logp.dtype == entropy.dtype == torch.float32
    lora = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for _, p in lora)
    assert all(p.grad.abs().sum() > 0 for n, p in lora if "lora_A" in n)  # B is random, so A gets a gradient
    model.zero_grad(set_to_none=True)


def test_hf_generate_runs_under_bf16_autocast(policies):
    """HF generate on the bf16 policy: its decoder matmuls are bf16 too (the LoRA ones included, which would
    otherwise run in float32: PEFT casts their input to the adapter's dtype)."""
    sampler = HFSampler(
        policies["bf16"], policies["tokenizer"], SamplingSettings(temperature=1.0, max_completion_length=4)
    )
    matmuls = MatmulDtypes()
    with matmuls:
        sampler.generate(sampler.encode(PROMPTS[:1]), 2, seeds=[5])
    assert sum(matmuls.seen.values()) > 50
    assert not matmuls.not_bf16(), matmuls.not_bf16()


def test_fp32_mode_has_no_16_bit_matmul(policies, batch, spies):
    """fp32 mode as before: no autocast, every decoder matmul float32, the kernel gets float32."""
    matmuls, kernel_calls = spies
    options = LogprobOptions(backend="torch", compute_dtype=None)
    with matmuls:
        no_grad_logprobs(policies["fp32"], batch, 6, options)
    assert matmuls.seen and all(set(dtypes) == {torch.float32} for _, dtypes in matmuls.seen)
    assert kernel_calls == [(torch.float32, torch.float32, torch.float32)]


# ------------------------------------------------------------------------------------------ how far from fp32


def test_bf16_logprobs_agree_with_fp32_within_the_measured_tolerance(policies, batch):
    """Per-token log-probs of the same tokens under the same weights, bf16 mode vs fp32 mode, adapter on and
    off: within BF16_VS_FP32_MAX (max) and BF16_VS_FP32_MEAN (mean) over the real tokens; not identical."""
    import bitsandbytes as bnb

    fp32_modules, bf16_modules = (
        dict(policies["fp32"].named_modules()),
        dict(policies["bf16"].named_modules()),
    )
    four_bit = [name for name, m in fp32_modules.items() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(four_bit) == 28
    for name in four_bit:  # the same dequantised weights, rounded to bf16 in bf16 mode
        weights = [
            bnb.functional.dequantize_4bit(m.weight.data, m.weight.quant_state)
            for m in (fp32_modules[name], bf16_modules[name])
        ]
        assert weights[1].dtype == torch.bfloat16 and torch.equal(weights[0].to(torch.bfloat16), weights[1])
    lora = [
        (p, policies["bf16"].get_parameter(n)) for n, p in policies["fp32"].named_parameters() if "lora_" in n
    ]
    assert len(lora) == 56 and all(torch.equal(a, b) for a, b in lora)
    mask = batch.completion_mask.bool()
    assert mask.sum() >= 30

    def logprobs(dtype: str) -> torch.Tensor:
        options = LogprobOptions(backend="torch", compute_dtype=autocast_dtype(dtype, "cpu"))
        model = policies[dtype]
        model.eval()
        with torch.no_grad():
            logp = completion_logprobs(
                model, batch.input_ids, batch.attention_mask, batch.completion_mask, options
            )
            with reference_model(model):
                ref = completion_logprobs(
                    model, batch.input_ids, batch.attention_mask, batch.completion_mask, options
                )
        return logp[mask], ref[mask]

    (fp32_logp, fp32_ref), (bf16_logp, bf16_ref) = logprobs("fp32"), logprobs("bf16")
    for bf16, fp32 in ((bf16_logp, fp32_logp), (bf16_ref, fp32_ref)):
        difference = (bf16 - fp32).abs()
        assert 0 < difference.max().item() < BF16_VS_FP32_MAX
        assert difference.mean().item() < BF16_VS_FP32_MEAN


# ------------------------------------------------------------------------------------------ a short run


@pytest.mark.slow
def test_a_short_bf16_training_run_ends_finite_with_a_moved_adapter(tmp_path):
    from safetensors.torch import load_file

    from grpo.metrics import read_metrics
    from grpo.trainer import train

    args = [
        *tiny(), "--dtype", "bf16", "--gradient_checkpointing", "true", "--per_device_train_batch_size", "2",
        "--max_completion_length", "12", "--learning_rate", "1e-3", "--warmup_ratio", "0.0",
        "--max_steps", "2", "--save_steps", "2", "--seed", "3", "--output_dir", str(tmp_path),
    ]  # fmt: skip
    final = train(load_config(args))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    adapter = load_file(final / "adapter_model.safetensors")
    lora_b = [t for name, t in adapter.items() if "lora_B" in name]
    assert lora_b and all(t.dtype == torch.float32 for t in adapter.values())  # float32 master weights
    assert any(t.abs().sum() > 0 for t in lora_b)  # B starts at 0: the two updates moved it
