"""logprob_kernels.logprobs: values, gradients and entropy of every backend against a float64 reference.

The Triton kernels run natively on CUDA and, without a GPU, under Triton's CPU interpreter. Triton
only turns the interpreter on when TRITON_INTERPRET=1 is set before it is first imported, and other
test modules (peft, transformers, bitsandbytes) import triton at collection time, so on a CPU machine
`test_kernel_cases_under_cpu_interpreter_in_subprocess` re-runs this file's triton cases in a child pytest with
that variable set; in this process those cases skip, pointing to that test.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from logprob_kernels.logprobs import token_entropy, token_logprobs

REPO_ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BACKENDS = ["naive", "torch", "triton"]

# Stated tolerances, against float64 math on the same (already rounded) inputs. Every backend forms float32
# logits from 16-bit inputs (exact products, float32 sums, never rounded to 16 bits), so the log-probs of bf16
# and fp16 inputs are as close as float32's: measured at most 1.3e-6 over these tests' shapes, all backends
# (rounding the logits to bf16 first, as the kernels did before, gave up to 1.4e-2). The gradients come back
# in the inputs' dtype: measured at most 8.4e-3 relative in bf16 (2^-8 = 3.9e-3 per rounding), 8.2e-4 in fp16.
TOL = {
    torch.float32: {"logp_atol": 1e-4, "grad_rel": 1e-4},
    torch.bfloat16: {"logp_atol": 1e-5, "grad_rel": 2e-2},
    torch.float16: {"logp_atol": 1e-5, "grad_rel": 5e-3},
}


def _interpreter_active() -> bool:
    try:
        from logprob_kernels.logprobs_triton import interpreter_active
    except ImportError:  # triton not installed
        return False
    return interpreter_active()


def _skip_unless_runnable(backend: str, device: str) -> None:
    if backend != "triton":
        return
    pytest.importorskip("triton")
    if device == "cpu" and not _interpreter_active():
        pytest.skip(
            "CPU triton cases run in test_kernel_cases_under_cpu_interpreter_in_subprocess (TRITON_INTERPRET=1)"
        )


def _reference(hidden, weight, targets, temperature):
    """float64 log-probs and entropy from the (already rounded) inputs: the independent reference."""
    logits = hidden.double() @ weight.double().T / temperature
    log_probs = torch.log_softmax(logits, dim=-1)
    logp = log_probs.gather(-1, targets[:, None]).squeeze(-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return logp, entropy


def _make_inputs(num_tokens, hidden_size, vocab, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, hidden_size, generator=gen)
    # weight ~ N(0, 2 / H): logits of order 1, like a trained lm_head, with a few confident tokens.
    weight = torch.randn(vocab, hidden_size, generator=gen) * math.sqrt(2.0 / hidden_size)
    targets = torch.randint(0, vocab, (num_tokens,), generator=gen)
    grad_out = torch.randn(num_tokens, generator=gen)
    return hidden.to(device, dtype), weight.to(device, dtype), targets.to(device), grad_out.to(device)


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


# ----------------------------------------------------------------------------------------------------
# Hand-worked values
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_hand_worked_example(backend):
    """V = 3, weight = identity, so the logits are the hidden state itself.

    logits = [0, 0, 1], T = 1: p = [1, 1, e] / (2 + e), logp[target 2] = 1 - log(2 + e) = -0.55144.
    d logp / d hidden = onehot - p = [-1/(2+e), -1/(2+e), 2/(2+e)] = [-0.21194, -0.21194, 0.42388].
    T = 2: logits/T = [0, 0, 0.5], logp = 0.5 - log(2 + e^0.5) = -0.86301,
    gradient = (onehot - p) / T with p = [1, 1, e^0.5] / (2 + e^0.5).
    """
    _skip_unless_runnable(backend, "cpu")
    weight = torch.eye(3)
    targets = torch.tensor([2])
    hidden = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    logp = token_logprobs(hidden, weight, targets, backend=backend)
    logp.sum().backward()
    e = math.e
    assert logp.dtype == torch.float32
    assert logp.item() == pytest.approx(1 - math.log(2 + e), abs=1e-6)
    expected_grad = torch.tensor([[-1 / (2 + e), -1 / (2 + e), 2 / (2 + e)]])
    torch.testing.assert_close(hidden.grad, expected_grad, atol=1e-6, rtol=0)

    hidden2 = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
    logp2 = token_logprobs(hidden2, weight, targets, temperature=2.0, backend=backend)
    logp2.sum().backward()
    s = 2 + math.exp(0.5)
    assert logp2.item() == pytest.approx(0.5 - math.log(s), abs=1e-6)
    expected_grad2 = torch.tensor([[-1 / s, -1 / s, 1 - math.exp(0.5) / s]]) / 2
    torch.testing.assert_close(hidden2.grad, expected_grad2, atol=1e-6, rtol=0)


def test_entropy_hand_worked():
    """Logits [1, 1, -30]: two equal tokens and one negligible, entropy = log 2 to ~1e-12."""
    hidden = torch.tensor([[1.0, 1.0, -30.0], [0.0, 0.0, 0.0]])
    entropy = token_entropy(hidden, torch.eye(3), backend="torch")
    torch.testing.assert_close(entropy, torch.tensor([math.log(2), math.log(3)]), atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Against the float64 reference: every backend, odd shapes, temperature, dtypes, weight grad on/off
# ----------------------------------------------------------------------------------------------------

# (M, H, V): M = 1; M = 37 (not a multiple of the chunk of 16 nor of the 16-row tile);
# H = 40 (not a power of two nor a multiple of the 32-wide K tile); V = 300 (not a multiple of 64).
SHAPES = [(1, 40, 300), (37, 40, 300)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-H{}-V{}".format(*s))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_W", "trained_W"])
def test_values_and_gradients_match_float64_reference(device, backend, shape, dtype, weight_grad):
    _skip_unless_runnable(backend, device)
    num_tokens, hidden_size, vocab = shape
    temperature = 0.7
    hidden, weight, targets, grad_out = _make_inputs(num_tokens, hidden_size, vocab, dtype, device)
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)

    logp, entropy = token_logprobs(
        hidden, weight, targets, temperature, backend, chunk_size=16, return_entropy=True
    )
    (logp * grad_out).sum().backward()

    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    ref_logp, ref_entropy = _reference(hidden64, weight64, targets, temperature)
    (ref_logp * grad_out.double()).sum().backward()

    tol = TOL[dtype]
    assert logp.shape == (num_tokens,) and logp.dtype == torch.float32
    assert (logp.double() - ref_logp.detach()).abs().max().item() < tol["logp_atol"]
    assert (entropy.double() - ref_entropy.detach()).abs().max().item() < tol["logp_atol"]
    assert entropy.grad_fn is None
    assert hidden.grad.dtype == dtype and hidden.grad.shape == hidden.shape
    assert _rel_err(hidden.grad, hidden64.grad) < tol["grad_rel"]
    if weight_grad:
        assert weight.grad.dtype == dtype
        assert _rel_err(weight.grad, weight64.grad) < tol["grad_rel"]
    else:
        assert weight.grad is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_float16_and_temperature_one(device, backend):
    _skip_unless_runnable(backend, device)
    hidden, weight, targets, grad_out = _make_inputs(20, 48, 257, torch.float16, device, seed=3)
    hidden.requires_grad_(True)
    logp = token_logprobs(hidden, weight, targets, 1.0, backend, chunk_size=7)
    (logp * grad_out).sum().backward()
    hidden64 = hidden.detach().double().requires_grad_(True)
    ref_logp, _ = _reference(hidden64, weight.double(), targets, 1.0)
    (ref_logp * grad_out.double()).sum().backward()
    assert (logp.double() - ref_logp.detach()).abs().max().item() < TOL[torch.float16]["logp_atol"]
    assert _rel_err(hidden.grad, hidden64.grad) < TOL[torch.float16]["grad_rel"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_matches_reference_and_logprobs_entropy(device, backend):
    _skip_unless_runnable(backend, device)
    hidden, weight, targets, _ = _make_inputs(23, 40, 300, torch.float32, device, seed=1)
    # Sharpen a few rows so the entropy spans near-zero to near-log(V).
    hidden[:5] *= 20.0
    entropy = token_entropy(hidden, weight, temperature=1.3, backend=backend, chunk_size=8)
    _, ref_entropy = _reference(hidden, weight, targets, 1.3)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-4, rtol=0)
    _, entropy_from_logp = token_logprobs(
        hidden, weight, targets, 1.3, backend, chunk_size=8, return_entropy=True
    )
    torch.testing.assert_close(entropy_from_logp, entropy, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_no_grad_path_equals_grad_path(backend):
    """Under no_grad (old / reference log-probs) nothing is saved and the values are the same."""
    _skip_unless_runnable(backend, "cpu")
    # V = 200 with 64-wide tiles cut in 3 vocabulary slices of 128: the last slice is empty.
    hidden, weight, targets, _ = _make_inputs(19, 40, 200, torch.float32, "cpu", seed=2)
    with torch.no_grad():
        frozen = token_logprobs(hidden.requires_grad_(True), weight, targets, 0.9, backend, chunk_size=5)
    assert frozen.grad_fn is None
    tracked = token_logprobs(hidden, weight, targets, 0.9, backend, chunk_size=5)
    assert tracked.grad_fn is not None
    torch.testing.assert_close(frozen, tracked.detach(), atol=1e-6, rtol=0)
    ref_logp, _ = _reference(hidden.detach(), weight, targets, 0.9)
    torch.testing.assert_close(frozen.double(), ref_logp, atol=1e-5, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 1000])
def test_torch_backend_any_chunk_size(chunk_size):
    hidden, weight, targets, grad_out = _make_inputs(16, 24, 130, torch.float32, "cpu", seed=4)
    hidden.requires_grad_(True)
    logp = token_logprobs(hidden, weight, targets, 0.8, "torch", chunk_size=chunk_size)
    (logp * grad_out).sum().backward()
    hidden64 = hidden.detach().double().requires_grad_(True)
    ref_logp, _ = _reference(hidden64, weight, targets, 0.8)
    (ref_logp * grad_out.double()).sum().backward()
    torch.testing.assert_close(logp.double(), ref_logp.detach(), atol=1e-5, rtol=0)
    assert _rel_err(hidden.grad, hidden64.grad) < 1e-5


def test_gradcheck_torch_backend_float64():
    """torch.autograd.gradcheck (finite differences) on both gradient paths of the chunked Function."""
    hidden, weight, targets, _ = _make_inputs(5, 6, 11, torch.float64, "cpu", seed=5)
    hidden.requires_grad_(True)
    # Frozen weight: the gradient is computed in the forward.
    assert torch.autograd.gradcheck(
        lambda h: token_logprobs(h, weight, targets, 0.6, "torch", chunk_size=2), (hidden,)
    )
    # Trained weight: lse saved, chunks recomputed in the backward.
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda h, w: token_logprobs(h, w, targets, 0.6, "torch", chunk_size=2), (hidden, weight)
    )


# ----------------------------------------------------------------------------------------------------
# Entropy with a gradient (entropy_grad=True, for an entropy bonus in the loss)
# ----------------------------------------------------------------------------------------------------


def _reference_loss_and_grads(hidden, weight, targets, temperature, logp_weight, entropy_weight):
    """float64 plain autograd of (logp_weight * logp).sum() + (entropy_weight * entropy).sum()."""
    hidden64 = hidden.detach().double().requires_grad_(True)
    weight64 = weight.detach().double().requires_grad_(True)
    ref_logp, ref_entropy = _reference(hidden64, weight64, targets, temperature)
    loss = (logp_weight.double() * ref_logp).sum() + (entropy_weight.double() * ref_entropy).sum()
    loss.backward()
    return ref_logp.detach(), ref_entropy.detach(), hidden64.grad, weight64.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_gradient_hand_worked(backend):
    """The docstring example of token_logprobs: V = 3, weight = identity, logits [0, 0, 1], T = 1.

    p = [1, 1, e] / (2 + e) = [0.21194, 0.21194, 0.57612], log p = [-1.55144, -1.55144, -0.55144],
    entropy = -sum p log p = log(2 + e) - e / (2 + e) = 0.97533,
    d entropy / d z = -p (log p + entropy) = [0.12210, 0.12210, -0.24421] (sums to 0: a shift of every
    logit leaves the entropy unchanged). T = 2 divides the logits and the gradient by 2:
    logits / T = [0, 0, 0.5], and d entropy / d hidden = -p (log p + entropy) / 2 with that p.
    """
    _skip_unless_runnable(backend, "cpu")
    weight, targets = torch.eye(3), torch.tensor([2])
    for temperature, expected_entropy, expected_grad in [
        (1.0, 0.97533, [0.12210, 0.12210, -0.24421]),
        (2.0, None, None),
    ]:
        hidden = torch.tensor([[0.0, 0.0, 1.0]], requires_grad=True)
        _, entropy = token_logprobs(
            hidden, weight, targets, temperature, backend, return_entropy=True, entropy_grad=True
        )
        entropy.sum().backward()
        z = [0.0, 0.0, 1.0 / temperature]
        total = sum(math.exp(v) for v in z)
        p = [math.exp(v) / total for v in z]
        entropy_by_hand = -sum(pv * math.log(pv) for pv in p)
        grad_by_hand = [-pv * (math.log(pv) + entropy_by_hand) / temperature for pv in p]
        if expected_entropy is not None:  # the rounded numbers of the docstring
            assert entropy_by_hand == pytest.approx(expected_entropy, abs=1e-5)
            assert grad_by_hand == pytest.approx(expected_grad, abs=1e-5)
        assert entropy.item() == pytest.approx(entropy_by_hand, abs=1e-6)
        torch.testing.assert_close(hidden.grad, torch.tensor([grad_by_hand]), atol=1e-6, rtol=0)


def test_minus_logit_grad_with_entropy_worked_example():
    """The docstring example of the torch backend's helper: p = [0.8, 0.2], target 0, both upstream grads 1.

    entropy = -(0.8 log 0.8 + 0.2 log 0.2) = 0.50040; log p + entropy = [0.27726, -1.10904];
    -(d loss / d z) = p * (1 + log p + entropy) - onehot = [0.02181, -0.02181]. A uniform p instead
    (log p = -log 2 = -entropy) leaves only the logp term: p - onehot = [-0.5, 0.5].
    """
    from logprob_kernels.logprobs_torch import _minus_logit_grad_with_entropy

    one = torch.ones(1, dtype=torch.float64)
    entropy = -(0.8 * math.log(0.8) + 0.2 * math.log(0.2))
    assert entropy == pytest.approx(0.50040, abs=1e-5)
    log_p = torch.tensor([[0.8, 0.2]], dtype=torch.float64).log()
    result = _minus_logit_grad_with_entropy(
        log_p, torch.tensor([[0]]), one, torch.tensor([entropy], dtype=torch.float64), one
    )
    expected = [0.8 * (1 + math.log(0.8) + entropy) - 1, 0.2 * (1 + math.log(0.2) + entropy)]
    assert expected == pytest.approx([0.02181, -0.02181], abs=1e-5)
    torch.testing.assert_close(result, torch.tensor([expected], dtype=torch.float64), atol=1e-12, rtol=0)
    uniform = torch.full((1, 2), -math.log(2), dtype=torch.float64)
    result = _minus_logit_grad_with_entropy(
        uniform, torch.tensor([[0]]), one, torch.tensor([math.log(2)], dtype=torch.float64), one
    )
    torch.testing.assert_close(result, torch.tensor([[-0.5, 0.5]], dtype=torch.float64), atol=1e-12, rtol=0)


# naive computes in float32 whatever the input; triton takes no float64: both against float64 at
# float32 precision. torch runs in float64 end to end: agreement to rounding.
ENTROPY_GRAD_TOL = {"naive": 1e-5, "torch": 1e-10, "triton": 1e-5}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_W", "trained_W"])
def test_entropy_grad_matches_float64_autograd(backend, weight_grad):
    """Value and gradient of (w1 * logp).sum() + (w2 * entropy).sum() w.r.t. hidden and weight, T = 0.7,
    several chunks, a few near-one-hot rows (p underflows to 0 in most columns there)."""
    _skip_unless_runnable(backend, "cpu")
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, targets, logp_weight = _make_inputs(37, 40, 300, dtype, "cpu", seed=7)
    hidden[:3] *= 20.0
    entropy_weight = torch.randn(37, generator=torch.Generator().manual_seed(8))
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)

    logp, entropy = token_logprobs(
        hidden, weight, targets, 0.7, backend, chunk_size=8, return_entropy=True, entropy_grad=True
    )
    assert entropy.grad_fn is not None and entropy.dtype == logp.dtype and entropy.shape == (37,)
    ((logp_weight.to(logp.dtype) * logp).sum() + (entropy_weight.to(logp.dtype) * entropy).sum()).backward()
    ref_logp, ref_entropy, ref_d_hidden, ref_d_weight = _reference_loss_and_grads(
        hidden, weight, targets, 0.7, logp_weight, entropy_weight
    )

    tol = ENTROPY_GRAD_TOL[backend]
    assert _rel_err(logp.detach(), ref_logp) < tol
    assert _rel_err(entropy.detach(), ref_entropy) < tol
    assert hidden.grad.dtype == dtype
    assert _rel_err(hidden.grad, ref_d_hidden) < tol
    if weight_grad:
        assert _rel_err(weight.grad, ref_d_weight) < tol
    else:
        assert weight.grad is None


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_W", "trained_W"])
def test_entropy_grad_bfloat16(backend, weight_grad):
    """16-bit inputs: the logits gradient is rounded to bf16 before the big products, as for logp alone."""
    _skip_unless_runnable(backend, "cpu")
    hidden, weight, targets, logp_weight = _make_inputs(37, 40, 300, torch.bfloat16, "cpu", seed=9)
    entropy_weight = torch.randn(37, generator=torch.Generator().manual_seed(10))
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    logp, entropy = token_logprobs(
        hidden, weight, targets, 0.7, backend, chunk_size=16, return_entropy=True, entropy_grad=True
    )
    ((logp_weight * logp).sum() + (entropy_weight * entropy).sum()).backward()
    _, ref_entropy, ref_d_hidden, ref_d_weight = _reference_loss_and_grads(
        hidden, weight, targets, 0.7, logp_weight, entropy_weight
    )
    tol = TOL[torch.bfloat16]
    assert (entropy.detach().double() - ref_entropy).abs().max().item() < tol["logp_atol"]
    assert hidden.grad.dtype == torch.bfloat16
    assert _rel_err(hidden.grad, ref_d_hidden) < tol["grad_rel"]
    if weight_grad:
        assert _rel_err(weight.grad, ref_d_weight) < tol["grad_rel"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_grad_with_only_one_output_in_the_loss(backend):
    """Entropy alone in the loss (logp gets no gradient), and logp alone with entropy_grad=True (the entropy
    gets none): each equals the reference, and the second equals the entropy_grad=False gradient."""
    _skip_unless_runnable(backend, "cpu")
    dtype = torch.float32 if backend == "triton" else torch.float64
    hidden, weight, targets, grad_out = _make_inputs(19, 40, 200, dtype, "cpu", seed=11)
    zeros = torch.zeros(19)
    tol = ENTROPY_GRAD_TOL[backend]

    entropy_only = hidden.clone().requires_grad_(True)
    _, entropy = token_logprobs(
        entropy_only, weight, targets, 1.3, backend, chunk_size=5, return_entropy=True, entropy_grad=True
    )
    (grad_out.to(entropy.dtype) * entropy).sum().backward()
    _, _, ref_d_hidden, _ = _reference_loss_and_grads(hidden, weight, targets, 1.3, zeros, grad_out)
    assert _rel_err(entropy_only.grad, ref_d_hidden) < tol

    logp_only = hidden.clone().requires_grad_(True)
    logp, _ = token_logprobs(
        logp_only, weight, targets, 1.3, backend, chunk_size=5, return_entropy=True, entropy_grad=True
    )
    (grad_out.to(logp.dtype) * logp).sum().backward()
    _, _, ref_d_hidden, _ = _reference_loss_and_grads(hidden, weight, targets, 1.3, grad_out, zeros)
    assert _rel_err(logp_only.grad, ref_d_hidden) < tol

    detached = hidden.clone().requires_grad_(True)
    logp_plain, _ = token_logprobs(detached, weight, targets, 1.3, backend, chunk_size=5, return_entropy=True)
    (grad_out.to(logp_plain.dtype) * logp_plain).sum().backward()
    assert _rel_err(logp_only.grad, detached.grad.double()) < tol


def test_gradcheck_entropy_grad_torch_backend_float64():
    """torch.autograd.gradcheck (finite differences) of both outputs, frozen and trained weight."""
    hidden, weight, targets, _ = _make_inputs(5, 6, 11, torch.float64, "cpu", seed=12)
    hidden.requires_grad_(True)

    def both(h, w):
        return token_logprobs(
            h, w, targets, 0.6, "torch", chunk_size=2, return_entropy=True, entropy_grad=True
        )

    assert torch.autograd.gradcheck(lambda h: both(h, weight), (hidden,))
    weight.requires_grad_(True)
    assert torch.autograd.gradcheck(both, (hidden, weight))


@pytest.mark.parametrize("backend", BACKENDS)
def test_entropy_grad_off_keeps_the_entropy_detached(backend):
    """entropy_grad=False (the default): the entropy has no graph, even under grad with hidden requiring grad;
    entropy_grad without return_entropy is an error; under no_grad entropy_grad changes nothing."""
    _skip_unless_runnable(backend, "cpu")
    hidden, weight, targets, _ = _make_inputs(6, 8, 70, torch.float32, "cpu", seed=13)
    hidden.requires_grad_(True)
    logp, entropy = token_logprobs(hidden, weight, targets, 0.9, backend, return_entropy=True)
    assert logp.requires_grad and not entropy.requires_grad and entropy.grad_fn is None
    with pytest.raises(ValueError, match="entropy_grad=True needs return_entropy=True"):
        token_logprobs(hidden, weight, targets, 0.9, backend, entropy_grad=True)
    with torch.no_grad():
        logp_nograd, entropy_nograd = token_logprobs(
            hidden, weight, targets, 0.9, backend, return_entropy=True, entropy_grad=True
        )
    assert not logp_nograd.requires_grad and not entropy_nograd.requires_grad
    torch.testing.assert_close(entropy_nograd, entropy, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Memory: the torch backend never allocates an [M, V] tensor (and the probe does see the naive one)
# ----------------------------------------------------------------------------------------------------


def _storages(tree) -> set[int]:
    leaves = torch.utils._pytree.tree_leaves(tree)
    return {t.untyped_storage().data_ptr() for t in leaves if isinstance(t, torch.Tensor)}


class _LargestTensorProbe(TorchDispatchMode):
    """Records the largest new tensor any aten op returns while active (forward and backward).

    Views and in-place results share an input's storage and allocate nothing, so they are skipped.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = _storages((args, kwargs))
        for tensor in torch.utils._pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, tensor.numel())
        return out


