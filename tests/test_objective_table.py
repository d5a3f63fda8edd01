"""The objective table (grpo/objectives.py) and what is derived from it: the policy terms' worked examples, the
names the config accepts, the rules, policy_loss's grouped arguments against its keyword form, and the copy of
the table in docs/OBJECTIVES.md."""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from grpo.config import GRPOConfig
from grpo.corrections import Corrections
from grpo.loss import Counts, aggregate, policy_loss, sampler_importance_weights, sequence_mask
from grpo.objectives import (
    AGGREGATIONS,
    CLIPPED_LOSS_TYPES,
    CORRECTIONS,
    LOSS_TYPES,
    OBJECTIVES,
    LossSettings,
    level_problems,
    objective_problems,
)
from grpo.surrogates import POLICY_TERMS, cispo_term, gmpo_term, ppo_clip_term, sapo_term, vespo_term

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
NO_CORRECTIONS = Corrections()


def _close(actual, expected, rtol=1e-6, atol=1e-9):
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=actual.dtype), rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------- the table


def test_every_row_names_a_registered_term_a_known_aggregation_and_known_corrections():
    assert LOSS_TYPES == tuple(OBJECTIVES) and len(LOSS_TYPES) == 9
    for name, row in OBJECTIVES.items():
        assert row.term in POLICY_TERMS, name
        assert row.aggregation in AGGREGATIONS, name
        assert set(row.own_corrections) <= set(CORRECTIONS), name
        assert row.level in (None, "token", "sequence"), name
    assert set(POLICY_TERMS) == {row.term for row in OBJECTIVES.values()}  # no term that no row uses
    assert CLIPPED_LOSS_TYPES == ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
    # every aggregation is some objective's, so none is dead
    assert {row.aggregation for row in OBJECTIVES.values()} == set(AGGREGATIONS)


def test_the_config_accepts_exactly_the_tables_names():
    from dataclasses import fields

    choices = {f.name: f.metadata.get("choices") for f in fields(GRPOConfig)}
    assert tuple(choices["loss_type"]) == LOSS_TYPES
    assert tuple(choices["importance_sampling_level"]) == ("token", "sequence")


