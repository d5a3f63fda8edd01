"""The GRPO loop end to end on the tiny model (CPU): metrics, checkpoints, exact resume, SIGKILL,
non-finite updates, data parallel under accelerate, and the CLI's config errors."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_run import copy_run_until, tiny

from grpo.config import load_config
from grpo.loss import policy_loss, sequence_mask
from grpo.metrics import read_metrics
from grpo.rollout import StepBatch
from models.forward import micro_batches

ROOT = Path(__file__).resolve().parents[1]

# A small, fast run: 2 prompts x 4 completions of <= 16 tokens per step.
TINY_ARGS = [
    *tiny(), "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2",
    "--max_completion_length", "16", "--learning_rate", "1e-3", "--max_grad_norm", "1.0",
    "--warmup_ratio", "0.0", "--max_steps", "4", "--save_steps", "2", "--seed", "7",
]  # fmt: skip


def tiny_config(output_dir, *extra):
    return load_config([*TINY_ARGS, "--output_dir", str(output_dir), *extra])


# ----------------------------------------------------------------------------- pure helpers


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo"])
def test_micro_batches_normalised_by_the_whole_batch_sum_to_the_full_batch_loss(loss_type):
    torch.manual_seed(0)
    n, t = 6, 5
    mask = sequence_mask(torch.tensor([5, 1, 3, 4, 2, 5]), t)
    adv = torch.randn(n)
    old = -torch.rand(n, t)
    logp = old + 0.1 * torch.randn(n, t)
    kw = dict(beta=0.04, loss_type=loss_type, max_completion_length=t)
    full, _ = policy_loss(logp, old, old - 0.2, adv, mask, **kw)
    total = 0.0
    for rows in micro_batches(n, 4):  # 4 + 2: unequal micro-batches, each divided by the whole batch's counts
        part, _ = policy_loss(
            logp[rows], old[rows], old[rows] - 0.2, adv[rows], mask[rows], **kw,
            num_sequences=n, num_tokens=mask.sum().item(),
        )  # fmt: skip
        total += part
    torch.testing.assert_close(total, full)


def test_micro_batches_cover_the_rows_in_order_the_last_one_shorter():
    assert micro_batches(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]


def test_a_micro_batch_drops_only_unused_padding():
    # prompts [5, 6] and [7] left-padded to 3; completions of lengths 2 and 1 right-padded to 4
    mask = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]])
    batch = StepBatch(
        input_ids=torch.tensor([[0, 5, 6, 8, 9, 0, 0], [0, 0, 7, 4, 0, 0, 0]]),
        attention_mask=torch.tensor([[0, 1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0, 0]]),
        completion_lengths=torch.tensor([2, 1]),
        completion_mask=mask,
        loss_mask=mask,
        sampler_logp=torch.zeros(2, 4),
        advantages=torch.tensor([1.0, -1.0]),
        num_sequences=2.0,
        num_tokens=3.0,
        tokens_seen=8,
        metrics={},
        ref_logp=torch.arange(8.0).reshape(2, 4),
    )
    both = batch.micro_batch(slice(0, 2))
    assert both.input_ids.tolist() == [[5, 6, 8, 9], [0, 7, 4, 0]]
    assert both.completion_mask.shape == both.loss_mask.shape == both.sampler_logp.shape == (2, 2)
    assert both.ref_logp.tolist() == [[0.0, 1.0], [4.0, 5.0]] and both.old_logp is None
    second = batch.micro_batch(slice(1, 2))
    assert second.input_ids.tolist() == [[7, 4]]
    assert second.attention_mask.tolist() == [[1, 1]]
    assert second.advantages.tolist() == [-1.0] and second.completion_lengths.tolist() == [1]
    assert (second.num_sequences, second.num_tokens) == (2.0, 3.0)  # the whole step's counts stay


# ----------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """One uninterrupted 4-step run, shared by the tests below."""
    from grpo.trainer import train

    out = tmp_path_factory.mktemp("run")
    final = train(tiny_config(out))
    return out, final


REQUIRED = [
    # the names the README promises
    "step", "loss", "reward", "reward_std", "kl", "clip_ratio", "completion_length",
    "frac_reward_zero_std", "lr", "grad_norm", "step_time", "entropy",
    # TRL 1.16's names for the same quantities
    "learning_rate", "completions/mean_length", "completions/clipped_ratio", "clip_ratio/region_mean",
    "clip_ratio/low_mean", "clip_ratio/high_mean", "num_tokens",
    "sampling/sampling_logp_difference/mean", "sampling/importance_sampling_ratio/mean",
] + [f"rewards/{name}/{stat}" for stat in ("mean", "std") for name in (
    "xmlcount_reward_func", "soft_format_reward_func", "strict_format_reward_func",
    "int_reward_func", "correctness_reward_func",
)]  # fmt: skip


@pytest.mark.slow
def test_run_writes_metrics_checkpoints_and_plot(finished_run):
    out, final = finished_run
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["num_completions"] == 8 for r in records)
    for record in records:
        missing = [k for k in REQUIRED if k not in record]
        assert not missing, missing
        assert any(k.startswith("reward/") for k in record)
        assert any(k.startswith("accuracy/") for k in record)
        # the weighted total is the sum of the five unweighted means (weights 1.0)
        parts = sum(record[f"rewards/{k}/mean"] for k in (
            "xmlcount_reward_func", "soft_format_reward_func", "strict_format_reward_func",
            "int_reward_func", "correctness_reward_func"))  # fmt: skip
        assert record["reward"] == pytest.approx(parts, abs=1e-5)
        assert 0 <= record["clip_ratio"] <= 1 and record["kl"] >= 0
    # the trainer's log-probs are those the HF sampler drew with (same model, same kernels)
    assert records[0]["sampling/sampling_logp_difference/mean"] < 1e-3
    assert final == out / "checkpoint-4"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert (out / "metrics.png").stat().st_size > 10_000
    state = json.loads((final / "trainer_state.json").read_text())
    assert state["step"] == 4 and state["data_position"] == 8 and state["config"]["seed"] == 7


@pytest.mark.slow
def test_checkpoint_is_a_peft_adapter_and_training_changed_it(finished_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from models.policy import resolve_model_path

    out, final = finished_run
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path("tiny-qwen2-instruct"))
    model = PeftModel.from_pretrained(base, str(final))
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # B starts at 0: GRPO moved it


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(finished_run, tmp_path):
    from grpo.trainer import train

    out, _ = finished_run
    copy_run_until(out, tmp_path, 2)
    train(tiny_config(tmp_path, "--resume_from_checkpoint", "latest"))
    full, resumed = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    for a, b in zip(full[2:], resumed[2:], strict=True):
        assert (a["loss"], a["reward"], a["kl"], a["grad_norm"]) == (
            b["loss"],
            b["reward"],
            b["kl"],
            b["grad_norm"],
        )


def _cli(*args, **kw):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return [sys.executable, str(ROOT / "scripts" / "train.py"), *args], dict(env=env, cwd=ROOT, **kw)


@pytest.mark.slow
def test_sigkill_then_resume_from_the_last_whole_checkpoint(finished_run, tmp_path):
    out, _ = finished_run
    cmd, kw = _cli(*TINY_ARGS, "--output_dir", str(tmp_path), "--save_steps", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, **kw)
    deadline = time.time() + 300
    while not (tmp_path / "checkpoint-2").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)  # at whatever point of step 3 (or of saving it) it has reached
    proc.wait()
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    # a half-written save looks like this; it must be ignored and cleaned up
    (tmp_path / "checkpoint-3.tmp").mkdir(exist_ok=True)
    cmd, kw = _cli(*TINY_ARGS, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest")
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, result.stderr[-2000:]
    full, resumed = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["reward"] for r in resumed] == [r["reward"] for r in full]
    assert not (tmp_path / "checkpoint-3.tmp").exists()


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_stops_cleanly_saves_and_the_run_resumes_exactly(finished_run, tmp_path, sig):
    """Ctrl-C or SIGTERM during a step: that step ends, a checkpoint and the plot are saved, one line says
    where and how to go on, exit 130; resuming from it gives the uninterrupted run's numbers."""
    import re

    out, _ = finished_run
    cmd, kw = _cli(*TINY_ARGS, "--output_dir", str(tmp_path), "--save_steps", "100")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, **kw)
    metrics, deadline = tmp_path / "metrics.jsonl", time.time() + 300
    while not (metrics.exists() and metrics.read_text().strip()) and time.time() < deadline:
        time.sleep(0.05)  # the first step is logged: the signal lands in a later one
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    last = stderr.strip().splitlines()[-1]
    match = re.fullmatch(
        rf"interrupted: {sig.name} at step (\d+): saved (.+); continue with --resume_from_checkpoint latest",
        last,
    )
    assert match, last
    step = int(match.group(1))
    assert 1 <= step < 4 and match.group(2) == str(tmp_path / f"checkpoint-{step}")
    assert json.loads((tmp_path / f"checkpoint-{step}" / "trainer_state.json").read_text())["step"] == step
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, step + 1))
    assert (tmp_path / "metrics.png").is_file()

    cmd, kw = _cli(*TINY_ARGS, "--output_dir", str(tmp_path), "--resume_from_checkpoint", "latest")
    result = subprocess.run(cmd, capture_output=True, text=True, **kw)
    assert result.returncode == 0, result.stderr[-2000:]
    full, resumed = read_metrics(out / "metrics.jsonl"), read_metrics(metrics)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == [r["loss"] for r in full]
    assert [r["reward"] for r in resumed] == [r["reward"] for r in full]