def _saved_numel_besides_inputs(fn, inputs):
    """Total elements autograd saves for backward, not counting the inputs themselves."""
    input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
    saved = []

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in input_ptrs:
            saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(saved)


@pytest.mark.parametrize("entropy_grad", [False, True], ids=["logp", "logp+entropy_grad"])
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_W", "trained_W"])
@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_torch_backend_never_holds_M_by_V(backend, weight_grad, entropy_grad):
    num_tokens, hidden_size, vocab, chunk = 256, 32, 2000, 16
    hidden, weight, targets, grad_out = _make_inputs(
        num_tokens, hidden_size, vocab, torch.float32, "cpu", seed=6
    )
    hidden.requires_grad_(True)
    weight.requires_grad_(weight_grad)
    full = num_tokens * vocab

    def forward():
        if not entropy_grad:
            return token_logprobs(hidden, weight, targets, 0.9, backend, chunk_size=chunk)
        logp, entropy = token_logprobs(
            hidden, weight, targets, 0.9, backend, chunk_size=chunk, return_entropy=True, entropy_grad=True
        )
        return logp + 0.01 * entropy  # an entropy bonus: both outputs reach the loss

    with _LargestTensorProbe() as probe:
        logp, saved = _saved_numel_besides_inputs(forward, [hidden, weight, targets])
        (logp * grad_out).sum().backward()
    if backend == "naive":  # the probe can fail: it sees the reference's [M, V] logits and saved softmax
        assert probe.largest >= full and saved >= full
        return
    # Largest allocation: one [chunk, V] buffer, or d_weight [V, H] itself when W is trained.
    assert probe.largest == max(chunk * vocab, vocab * hidden_size if weight_grad else 0)
    assert probe.largest < full // 4
    # Saved for backward: lse [M] (recompute), or d logp / d hidden [M, H] (frozen W: gradient in forward);
    # with entropy_grad always the recompute path, with the entropy [M] besides lse [M].
    if entropy_grad:
        assert saved == 2 * num_tokens
    else:
        assert saved == (num_tokens if weight_grad else num_tokens * hidden_size)


