"""The trainer hands every objective option to the math (issue 23): test_objectives.py only sees a finite loss and
a moved adapter, so a trainer that ignored ``loss_type`` or a mask would pass it.

Each test runs the trainer's own update on the tiny model and compares the LoRA gradient it leaves with the
gradient of a direct call of the objective, written here with the setting the config field should give:

- the options policy_update hands to ``policy_loss`` (loss_type, importance_sampling_level, delta,
  clip_ratio_c, the clip range, the KL, the SAPO / VESPO shapes, off_policy_mask_threshold, the entropy bonus):
  ``grpo.trainer.policy_update`` on ONE fixed batch whose old and reference log-probs are set here, away from
  the current policy's, so that the clips and masks bind;
- the options a whole step prepares before the update (top_entropy_quantile's mask from the old entropies,
  GDPO's advantages from the rewards): ``grpo.trainer.grpo_step`` with a sampler that returns fixed texts.

The direct call runs on the very log-probs of the trainer's forward (``policy_loss`` is wrapped to make it
alongside the trainer's own call), so the two gradients agree to rounding when the wiring is right (1e-5), and
each also differs from the default setting's, so that a trainer that dropped the option would fail.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import pytest
import torch
from tiny_run import randomise_adapter, tiny

import grpo.trainer as trainer
from grpo.config import load_config
from grpo.corrections import Corrections
from grpo.loss import Counts, LossSettings, policy_loss
from models.samplers import Sampler

pytestmark = pytest.mark.slow

G = 4  # completions per prompt; 2 prompts per step
TEXTS = [  # completion g of every prompt; both rewards below vary within the group, on different scales
    "yes",
    "no cat",
    "the cat sat",
    "a c b c d",
]
SETTINGS = [
    *tiny(), "--per_device_train_batch_size", "2", "--max_completion_length", "8", "--max_steps", "50",
    "--save_steps", "50", "--learning_rate", "1e-3", "--warmup_ratio", "0", "--max_grad_norm", "0",
    "--reward_funcs", "test_wiring:words_reward", "test_wiring:letter_c_reward",
    # cheap: 16-bit LoRA (4-bit matmuls are slow on CPU), the short GSM8K prompts, torch's AdamW
    "--load_in_4bit", "false", "--dataset_mixture", "0", "1", "0", "--optim", "adamw_torch",
    "--gradient_checkpointing", "false",
]  # fmt: skip


def words_reward(completions: list[str], **columns: Any) -> list[float]:
    """The number of words (0 to 5 here)."""
    return [float(len(text.split())) for text in completions]


def letter_c_reward(completions: list[str], **columns: Any) -> list[float]:
    """0.5 when the completion has a 'c'."""
    return [0.5 if "c" in text else 0.0 for text in completions]


class FixedSampler(Sampler):
    """Completion g of every prompt is TEXTS[g] (then EOS): the same batch whatever the policy."""

    name = "fixed"

    def _generate(self, prompt_ids, num_generations, seeds, settings):
        completions = []
        for p in range(len(prompt_ids)):
            for g in range(num_generations):
                ids = self.tokenizer(TEXTS[g], add_special_tokens=False).input_ids + self.stop_token_ids[:1]
                completions.append(self._completion(p, ids, [0.0] * len(ids), settings.max_completion_length))
        return completions

    def update_policy(self, model: Any) -> None:
        pass


# ----------------------------------------------------------------------------- the run, built once


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    cfg = load_config([*SETTINGS, "--output_dir", str(tmp_path_factory.mktemp("wiring"))])
    run = trainer.setup(cfg)
    run.sampler.close()
    run.sampler = FixedSampler(run.tokenizer, run.sampler.settings)
    randomise_adapter(run.model, 0.05, seed=1)  # LoRA B != 0: every LoRA matrix gets a gradient
    run.base_config = cfg  # each test sets run.config from it
    run.weights = {name: p.detach().clone() for name, p in _lora(run)}
    return run


def _lora(run) -> list[tuple[str, torch.nn.Parameter]]:
    return [(name, p) for name, p in run.model.named_parameters() if p.requires_grad]


def _restore(run) -> None:
    """Undo the optimiser step a grpo_step took, and the gradients it left."""
    with torch.no_grad():
        for name, p in _lora(run):
            p.copy_(run.weights[name])
            p.grad = None


def _configure(run, **fields) -> None:
    run.config = dataclasses.replace(run.base_config, **fields)  # validated again


class Spy:
    """Stands in for grpo.trainer.policy_loss: returns the trainer's call unchanged and, alongside, takes the
    gradient of ``direct(logp, corrections) -> loss`` (the test's own call on the same log-probs)."""

    def __init__(self, run, direct):
        self.params = [p for _, p in _lora(run)]
        self.direct = direct
        self.calls: list[dict[str, Any]] = []
        self.direct_grads: list[torch.Tensor] | None = None

    def __call__(self, logp, old_logp, ref_logp, advantages, mask, settings, corrections, counts):
        self.calls.append(
            dict(logp=logp.detach(), advantages=advantages, mask=mask, corrections=corrections, counts=counts)
        )
        expected = self.direct(logp, advantages, mask, corrections)
        grads = torch.autograd.grad(expected, self.params, retain_graph=True)
        self.direct_grads = (
            list(grads)
            if self.direct_grads is None
            else [a + b for a, b in zip(self.direct_grads, grads, strict=True)]
        )
        return policy_loss(logp, old_logp, ref_logp, advantages, mask, settings, corrections, counts)


def _gradient(run) -> list[torch.Tensor]:
    return [p.grad.detach().clone() for _, p in _lora(run)]


def _assert_equal(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, b in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)
    assert sum(a.abs().sum() for a in actual) > 0


def _assert_different(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    gap = sum((x - y).norm() ** 2 for x, y in zip(a, b, strict=True)) ** 0.5
    size = sum(x.norm() ** 2 for x in b) ** 0.5
    assert gap > 1e-3 * size, f"the option changed the gradient by only {gap / size:.1e} of its size"


# ----------------------------------------------------------------------------- policy_update on one batch


@pytest.fixture(scope="module")
def fixed_batch(run):
    """One step's batch as grpo_step builds it, with old and reference log-probs set away from the policy's:
    token ratios exp(offset), offsets ~ N(0, 0.6^2), so that the clips bind on both sides."""
    captured = []

    def capture(run_, batch):
        metrics, trainer_logp = real_update(run_, batch)
        captured.append((batch, trainer_logp))  # trainer_logp: the log-probs before the optimiser step
        return metrics, trainer_logp

    real_update = trainer.policy_update
    _configure(run)
    trainer.policy_update = capture
    try:
        trainer.grpo_step(run)
    finally:
        trainer.policy_update = real_update
        _restore(run)
    ((batch, current),) = captured
    g = torch.Generator().manual_seed(0)
    offsets = 0.6 * torch.randn(current.shape, generator=g)
    return dataclasses.replace(
        batch,
        old_logp=current - offsets,  # ratio = exp(offsets)
        ref_logp=current - 0.3 * torch.randn(current.shape, generator=g),
    )


def _update(run, batch, direct, **fields) -> tuple[list[torch.Tensor], Spy]:
    """The trainer's gradient of this batch's loss under the config with ``fields``, and the spy's record."""
    _configure(run, **fields)
    spy = Spy(run, direct)
    real = trainer.policy_loss
    trainer.policy_loss = spy
    try:
        for _, p in _lora(run):
            p.grad = None
        trainer.policy_update(run, batch)
        return _gradient(run), spy
    finally:
        trainer.policy_loss = real


def _objective(batch, settings: LossSettings, **corrections_of):
    """The direct call: policy_loss on the trainer's log-probs with the batch's fixed old/ref log-probs, this
    test's settings, and corrections made by ``corrections_of[name](logp, advantages, mask, trainer_corrections)``.
    """

    def direct(logp, advantages, mask, trainer_corrections):
        t = logp.shape[1]
        old, ref = batch.old_logp[:, :t], batch.ref_logp[:, :t]
        given = {
            name: make(logp, advantages, mask, trainer_corrections) for name, make in corrections_of.items()
        }
        counts = Counts(float(batch.num_sequences), float(batch.num_tokens))
        return policy_loss(logp, old, ref, advantages, mask, settings, Corrections(**given), counts)[0]

    return direct


# the default objective of the run: the config's defaults (grpo, epsilon 0.2, beta 0.04, k3)
DEFAULT = dict(eps_low=0.2, beta=0.04, max_completion_length=8)

# (config fields, the LossSettings they should give): one per objective field of GRPOConfig
OPTIONS = [
    *[
        (dict(loss_type=name), dict(loss_type=name))
        for name in ("bnpo", "dr_grpo", "dapo", "cispo", "sapo", "vespo", "gmpo")
    ],
    (
        dict(loss_type="luspo", importance_sampling_level="sequence"),
        dict(loss_type="luspo", importance_sampling_level="sequence"),
    ),
    (dict(importance_sampling_level="sequence"), dict(importance_sampling_level="sequence")),
    (dict(delta=1.5), dict(delta=1.5)),
    (dict(clip_ratio_c=1.5), dict(clip_ratio_c=1.5)),
    (dict(epsilon=0.1), dict(eps_low=0.1)),
    (dict(epsilon_high=0.5), dict(eps_high=0.5)),
    (dict(beta=0.2), dict(beta=0.2)),
    (dict(kl_estimator="k2"), dict(kl_estimator="k2")),
    (dict(use_bias_correction_kl=True), dict(bias_correction_kl=True)),
    (dict(loss_type="dr_grpo", max_completion_length=6), dict(loss_type="dr_grpo", max_completion_length=6)),
]
OPTIONS_OF_A_TYPE = [  # options that shape one loss type, against that type's defaults
    (dict(loss_type="sapo", sapo_temperature_neg=3.0), dict(loss_type="sapo", sapo_temperature_neg=3.0)),
    (dict(loss_type="sapo", sapo_temperature_pos=3.0), dict(loss_type="sapo", sapo_temperature_pos=3.0)),
    (dict(loss_type="vespo", vespo_k_pos=1.0), dict(loss_type="vespo", vespo_k_pos=1.0)),
    (dict(loss_type="vespo", vespo_lambda_neg=1.0), dict(loss_type="vespo", vespo_lambda_neg=1.0)),
    (dict(loss_type="vespo", vespo_k_neg=1.0), dict(loss_type="vespo", vespo_k_neg=1.0)),
    (dict(loss_type="vespo", vespo_lambda_pos=1.0), dict(loss_type="vespo", vespo_lambda_pos=1.0)),
]


@pytest.fixture(scope="module")
def default_gradient(run, fixed_batch):
    grads, _ = _update(run, fixed_batch, _objective(fixed_batch, LossSettings(**DEFAULT)))
    return grads


@pytest.mark.parametrize("fields, settings", OPTIONS, ids=[str(f) for f, _ in OPTIONS])
def test_each_option_reaches_the_objective(run, fixed_batch, default_gradient, fields, settings):
    expected = LossSettings(**{**DEFAULT, **settings})
    grads, spy = _update(run, fixed_batch, _objective(fixed_batch, expected), **fields)
    assert len(spy.calls) == 1  # one micro-batch: the whole step
    _assert_equal(grads, spy.direct_grads)
    _assert_different(grads, default_gradient)


@pytest.fixture(scope="module")
def type_default_gradient(run, fixed_batch):
    """The gradient of each loss type with its own options at their defaults, made once."""
    made = {}

    def gradient(loss_type):
        if loss_type not in made:
            plain = LossSettings(**DEFAULT, loss_type=loss_type)
            made[loss_type], _ = _update(
                run, fixed_batch, _objective(fixed_batch, plain), loss_type=loss_type
            )
        return made[loss_type]

    return gradient


@pytest.mark.parametrize("fields, settings", OPTIONS_OF_A_TYPE, ids=[str(f) for f, _ in OPTIONS_OF_A_TYPE])
def test_each_option_of_a_loss_type_reaches_it(run, fixed_batch, type_default_gradient, fields, settings):
    expected = LossSettings(**{**DEFAULT, **settings})
    grads, spy = _update(run, fixed_batch, _objective(fixed_batch, expected), **fields)
    _assert_equal(grads, spy.direct_grads)
    _assert_different(grads, type_default_gradient(fields["loss_type"]))


def test_the_default_objective_is_grpo_with_the_configs_numbers(run, fixed_batch, default_gradient):
    _, spy = _update(run, fixed_batch, _objective(fixed_batch, LossSettings(**DEFAULT)))
    _assert_equal(default_gradient, spy.direct_grads)


def _off_policy_mask(threshold):
    """DeepSeek-V3.2's mask, written out: drop a sequence with A < 0 whose mean (old_logp - logp) > threshold
    (the fixed sampler is not vLLM, so the policy that sampled is old_logp)."""

    def make(logp, advantages, mask, batch):
        gap = ((batch.old_logp[:, : logp.shape[1]] - logp.detach()) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return (~((advantages < 0) & (gap > threshold))).float()[:, None]

    return make


def test_off_policy_mask_threshold_reaches_the_objective(run, fixed_batch, default_gradient):
    threshold = 0.05
    make = _off_policy_mask(threshold)
    expected = _objective(
        fixed_batch,
        LossSettings(**DEFAULT),
        off_policy_mask=lambda logp, adv, mask, _: make(logp, adv, mask, fixed_batch),
    )
    grads, spy = _update(run, fixed_batch, expected, off_policy_mask_threshold=threshold)
    _assert_equal(grads, spy.direct_grads)
    _assert_different(grads, default_gradient)
    (call,) = spy.calls
    kept = make(call["logp"], call["advantages"], call["mask"], fixed_batch)
    assert 0 < kept.sum() < len(kept)  # the threshold binds: some sequences go, some stay
    torch.testing.assert_close(call["corrections"].off_policy_mask, kept)


def test_entropy_coef_reaches_the_objective(run, fixed_batch, default_gradient):
    expected = _objective(
        fixed_batch,
        LossSettings(**DEFAULT),
        entropy=lambda logp, adv, mask, given: given.entropy,  # the trainer's forward gives the entropies
        entropy_coef=lambda *_: 0.05,
    )
    grads, spy = _update(run, fixed_batch, expected, entropy_coef=0.05)
    _assert_equal(grads, spy.direct_grads)
    _assert_different(grads, default_gradient)
    assert spy.calls[0]["corrections"].entropy.requires_grad  # the bonus trains the entropies


# ----------------------------------------------------------------------------- a whole step: masks, advantages


def _step(run, direct, **fields) -> tuple[list[torch.Tensor], Spy]:
    """grpo_step under the config with ``fields`` (no KL, so that no reference pass is needed): the gradient of
    its one update, and the spy's record. The optimiser step it takes is undone."""
    _configure(run, beta=0.0, **fields)
    spy = Spy(run, direct)
    real_loss, real_step = trainer.policy_loss, trainer.optimizer_step
    grads = []

    def keep_gradient(run_, loss):
        grads.extend(_gradient(run_))
        return real_step(run_, loss)

    trainer.policy_loss, trainer.optimizer_step = spy, keep_gradient
    _restore(run)  # no gradient left over from another test
    try:
        trainer.grpo_step(run)
    finally:
        trainer.policy_loss, trainer.optimizer_step = real_loss, real_step
        _restore(run)
    return grads, spy


def _on_policy(settings: LossSettings, advantages=None, **corrections_of):
    """The direct call of a fresh step: old_logp = logp (ratio 1), no reference; the advantages and
    corrections as this test works them out."""

    def direct(logp, trainer_advantages, mask, trainer_corrections):
        adv = trainer_advantages if advantages is None else advantages
        given = {name: make(logp, mask, trainer_corrections) for name, make in corrections_of.items()}
        return policy_loss(logp, None, None, adv, mask, settings, Corrections(**given))[0]

    return direct


def _top_entropy_mask(rho):
    """The top-rho share of the step's real tokens by entropy, written out (the tokens whose entropy is at
    least the (1 - rho) quantile, linear interpolation)."""

    def make(logp, mask, given):
        entropy = given.entropy.detach()
        values = entropy[mask.bool()].sort().values
        position = (1 - rho) * (len(values) - 1)
        low = math.floor(position)
        threshold = values[low] + (position - low) * (values[min(low + 1, len(values) - 1)] - values[low])
        return ((entropy >= threshold) & mask.bool()).float()

    return make


def test_top_entropy_quantile_reaches_the_objective(run):
    rho = 0.3
    settings = LossSettings(eps_low=0.2, max_completion_length=8)
    grads, spy = _step(
        run, _on_policy(settings, entropy_mask=_top_entropy_mask(rho)), top_entropy_quantile=rho
    )
    _assert_equal(grads, spy.direct_grads)
    (call,) = spy.calls
    entropy_mask = _top_entropy_mask(rho)(call["logp"], call["mask"], call["corrections"])
    torch.testing.assert_close(call["corrections"].entropy_mask, entropy_mask)
    assert 0 < entropy_mask.sum() < call["mask"].sum()
    every_token, _ = _step(run, _on_policy(settings))
    _assert_different(grads, every_token)


def _gdpo_advantages(eps=1e-4) -> torch.Tensor:
    """GDPO (normalize_then_sum) written out for 2 prompts x TEXTS: each reward z-scored in its group (unbiased
    std), summed with weights 1, then z-scored over the batch."""
    columns = [words_reward(TEXTS), letter_c_reward(TEXTS)]
    summed = [0.0] * G
    for column in columns:
        mean = sum(column) / G
        std = math.sqrt(sum((r - mean) ** 2 for r in column) / (G - 1))
        summed = [s + (r - mean) / (std + eps) for s, r in zip(summed, column, strict=True)]
    batch = summed * 2  # both prompts get the same texts
    mean = sum(batch) / len(batch)
    std = math.sqrt(sum((s - mean) ** 2 for s in batch) / (len(batch) - 1))
    return torch.tensor([(s - mean) / (std + eps) for s in batch])


def test_gdpo_reaches_the_advantages_and_the_objective(run):
    gdpo = _gdpo_advantages()
    settings = LossSettings(eps_low=0.2, max_completion_length=8)
    grads, spy = _step(run, _on_policy(settings, gdpo), multi_objective_aggregation="normalize_then_sum")
    _assert_equal(grads, spy.direct_grads)
    torch.testing.assert_close(spy.calls[0]["advantages"], gdpo, rtol=1e-5, atol=1e-6)
    summed, default_spy = _step(run, _on_policy(settings))
    _assert_different(grads, summed)
    assert not torch.allclose(default_spy.calls[0]["advantages"], gdpo, atol=1e-3)