def test_validating_a_config_imports_no_torch():
    # the table is read by validation before torch is imported (scripts/train.py reports a config error first)
    code = (
        "import sys; from grpo.config import GRPOConfig; GRPOConfig(loss_type='luspo', "
        "importance_sampling_level='sequence'); assert 'torch' not in sys.modules, 'torch imported'"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_aggregation_by_name_equals_aggregation_by_loss_type():
    per_token = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    expected = {
        "seq-mean-token-mean": 3.5,
        "token-mean": 3.0,
        "token-sum-norm": 2.25,
        "seq-mean-token-sum": 4.5,
    }
    for name, row in OBJECTIVES.items():
        assert aggregate(per_token, mask, name).item() == pytest.approx(expected[row.aggregation]), name
        assert aggregate(per_token, mask, row.aggregation).item() == pytest.approx(expected[row.aggregation])
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(per_token, mask, "seq-mean-token-sum-norm")


def test_rules_derived_from_the_table():
    def problems(**fields):  # the rules read only these five fields, of a LossSettings or a GRPOConfig
        base = dict(loss_type="grpo", importance_sampling_level="token", kl_estimator="k3", delta=None,
                    clip_ratio_c=None)  # fmt: skip
        settings = SimpleNamespace(**{**base, **fields})
        return objective_problems(settings) + (
            level_problems(settings) if fields.get("loss_type") != "ppo" else []
        )

    assert problems() == []
    for loss_type in LOSS_TYPES:  # delta and clip_ratio_c: exactly the clipped rows
        level = OBJECTIVES[loss_type].level or "token"
        found = problems(loss_type=loss_type, importance_sampling_level=level, delta=4.0, clip_ratio_c=3.0)
        assert bool(found) != (loss_type in CLIPPED_LOSS_TYPES), loss_type
        assert [name for name, _ in found] in ([], ["delta", "clip_ratio_c"])
    assert problems(loss_type="luspo") == [
        (
            "importance_sampling_level",
            "luspo is a sequence-level loss: set importance_sampling_level: sequence",
        )
    ]
    for loss_type in ("vespo", "gmpo"):
        ((name, rule),) = problems(loss_type=loss_type, importance_sampling_level="sequence")
        assert name == "importance_sampling_level" and rule.startswith(
            f"{loss_type} forms its sequence weight"
        )
    assert problems(loss_type="ppo") == [("loss_type", "must be one of " + ", ".join(LOSS_TYPES))]
    assert problems(kl_estimator="k4")[0][0] == "kl_estimator"


def test_loss_settings_resolve_eps_high_and_refuse_what_the_table_forbids():
    assert LossSettings(eps_low=0.3).eps_high == 0.3
    assert LossSettings(eps_low=0.3, eps_high=0.5).eps_high == 0.5
    assert LossSettings().objective is OBJECTIVES["grpo"]
    with pytest.raises(ValueError, match=r"^delta=4.0: acts on the clipped losses .*not sapo$"):
        LossSettings(loss_type="sapo", delta=4.0)
    with pytest.raises(ValueError, match="^loss_type='ppo': must be one of grpo"):
        LossSettings(loss_type="ppo")
    LossSettings(loss_type="luspo")  # the pure function computes luspo per token too (as TRL's _compute_loss)


def test_config_loss_settings_map_every_field():
    cfg = GRPOConfig(
        loss_type="dapo", importance_sampling_level="sequence", epsilon=0.15, epsilon_high=0.3, delta=4.0,
        clip_ratio_c=3.5, beta=0.07, kl_estimator="k2", max_completion_length=99, sapo_temperature_pos=1.1,
        sapo_temperature_neg=1.2, vespo_k_pos=2.5, vespo_lambda_pos=3.5, vespo_k_neg=3.1, vespo_lambda_neg=2.1,
        use_bias_correction_kl=True,
    )  # fmt: skip
    assert cfg.loss_settings() == LossSettings(
        loss_type="dapo", importance_sampling_level="sequence", eps_low=0.15, eps_high=0.3, delta=4.0,
        clip_ratio_c=3.5, beta=0.07, kl_estimator="k2", max_completion_length=99, sapo_temperature_pos=1.1,
        sapo_temperature_neg=1.2, vespo_k_pos=2.5, vespo_lambda_pos=3.5, vespo_k_neg=3.1, vespo_lambda_neg=2.1,
        bias_correction_kl=True,
    )  # fmt: skip
    assert GRPOConfig(epsilon=0.25).loss_settings().eps_high == 0.25  # epsilon_high None -> epsilon


# ----------------------------------------------------------------------------- the policy terms' examples


def _term(fn, log_w, advantages, logp=None, old_logp=None, mask=None, corrections=NO_CORRECTIONS, **settings):
    log_w = torch.as_tensor(log_w, dtype=F64)
    logp = log_w if logp is None else torch.as_tensor(logp, dtype=F64)
    old_logp = torch.zeros_like(logp) if old_logp is None else old_logp
    mask = torch.ones_like(logp) if mask is None else torch.as_tensor(mask, dtype=F64)
    adv = torch.tensor(advantages, dtype=F64)
    return fn(log_w, logp, old_logp, adv, mask, LossSettings(**settings), corrections)


def test_ppo_clip_term_worked_example():
    log_w = [[math.log(1.5), math.log(0.5), math.log(5.0)]]
    term = _term(ppo_clip_term, log_w, [-1.0])
    _close(term.loss, [[1.5, 0.8, 5.0]])
    term = _term(ppo_clip_term, log_w, [-1.0], clip_ratio_c=3.0)
    _close(term.loss, [[1.5, 0.8, 3.0]])
    assert term.clipped_low.tolist() == [[False, True, False]]
    assert term.clipped_high.tolist() == [[False, False, False]]
    assert term.metrics["clip_ratio/dual_mean"].tolist() == [[False, False, True]]
    _close(_term(ppo_clip_term, log_w, [-1.0], delta=4.0).loss, [[1.5, 0.8, 4.0]])
    assert _term(ppo_clip_term, log_w, [1.0]).clipped_high.tolist() == [[True, False, True]]


def test_cispo_term_worked_example():
    logp = torch.tensor([[-0.5]], dtype=F64, requires_grad=True)
    term = _term(cispo_term, [[math.log(7.0)]], [1.0], logp=logp, eps_high=5.0)
    _close(term.loss, [[2.5]])
    term.loss.sum().backward()
    _close(logp.grad, [[-5.0]])
    assert term.clipped_high.tolist() == [[True]] and term.clipped_low is None
    assert term.metrics["cispo_clip_ratio"].tolist() == [[True]]


def test_sapo_term_worked_example():
    log_w = torch.tensor([[0.0, math.log(3.0)]], dtype=F64, requires_grad=True)
    term = _term(sapo_term, log_w, [1.0], sapo_temperature_pos=1.0)
    s = 1 / (1 + math.exp(-2))
    _close(term.loss, [[-2.0, -4 * s]])
    assert 4 * s == pytest.approx(3.5232, abs=1e-4)
    (grad,) = torch.autograd.grad(term.loss.sum(), log_w)
    _close(grad / torch.exp(log_w.detach()), [[-1.0, -4 * s * (1 - s)]])  # d loss / d r = (d / d log r) / r
    assert 4 * s * (1 - s) == pytest.approx(0.4200, abs=1e-4)
    assert term.clipped_low is None and term.clipped_high is None


def test_vespo_term_worked_example():
    logp = torch.tensor([[-0.5, -1.0]], dtype=F64)
    term = _term(vespo_term, torch.zeros(1, 2, dtype=F64), [2.0], logp=logp, old_logp=logp.clone())
    _close(term.loss, [[1.0, 2.0]])
    _close(term.metrics["vespo/phi_seq_mean"], [[1.0]])
    # logp - old_logp summing to ln 2 (w = 2, A > 0): phi = 0.1991 scales the same gradient
    old = logp - torch.tensor([[math.log(2.0), 0.0]], dtype=F64)
    term = _term(vespo_term, logp - old, [2.0], logp=logp, old_logp=old)
    assert term.metrics["vespo/phi_seq_mean"].item() == pytest.approx(0.1991, abs=1e-4)
    _close(term.loss, term.metrics["vespo/phi_seq_mean"] * torch.tensor([[1.0, 2.0]], dtype=F64))


def test_gmpo_term_worked_example():
    log_w = [[0.1, 0.6]]
    term = _term(gmpo_term, log_w, [1.0], eps_low=0.4, eps_high=0.4)
    _close(term.loss, [[-math.exp(0.25)]])
    assert math.exp(0.25) == pytest.approx(1.2840, abs=1e-4)
    assert term.clipped_high.tolist() == [[False, True]]
    entropy_mask = torch.tensor([[1.0, 0.0]], dtype=F64)
    term = _term(gmpo_term, log_w, [1.0], corrections=Corrections(entropy_mask=entropy_mask), eps_low=0.4,
                 eps_high=0.4)  # fmt: skip
    _close(term.loss, [[-math.exp(0.1)]])
    both = Corrections(entropy_mask=entropy_mask, is_weights=torch.tensor([[4.0, 1.0]], dtype=F64))
    term = _term(gmpo_term, log_w, [1.0], corrections=both, eps_low=0.4, eps_high=0.4)
    _close(term.loss, [[-4.4207]], rtol=1e-4)
    with pytest.raises(ValueError, match="gmpo"):
        _term(gmpo_term, log_w, [1.0], importance_sampling_level="sequence")


# ----------------------------------------------------------------------------- policy_loss's arguments


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = sequence_mask(torch.tensor([4, 1, 3]), 4).double()
    old = -torch.rand(3, 4, generator=g, dtype=F64) * 2
    logp = old + 0.4 * torch.randn(3, 4, generator=g, dtype=F64)
    ref = old + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    sampler = old + 0.3 * torch.randn(3, 4, generator=g, dtype=F64)
    return logp, old, ref, sampler, torch.tensor([1.0, -0.5, 0.7], dtype=F64), mask


def test_the_grouped_call_of_the_docstring_reproduces_the_keyword_call():
    logp, old, ref, sampler, adv, mask = _inputs()
    w = sampler_importance_weights(old, sampler, mask, mode="token_truncate")
    results = []
    for call in (
        lambda x: policy_loss(x, old, ref, adv, mask, loss_type="dapo", eps_low=0.2, eps_high=0.28, beta=0.04,
                              is_weights=w),
        lambda x: policy_loss(x, old, ref, adv, mask, LossSettings(loss_type="dapo", eps_low=0.2, eps_high=0.28,
                              beta=0.04), Corrections(is_weights=w)),
    ):  # fmt: skip
        x = logp.clone().requires_grad_()
        loss, metrics = call(x)
        loss.backward()
        results.append((loss.detach(), x.grad, metrics))
    (loss_a, grad_a, metrics_a), (loss_b, grad_b, metrics_b) = results
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b) and metrics_a == metrics_b
    assert grad_a.abs().sum() > 0