# ----------------------------------------------------------------------------------------------------
# 16-bit inputs (bf16 mode), zero tokens, autocast around the call
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_give_float32_logits_never_rounded_to_bf16(backend):
    """bf16 hidden states and weight with logits of about +-25, where bf16 keeps steps of 0.125: the log-probs
    are those of the exact float32 logits (float64 reference within 1e-5), while rounding the logits to bf16
    first would move them by more than 1e-2 (checked here, so this test can tell the two apart)."""
    _skip_unless_runnable(backend, "cpu")
    hidden, weight, targets, _ = _make_inputs(24, 64, 300, torch.float32, "cpu", seed=21)
    hidden = (hidden * 8.0).to(torch.bfloat16)  # logits ~ N(0, 8^2 * 2): many beyond 16 in size
    weight = weight.to(torch.bfloat16)
    logp = token_logprobs(hidden, weight, targets, 1.0, backend, chunk_size=8)
    ref_logp, _ = _reference(hidden, weight, targets, 1.0)
    assert logp.dtype == torch.float32
    assert (logp.double() - ref_logp).abs().max().item() < 1e-5
    rounded_logits = (hidden @ weight.T).float()  # a bf16 matmul: float32 inside, bf16 out
    rounded = torch.log_softmax(rounded_logits, -1).gather(1, targets[:, None]).squeeze(1)
    assert (rounded.double() - ref_logp).abs().max().item() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_grad", [False, True], ids=["frozen_W", "trained_W"])