@pytest.mark.slow
def test_non_finite_updates_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    import grpo.trainer as trainer

    real = trainer.policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(trainer, "policy_loss", poisoned)
    cfg = tiny_config(tmp_path, "--max_nonfinite_updates", "2", "--max_steps", "5")
    with pytest.raises(trainer.TrainingError, match="2 non-finite updates in a row"):
        trainer.train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_updates"] for r in records] == [1]  # the second one raised before logging
    assert (tmp_path / "checkpoint-2" / "trainer_state.json").is_file()
    # the adapter was never updated: B is still exactly zero
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in weights.items() if "lora_B" in k)


def test_cli_rejects_bad_config_before_loading_anything():
    cmd, kw = _cli("--num_generations", "1", "--model_name_or_path", "/nonexistent")
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "config error: num_generations=1: must be >= 2 (a group needs two completions to compare)"
    ]
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_accelerate_two_processes_end_with_identical_adapters(tmp_path):
    cmd = [
        # accelerate 1.15 sends `--cpu` to its single-process launcher; several CPU processes are
        # `--multi_gpu` (torchrun) with ACCELERATE_USE_CPU=1
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(ROOT / "tests" / "_ddp_train.py"), *TINY_ARGS, "--max_steps", "2",
        "--output_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"adapter_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    # each rank read its own prompts: 2 steps x 2 ranks x 2 prompts
    assert ranks[0]["data_position"] == 8
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2]
    # reward metrics cover both processes' samples: 2 ranks x 2 prompts x 4 completions per step
    assert [r["num_completions"] for r in records] == [16, 16]
    # the adapter moved (non-zero gradients were averaged, not lost)
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in weights.items() if "lora_B" in k)


