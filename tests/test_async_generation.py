"""async_generation (issue 20, §2): the next rollout is sent to the sampler before the current step trains, by
the policy one optimiser step behind; the staleness metric reads that lag; a checkpoint keeps the policy that
was sampling, so a run killed after it and resumed trains on the same samples as the uninterrupted one.

The overlap itself is the server sampler's: ``submit`` sends the requests and returns before the server
answers (tests/test_server_sampler.py, on its fake server; the real vLLM server's async run is there too).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import copy_run_until, tiny

import grpo.trainer as trainer
from grpo.checkpoint import ROLLOUT_POLICY, load_rollout_policy, verify_checkpoint
from grpo.config import GRPOConfig, load_config
from grpo.metrics import read_metrics
from grpo.rollout import Group, staleness_metrics
from grpo.validation import config_warnings

ARGS = [
    *tiny(), "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2",
    "--max_completion_length", "12", "--learning_rate", "5e-2", "--max_grad_norm", "1.0",
    "--warmup_ratio", "0.0", "--max_steps", "4", "--save_steps", "2", "--seed", "7",
    "--async_generation", "true",
]  # fmt: skip
# learning_rate 5e-2: each step moves the tiny policy enough to change what it samples, so that a rollout drawn
# by the wrong policy shows (test_without_the_saved_policy_...); at 1e-3 one step changes no sampled token.


def config(output_dir, *extra: str) -> GRPOConfig:
    return load_config([*ARGS, "--output_dir", str(output_dir), *extra])


# ---------------------------------------------------------------------------- pure parts


def test_staleness_is_the_lag_of_each_groups_policy_behind_the_trained_one():
    def group(version: int) -> Group:
        return Group(0, {}, [1], [], torch.zeros(1, 1), version)

    # two groups sampled after 3 optimiser steps, one after 4 (a second dynamic-sampling round), trained at 4
    assert staleness_metrics([group(3), group(3), group(4)], 4) == {
        "sample/staleness_mean": pytest.approx(2 / 3),
        "sample/staleness_max": 1.0,
    }
    assert staleness_metrics([group(5)], 5) == {"sample/staleness_mean": 0.0, "sample/staleness_max": 0.0}


def test_async_generation_without_a_server_warns_that_nothing_overlaps():
    colocated = GRPOConfig(async_generation=True, sampler="hf")
    [warning] = [w for w in config_warnings(colocated, cuda=False) if "async_generation" in w]
    assert "nothing overlaps" in warning and "vllm_mode: server" in warning
    served = GRPOConfig(async_generation=True, sampler="vllm", vllm_mode="server")
    assert not [w for w in config_warnings(served, cuda=False) if "async_generation" in w]


# ---------------------------------------------------------------------------- the trainer


@pytest.fixture(scope="module")
def async_run(tmp_path_factory):
    """One uninterrupted async run (4 steps, checkpoints 2 and 4), with the order of what it did: each round
    sent to the sampler (the policy's version, the first position) and each policy update (the step)."""
    out = tmp_path_factory.mktemp("async")
    events: list[tuple] = []
    real_start, real_update = trainer.start_round, trainer.policy_update

    def start_round(sampler, train_data, cfg, accelerator, positions, version=0):
        events.append(("send", version, positions.start))
        return real_start(sampler, train_data, cfg, accelerator, positions, version)

    def policy_update(run, batch):
        events.append(("update", run.state.step))
        return real_update(run, batch)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "start_round", start_round)
        patch.setattr(trainer, "policy_update", policy_update)
        trainer.train(config(out))
    return out, events


@pytest.mark.slow
def test_each_rollout_is_sent_before_the_step_before_it_trains_by_the_policy_one_step_behind(async_run):
    out, events = async_run
    # the first rollout is sampled at once (by the policy of version 0, in sample_rollout: not through the
    # trainer's start_round); each next one is sent before the update of the step before it, by the policy of
    # that step; none after the last step's
    assert events == [
        ("send", 0, 2), ("update", 0),
        ("send", 1, 4), ("update", 1),
        ("send", 2, 6), ("update", 2),
        ("update", 3),
    ]  # fmt: skip
    records = read_metrics(out / "metrics.jsonl")
    assert [r["sample/staleness_mean"] for r in records] == [0.0, 1.0, 1.0, 1.0]
    assert [r["sample/staleness_max"] for r in records] == [0.0, 1.0, 1.0, 1.0]


@pytest.mark.slow
def test_a_checkpoint_keeps_the_policy_sampling_the_next_rollout(async_run):
    out, _ = async_run
    verify_checkpoint(out / "checkpoint-2")  # the manifest covers the new file
    version, weights = load_rollout_policy(out / "checkpoint-2")
    assert version == 1  # the rollout of step 3 is sampled by the policy after step 1
    adapter = load_file(str(out / "checkpoint-2" / "adapter_model.safetensors"))
    assert len(weights) == len(adapter)  # every LoRA matrix ...
    lora_b = [name for name in weights if "lora_B" in name]
    assert lora_b and any(  # ... one step behind the checkpoint's own
        not torch.equal(weights[name], adapter[name.replace(".default", "")]) for name in lora_b
    )
    assert load_rollout_policy(out / "checkpoint-4") is None  # nothing was sent after the last step


