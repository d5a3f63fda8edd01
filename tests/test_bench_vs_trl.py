"""scripts/bench_vs_trl.py: its small functions against hand-worked numbers, the mapping of our config onto
TRL's GRPOConfig, and one end-to-end run on a very short setting (slow; skipped without TRL).

The end-to-end test checks what the benchmark claims, not its timings: both trainers saw the same prompts at
every step, TRL's tokenisation and rewards of one batch equal ours exactly, both start from the same adapter,
and on that batch the two losses and gradients agree (the same objective computed twice).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "bench_vs_trl.py"
TINY_CONFIG = "scripts/configs/tiny-cpu.yaml"


def _load_script():
    spec = importlib.util.spec_from_file_location("bench_vs_trl", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_script()


# ---------------------------------------------------------------------------- small functions


def test_reward_gain_is_last_quarter_minus_first_quarter():
    assert bench.reward_gain([0, 1, 1, 2, 2, 3, 3, 4]) == pytest.approx(3.5 - 0.5)
    assert bench.reward_gain([1, 5, 2]) == pytest.approx(2 - 1)  # a quarter of 3 steps is one step
    assert bench.reward_gain([7.0]) == 0.0
    with pytest.raises(ValueError, match="at least one"):
        bench.reward_gain([])


def test_mean_and_stderr():
    mean, stderr = bench.mean_and_stderr([1.0, 2.0, 3.0])
    assert mean == pytest.approx(2.0)
    assert stderr == pytest.approx(1 / math.sqrt(3))  # sample std 1.0 over sqrt(3)
    assert bench.mean_and_stderr([0.25]) == (0.25, None)


def test_pair_order_alternates_who_runs_first():
    assert bench.pair_order(3) == [
        (0, "ours"),
        (0, "trl"),
        (1, "trl"),
        (1, "ours"),
        (2, "ours"),
        (2, "trl"),
    ]


def test_relative_difference():
    ours, reference = torch.tensor([3.0, 4.001], dtype=torch.float64), torch.tensor([3.0, 4.0])
    assert bench.relative_difference(ours, reference) == pytest.approx(0.001 / 5, rel=1e-6)
    assert bench.relative_difference(torch.zeros(2), torch.zeros(2)) == 0.0


def test_phase_seconds_takes_the_first_alternative_present():
    record = {"time/generate": 1.5, "time/score": 0.25, "time/optimizer": 0.125}
    assert bench.phase_seconds(record, "generate_and_score", "generate+score") == 1.75
    assert bench.phase_seconds({"time/generate_and_score": 2.0, **record}, "generate_and_score") == 2.0
    assert bench.phase_seconds(record, "sync") == 0.0


def test_prompts_fingerprint_ignores_order_and_repeats():
    a = {"prompt": [{"role": "user", "content": "a"}]}
    b = {"prompt": [{"role": "user", "content": "b"}]}
    assert bench.prompts_fingerprint([a, b, a]) == bench.prompts_fingerprint([b, a])
    assert bench.prompts_fingerprint([a]) != bench.prompts_fingerprint([b])


# ---------------------------------------------------------------------------- our config -> TRL's


def _cfg(tmp_path, *overrides):
    return bench.bench_config(
        TINY_CONFIG, list(overrides), steps=20, seed=None, output_dir=str(tmp_path / "run")
    )


def test_trl_config_does_the_same_work(tmp_path):
    pytest.importorskip("trl")
    cfg = _cfg(tmp_path, "--loss_type", "dapo", "--lr_scheduler_type", "constant", "--epsilon_high", "0.28")
    trl_cfg = bench.trl_grpo_config(cfg, str(tmp_path / "trl"))
    # TRL counts completions per device: 6 prompts x 8 completions
    assert trl_cfg.per_device_train_batch_size == 48
    assert trl_cfg.num_generations == 8 and trl_cfg.generation_batch_size == 48
    assert trl_cfg.steps_per_generation == 1 and trl_cfg.num_iterations == 1
    # the defaults of TRL that differ from ours, each set from our config
    assert trl_cfg.loss_type == "dapo" and trl_cfg.epsilon_high == 0.28
    assert trl_cfg.use_bias_correction_kl is False
    assert trl_cfg.shuffle_dataset is False
    assert trl_cfg.gradient_checkpointing is False  # tiny-cpu.yaml; TRL's default is True
    assert trl_cfg.bf16 is False and trl_cfg.fp16 is False  # dtype fp32
    assert trl_cfg.scale_rewards == "group" and trl_cfg.beta == 0.04
    # sampling: no top-k / top-p / repetition penalty, temperature 1, HF generate
    assert (trl_cfg.top_k, trl_cfg.top_p, trl_cfg.repetition_penalty, trl_cfg.temperature) == (
        0,
        1.0,
        1.0,
        1.0,
    )
    assert trl_cfg.use_vllm is False and trl_cfg.max_completion_length == 40
    # optimisation: the 8-bit AdamW, our schedule with ceil(0.05 x 20) = 1 warm-up step
    assert trl_cfg.optim == "adamw_bnb_8bit"
    assert trl_cfg.lr_scheduler_type == "constant_with_warmup"
    assert trl_cfg.warmup_steps == 1
    assert (trl_cfg.learning_rate, trl_cfg.adam_beta2, trl_cfg.weight_decay) == (5e-4, 0.99, 0.1)
    assert trl_cfg.max_grad_norm == 1.0 and trl_cfg.max_steps == 20 and trl_cfg.seed == 3407


def test_settings_trl_cannot_reproduce_are_refused(tmp_path):
    for overrides, named in (
        (("--kl_estimator", "k1"), "kl_estimator"),
        (("--sampler", "vllm"), "sampler"),
        (("--loss_type", "gmpo"), "gmpo"),
        (("--dynamic_sampling", "true"), "dynamic_sampling"),
        (
            ("--reward_funcs", "soft_overlong_punishment", "--soft_punish_cache", "8"),
            "soft_overlong_punishment",
        ),
    ):
        with pytest.raises(bench.NotComparable, match=named):
            bench.check_comparable(_cfg(tmp_path, *overrides))
    bench.check_comparable(_cfg(tmp_path))  # the embedded default is comparable


def test_rows_for_steps_counts_whole_rollouts(tmp_path):
    assert bench.rows_for_steps(_cfg(tmp_path)) == 20 * 6
    # 2 optimiser steps per rollout of 3 x 4 = 12 prompts: 20 steps need 10 rollouts
    cfg = _cfg(tmp_path, "--per_device_train_batch_size", "3", "--steps_per_generation", "4",
               "--gradient_accumulation_steps", "2")  # fmt: skip
    assert bench.rows_for_steps(cfg) == 10 * 12


# ---------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_end_to_end_on_a_very_short_setting(tmp_path):
    pytest.importorskip("trl")
    output = tmp_path / "bench.json"
    command = [
        sys.executable, str(SCRIPT), "--steps", "2", "--pairs", "1", "--output", str(output),
        "--per_device_train_batch_size", "2", "--num_generations", "4",
    ]  # fmt: skip
    completed = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    report = json.loads(output.read_text())
    assert "reward gain" in completed.stdout and "ours/TRL" in completed.stdout

    runs = report["runs"]
    assert [(r["pair"], r["trainer"]) for r in runs] == [(0, "ours"), (0, "trl")]
    for run in runs:
        assert len(run["steps"]) == 2
        for step in run["steps"]:
            # the phases and "other" add up to the step
            assert sum(step["phases"].values()) == pytest.approx(step["step_time"], rel=1e-9, abs=1e-9)
            assert step["phases"]["generate"] > 0 and step["phases"]["forward_backward"] > 0
            assert 0.0 <= step["reward"] <= 4.0  # five rewards, at most 4.0 together
        assert run["summary"]["reward_gain"] == pytest.approx(
            run["steps"][1]["reward"] - run["steps"][0]["reward"]
        )
    # the same rows, in the same order, on both sides: two different batches of prompts, the same each step
    ours, trl = ([s["prompts"] for s in r["steps"]] for r in runs)
    assert ours == trl and ours[0] != ours[1]
    assert report["summary"]["same_prompts_every_step"] is True

    summary = report["summary"]
    ours_step, trl_step = summary["ours"]["step_seconds"], summary["trl"]["step_seconds"]
    assert summary["ratio_ours_over_trl"]["step_seconds"] == pytest.approx(ours_step / trl_step)
    assert report["settings"]["trl"]["per_device_train_batch_size"] == 2 * 4
    assert report["settings"]["trl"]["loss_type"] == "grpo"
    assert report["versions"]["trl"] == "1.16.0"

    check = report["same_batch"]
    assert check["completions"] == 2 * 4
    assert check["nonzero_advantages"] > 0  # else only the KL term would be compared
    assert check["prompt_ids_equal"] is True
    assert check["rewards_max_abs_diff"] == 0.0  # our functions under TRL's calling convention
    assert check["initial_adapter_max_abs_diff"] == 0.0  # the same seeded LoRA initialisation
    assert check["ref_logp_max_abs_diff"] < 1e-3
    for variant in ("on_policy", "off_policy"):
        assert check[variant]["loss_rel_diff"] < 1e-4, check[variant]
        assert check[variant]["grad_rel_diff"] < 1e-4, check[variant]
        assert check[variant]["grad_norm_ours"] > 0
    assert check["on_policy"]["clip_ratio_ours"] == 0.0  # ratio exactly 1
    assert check["off_policy"]["clip_ratio_ours"] > 0.0  # moved old log-probs: some ratios are clipped