@pytest.mark.slow
def test_embedded_default_learns(tmp_path):
    """The README's first command: reward AND correctness rise clearly (about 4 minutes on 2 cores)."""
    cmd, kw = _cli("--config", "scripts/configs/tiny-cpu.yaml", "--output_dir", str(tmp_path))
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=1500, **kw)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"adapter: {tmp_path}/checkpoint-150" in result.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 150
    quarter = len(records) // 4

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = mean("reward", records[:quarter]), mean("reward", records[-quarter:])
    assert last > first + 0.25, (first, last)  # measured here: 1.35 -> 1.81 (of 4.0)
    key = "rewards/correctness_reward_func/mean"
    first, last = mean(key, records[:quarter]), mean(key, records[-quarter:])
    assert last > first + 0.1, (first, last)  # measured here: 0.27 -> 0.44 (of 2.0)


def test_metrics_logger_tensorboard_and_resume_truncation(tmp_path):
    from grpo.metrics import MetricsLogger

    logger = MetricsLogger(tmp_path, report_to="tensorboard")
    for step in (1, 2, 3):
        logger.log({"step": step, "reward": float(step), "note": "text is skipped by tensorboard"})
    logger.close()
    assert [r["reward"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1.0, 2.0, 3.0]
    assert list((tmp_path / "runs").glob("events.out.tfevents.*"))
    # resuming from step 2 keeps steps 1-2 only
    MetricsLogger(tmp_path, resume_step=2).close()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.mark.parametrize("name", ["tiny-cpu.yaml", "qwen2.5-3b-medical.yaml"])
def test_shipped_configs_are_valid(name):
    cfg = load_config(["--config", str(ROOT / "scripts" / "configs" / name)])
    assert cfg.num_generations >= 2 and cfg.output_dir.startswith("outputs/")


@pytest.mark.slow
def test_mu_iterations_accumulation_and_micro_batches(tmp_path):
    """num_iterations = 2 (old log-probs kept), 2 accumulation steps split in micro-batches, dapo."""
    from grpo.trainer import train

    cfg = tiny_config(
        tmp_path,
        *(
            "--num_iterations",
            "2",
            "--gradient_accumulation_steps",
            "2",
            "--per_device_train_batch_size",
            "1",
        ),
        *("--train_micro_batch_size", "2", "--loss_type", "dapo", "--learning_rate", "0.02"),
    )
    train(cfg)
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["iteration"]) for r in records] == [(1, 0), (2, 1), (3, 0), (4, 1)]
    # each rollout has 2 prompts x 4 completions, shared by its two optimiser steps
    assert records[0]["reward"] == records[1]["reward"] and records[2]["reward"] == records[3]["reward"]
    # first pass: the policy that sampled (ratio 1); second pass: the ratio has moved exactly when the
    # first pass had a gradient (a rollout whose groups all tie has none)
    for first, second in ((records[0], records[1]), (records[2], records[3])):
        assert first["ratio_mean"] == pytest.approx(1.0, abs=1e-6)
        assert (abs(second["ratio_mean"] - 1.0) > 1e-4) == (first["grad_norm"] > 0)
    assert any(r["grad_norm"] > 0 for r in records[::2])
    key = "sampling/sampling_logp_difference/mean"
    assert key in records[0] and key not in records[1]
    state = json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["data_position"] == 4  # 2 rollouts x (1 prompt x 2 accumulation steps)