def _resume_from_checkpoint_2(out, tmp_path, without_rollout_policy: bool = False) -> list[dict]:
    copy_run_until(out, tmp_path, 2)
    if without_rollout_policy:  # as a checkpoint of the previous version would be: also out of the manifest
        (tmp_path / "checkpoint-2" / ROLLOUT_POLICY).unlink()
        manifest = tmp_path / "checkpoint-2" / "checkpoint_manifest.json"
        data = json.loads(manifest.read_text())
        data["files"] = {k: v for k, v in data["files"].items() if k != ROLLOUT_POLICY}
        manifest.write_text(json.dumps(data))
    trainer.train(config(tmp_path, "--resume_from_checkpoint", "latest"))
    return read_metrics(tmp_path / "metrics.jsonl")


KEYS = ("loss", "reward", "kl", "grad_norm", "completions/mean_length", "sample/staleness_mean")


@pytest.mark.slow
def test_an_async_run_killed_after_a_checkpoint_resumes_exactly(async_run, tmp_path):
    out, _ = async_run
    resumed = _resume_from_checkpoint_2(out, tmp_path)
    full = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [[r[k] for k in KEYS] for r in resumed[2:]] == [[r[k] for k in KEYS] for r in full[2:]]
    a = load_file(str(out / "checkpoint-4" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_without_the_saved_policy_the_resumed_run_samples_another_rollout(async_run, tmp_path):
    """The control: what makes the resume above exact is the policy the checkpoint kept. Without it the rollout
    of step 3 comes from the policy after step 2 (staleness 0) and the run goes elsewhere."""
    out, _ = async_run
    resumed = _resume_from_checkpoint_2(out, tmp_path, without_rollout_policy=True)
    full = read_metrics(out / "metrics.jsonl")
    assert resumed[2]["sample/staleness_mean"] == 0.0 and resumed[3]["sample/staleness_mean"] == 1.0
    assert resumed[2]["loss"] != full[2]["loss"]


@pytest.mark.slow
def test_with_dynamic_sampling_only_the_first_round_is_sent_ahead(tmp_path):
    """Further rounds are sampled when needed, by the current policy: their groups' staleness is 0, so a step's
    mean lies between 0 and 1, and a step whose first round had no signal can read 0 (all its groups later)."""
    events: list[tuple] = []
    real_start = trainer.start_round

    def start_round(sampler, train_data, cfg, accelerator, positions, version=0):
        events.append((version, positions.start))
        return real_start(sampler, train_data, cfg, accelerator, positions, version)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(trainer, "start_round", start_round)
        trainer.train(
            config(tmp_path, "--dynamic_sampling", "true", "--max_sampling_rounds", "3", "--max_steps", "3")
        )
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["sampling/rounds"] >= 1 for r in records)
    assert records[0]["sample/staleness_max"] == 0.0  # the first rollout: all sampled by the current policy
    for record in records[1:]:
        assert 0.0 <= record["sample/staleness_mean"] <= record["sample/staleness_max"] <= 1.0
    # the trainer sends ahead only the next rollout's first round: 2 prompts from where the stream stands
    assert len(events) == 2 and all(version == step for step, (version, _) in enumerate(events))


def test_a_rollout_sampled_ahead_is_importance_weighted_whatever_the_sampler():
    """With the HF sampler a synchronous rollout needs no correction (the trainer's own policy sampled it); sent
    ahead, it was sampled by the policy one step behind: pi_trainer / pi_sampler weighs it, per sequence
    (TRL's default sequence_mask: exp(sum of the differences), 0 beyond the bounds)."""
    from types import SimpleNamespace

    from grpo.trainer import Run, sampling_corrections

    micro = SimpleNamespace(
        old_logp=None,
        sampler_logp=torch.tensor([[-1.5, -1.0], [-0.6, -0.7]]),
        completion_mask=torch.ones(2, 2),
        advantages=torch.tensor([1.0, -1.0]),
        loss_mask=torch.ones(2, 2),
    )
    logp = torch.tensor([[-1.0, -1.0], [-0.5, -0.5]])  # the trainer's, before the update
    hf = SimpleNamespace(name="hf")

    def run(**fields) -> Run:
        return Run(GRPOConfig(**fields), None, None, None, hf, None, None, None)

    assert sampling_corrections(run(), micro, logp) == (None, None)
    weights, mask = sampling_corrections(run(async_generation=True), micro, logp)
    assert mask is None
    # row 0: exp(0.5 + 0) = 1.6487; row 1: exp(0.1 + 0.2) = 1.3499 (both within TRL's default bounds)
    assert weights.flatten().tolist() == pytest.approx([1.6487213, 1.3498588], rel=1e-6)


def test_the_evaluation_waits_for_the_rollout_sent_ahead_first(monkeypatch):
    """The evaluation loads the newest adapter on the server, which drops the one the rollout in flight is sampled
    by: so it waits for that rollout first (whose completions are kept for the next step)."""
    from types import SimpleNamespace

    from models.samplers import Pending

    order: list[str] = []
    pending = Pending(lambda: order.append("rollout") or [])
    run = SimpleNamespace(
        ahead=SimpleNamespace(round=SimpleNamespace(completions=pending)), config=GRPOConfig(), sampler=None
    )
    monkeypatch.setattr(
        trainer, "evaluate_rows", lambda *args: order.append("evaluate") or {"eval/reward": 1.0}
    )
    assert trainer.evaluate(run, [{}]) == {"eval/reward": 1.0}
    assert order == ["rollout", "evaluate"]
    assert pending.result() == [] and order == ["rollout", "evaluate"]  # kept: not waited for twice