def test_zero_tokens(backend, weight_grad):
    """M = 0 (a micro-batch with nothing to score): empty float32 log-probs and entropies, and a backward that
    gives an empty d_hidden and a zero d_weight, on every backend (the triton path divided by zero once)."""
    _skip_unless_runnable(backend, "cpu")
    hidden = torch.zeros(0, 40, dtype=torch.bfloat16, requires_grad=True)
    weight = torch.randn(300, 40).to(torch.bfloat16).requires_grad_(weight_grad)
    targets = torch.zeros(0, dtype=torch.long)
    logp, entropy = token_logprobs(hidden, weight, targets, 0.7, backend, return_entropy=True)
    assert logp.shape == entropy.shape == (0,) and logp.dtype == entropy.dtype == torch.float32
    logp.sum().backward()
    assert hidden.grad.shape == (0, 40)
    if weight_grad:
        assert weight.grad.shape == weight.shape and not weight.grad.any()
    with torch.no_grad():
        assert token_logprobs(hidden, weight, targets, 0.7, backend).shape == (0,)


def test_triton_vocabulary_splits_on_a_gpu_with_zero_tokens(monkeypatch):
    """The launch arithmetic of a 132-SM GPU: 4 x 132 programs wanted; M = 6,144 tokens make 48 blocks of
    128, so cdiv(528, 48) = 11 vocabulary slices; M = 0 is counted as one block (528 slices, below the
    cdiv(151,936, 256) = 594 cap) instead of dividing by zero."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from logprob_kernels import logprobs_triton

    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132)
    )
    gpu = torch.device("cuda")
    assert logprobs_triton._num_vocab_splits(6144, 151_936, gpu) == 11
    assert logprobs_triton._num_vocab_splits(0, 151_936, gpu) == 528


def test_triton_dots_fp32_ieee_and_16_bit_on_tensor_cores():
    """float32 tiles multiply in true fp32 ("ieee"); bf16 / fp16 tiles never ask for "ieee" (the tensor-core MMA
    with its float32 accumulator); only the CPU interpreter upcasts 16-bit tiles (its 16-bit dot is wrong)."""
    pytest.importorskip("triton")
    from logprob_kernels.logprobs_triton import _dot_options

    assert _dot_options(torch.float32) == {"DOT_PRECISION": "ieee", "UPCAST_TILES": False}
    for dtype in (torch.bfloat16, torch.float16):
        options = _dot_options(dtype)
        assert options["DOT_PRECISION"] != "ieee"
        assert options["UPCAST_TILES"] == _interpreter_active()


@pytest.mark.parametrize("backend", ["naive", "torch"])
def test_an_enclosing_autocast_changes_nothing(backend):
    """Called inside ``torch.autocast(bfloat16)`` (a caller's forward region), the kernel still computes its
    float32 logits in float32: the same numbers as outside, values and gradient."""
    hidden, weight, targets, grad_out = _make_inputs(13, 40, 300, torch.float32, "cpu", seed=22)
    outside_hidden = hidden.clone().requires_grad_(True)
    expected = token_logprobs(outside_hidden, weight, targets, 0.8, backend, chunk_size=4)
    (expected * grad_out).sum().backward()
    inside_hidden = hidden.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = token_logprobs(inside_hidden, weight, targets, 0.8, backend, chunk_size=4)
    (got * grad_out).sum().backward()
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, atol=0, rtol=0)
    torch.testing.assert_close(inside_hidden.grad, outside_hidden.grad, atol=0, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------


def test_bad_inputs_raise_clear_errors():
    hidden, weight, targets, _ = _make_inputs(4, 8, 10, torch.float32, "cpu")
    with pytest.raises(ValueError, match="unknown backend 'cuda'.*auto, torch, triton, naive"):
        token_logprobs(hidden, weight, targets, backend="cuda")
    with pytest.raises(ValueError, match="disagree on H"):
        token_logprobs(hidden, weight[:, :5], targets)
    with pytest.raises(ValueError, match="length M = 4"):
        token_logprobs(hidden, weight, targets[:3])
    with pytest.raises(ValueError, match=r"token ids in \[0, V = 10\).*\[-100, "):
        token_logprobs(hidden, weight, torch.tensor([1, 2, -100, 3]))
    with pytest.raises(ValueError, match="temperature must be > 0"):
        token_logprobs(hidden, weight, targets, temperature=0.0)
    with pytest.raises(ValueError, match="same dtype"):
        token_logprobs(hidden, weight.double(), targets)
    with pytest.raises(ValueError, match="integer token ids"):
        token_logprobs(hidden, weight, targets.float())
    with pytest.raises(ValueError, match="chunk_size"):
        token_logprobs(hidden, weight, targets, chunk_size=0)


def test_auto_backend_and_cpu_error_without_interpreter():
    hidden, weight, targets, _ = _make_inputs(4, 8, 10, torch.float32, "cpu")
    auto = token_logprobs(hidden, weight, targets, backend="auto")
    torch.testing.assert_close(auto, token_logprobs(hidden, weight, targets, backend="torch"))
    pytest.importorskip("triton")
    if _interpreter_active():
        pytest.skip("the interpreter is on here, so triton does run on CPU tensors")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        token_logprobs(hidden, weight, targets, backend="triton")


# ----------------------------------------------------------------------------------------------------
# The triton cases on CPU: a child pytest with TRITON_INTERPRET=1 set before triton is imported
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_kernel_cases_under_cpu_interpreter_in_subprocess(tmp_path):
    """The triton cases of this file, run by a child pytest with TRITON_INTERPRET=1; every case must pass.

    The child writes a JUnit XML report; a failure here names the kernel cases that failed or did not run.
    """
    pytest.importorskip("triton")
    if _interpreter_active():
        pytest.skip("the interpreter is already on in this process: the triton cases ran directly")
    selection = "triton and not cuda"
    expected = {
        item.split("::", 1)[1]
        for item in subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "--co",
                "-q",
                "-p",
                "no:cacheprovider",
                __file__,
                "-k",
                selection,
            ],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=300,
        ).stdout.splitlines()
        if "::" in item
    }
    # hand-worked, 8 reference cases, fp16, entropy, no-grad; entropy_grad: hand-worked, 2 float64-reference,
    # 2 bf16, one-output, detached; bf16 logits unrounded, 2 zero-token cases
    assert len(expected) >= 22, f"the triton cases were not collected: {sorted(expected)}"
    env = dict(os.environ, TRITON_INTERPRET="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    report = tmp_path / "triton-cases.xml"
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", __file__]
    child = subprocess.run(
        [*cmd, "-k", selection], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert report.is_file(), (
        f"the child pytest wrote no report:\n{child.stdout[-3000:]}{child.stderr[-2000:]}"
    )
    outcome = {}
    for case in ET.parse(report).getroot().iter("testcase"):
        problems = [c.tag for c in case if c.tag in ("failure", "error", "skipped")]
        outcome[case.get("name")] = problems[0] if problems else "passed"
    not_passed = {
        name: outcome.get(name, "did not run") for name in expected if outcome.get(name) != "passed"
    }
    assert not not_passed, f"triton kernel cases under the interpreter: {not_passed}\n{child.stdout[-3000:]}"