@pytest.mark.slow
def test_mask_truncated_completions_leaves_them_out_of_the_loss(tmp_path):
    """With 4-token completions every one is truncated: masked out, nothing moves the adapter."""
    from safetensors.torch import load_file

    from grpo.trainer import train

    train(tiny_config(tmp_path, "--max_completion_length", "4", "--mask_truncated_completions", "true"))
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert all(r["completions/clipped_ratio"] == 1.0 for r in records)
    assert all(r["loss"] == 0.0 and r["grad_norm"] == 0.0 for r in records)
    weights = load_file(str(tmp_path / "checkpoint-4" / "adapter_model.safetensors"))
    assert all(v.abs().sum() == 0 for k, v in weights.items() if "lora_B" in k)


STREAM_RUN = """
import sys
sys.modules["datasets"] = None  # as on the GPU benchmark image: importing it fails
sys.path[:0] = [sys.argv[1], sys.argv[1] + "/tests"]
from tiny_run import tiny
from grpo.config import load_config
from grpo.trainer import grpo_step, setup

class OnePrompt:
    def rows(self, start, count):
        prompt = [{"role": "user", "content": "What is 2 + 3?"}]
        return [{"prompt": prompt, "answer": "5", "db_set": "gsm8k"}] * count

cfg = load_config([*tiny(sys.argv[3]), "--per_device_train_batch_size", "2", "--max_completion_length", "8",
                   "--max_steps", "1", "--output_dir", sys.argv[2]])
record = grpo_step(setup(cfg, OnePrompt()))[-1]
print("REWARD", record["reward"], "ROWS", cfg.per_device_train_batch_size * cfg.num_generations)
"""


def test_setup_takes_a_prompt_stream_in_place_of_the_data_mixture(tmp_path):
    """setup(cfg, train_data) trains on the given stream and never imports `datasets` (bench_step's presets:
    a model folder and synthetic prompts). The tiny model's folder is resolved here: building it reads the
    bundled data."""
    from models.policy import resolve_model_path

    model_dir = resolve_model_path("tiny-qwen2-instruct")
    script = tmp_path / "stream_run.py"
    script.write_text(STREAM_RUN)
    done = subprocess.run(
        [sys.executable, str(script), str(ROOT), str(tmp_path / "run"), model_dir],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("REWARD"))
    reward, rows = float(line.split()[1]), int(line.split()[3])
    assert rows == 8 and 0.0 <= reward <= 4.0