def test_counts_group_the_step_counts():
    logp, old, ref, sampler, adv, mask = _inputs(1)
    by_keywords, _ = policy_loss(
        logp, old, None, adv, mask, loss_type="dr_grpo", num_sequences=6, num_tokens=20
    )
    grouped, _ = policy_loss(
        logp, old, None, adv, mask, LossSettings(loss_type="dr_grpo"), counts=Counts(6, 20)
    )
    assert torch.equal(by_keywords, grouped)
    local, _ = policy_loss(logp, old, None, adv, mask, LossSettings(loss_type="dr_grpo"))
    assert grouped.item() == pytest.approx(local.item() * 3 / 6)  # the step has 6 sequences, this call 3


def test_keywords_and_groups_do_not_mix():
    logp, old, ref, sampler, adv, mask = _inputs()
    with pytest.raises(TypeError, match="loss_type given as keywords and in LossSettings"):
        policy_loss(logp, old, None, adv, mask, LossSettings(), loss_type="dapo")
    with pytest.raises(TypeError, match="unexpected keyword arguments: epsilon"):
        policy_loss(logp, old, None, adv, mask, epsilon=0.2)  # the config's name, not policy_loss's


def test_corrections_detach_the_weights_and_shape_the_sequence_mask():
    w = torch.ones(3, 4, requires_grad=True)
    corrections = Corrections(is_weights=w, off_policy_mask=torch.tensor([1.0, 0.0, 1.0]))
    assert not corrections.is_weights.requires_grad
    assert corrections.off_policy_mask.shape == (3, 1)
    with pytest.raises(ValueError, match="entropy is required"):
        Corrections(entropy_coef=0.1)


def test_own_corrections_are_not_applied_twice():
    # vespo and gmpo put the is_weights into their own sequence weight: scaling them changes the loss exactly as
    # the term says, not once more on top
    logp, old, ref, sampler, adv, mask = _inputs(2)
    w = sampler_importance_weights(old, sampler, mask, mode="token_truncate")
    for loss_type in ("vespo", "gmpo"):
        with_w, _ = policy_loss(logp, old, None, adv, mask, LossSettings(loss_type=loss_type), Corrections(w))
        settings = LossSettings(loss_type=loss_type)
        term = POLICY_TERMS[OBJECTIVES[loss_type].term](
            logp - old, logp, old, adv, mask, settings, Corrections(w)
        )
        _close(with_w, aggregate(term.loss, mask, loss_type))


# ----------------------------------------------------------------------------- docs/OBJECTIVES.md


def table_rows() -> list[str]:
    """The rows of docs/OBJECTIVES.md's "The table in the code" section, made from OBJECTIVES."""
    rows = []
    for name, row in OBJECTIVES.items():
        own = ", ".join(f"`{c}`" for c in row.own_corrections) or "none"
        if row.token_is_weights:
            own += " (per-token weights only)"
        cells = [
            f"`{name}`",
            f"`{row.term}` (`{POLICY_TERMS[row.term].__name__}`)",
            f"`{row.aggregation}`",
            "yes" if row.clipped else "no",
            own,
            "either" if row.level is None else row.level,
            row.paper,
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def test_docs_objectives_table_is_the_codes_table():
    text = (ROOT / "docs" / "OBJECTIVES.md").read_text()
    section = text.split("## The table in the code", 1)[1].split("\n## ", 1)[0]
    documented = [line for line in section.splitlines() if re.match(r"\| `", line)]
    assert documented == table_rows(), (
        "docs/OBJECTIVES.md: paste the rows of tests.test_objective_table.table_rows()"
    )
