"""Every rule of grpo/validation.py's ``validate`` triggered once: (field overrides, the field the one-line error
must name, words it must contain). A new rule without a row here fails ``test_every_range_rule_has_a_case``
(for RANGES) or is a gap a reviewer can see in the list below, which follows validate's order."""

from __future__ import annotations

import importlib.util
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from grpo.config import ConfigError, GRPOConfig
from grpo.validation import RANGES

ROOT = Path(__file__).resolve().parents[1]
FUNCS = ["xmlcount_reward_func", "correctness_reward_func"]

# (overrides, field named first in the error, words the error contains)
CASES = [
    # ------------------------------------------------------------ types, choices, finite numbers
    (dict(lora_r="8"), "lora_r", ["expected int"]),
    (dict(lora_r=True), "lora_r", ["expected int"]),  # a bool is not an int here
    (dict(learning_rate="1e-5"), "learning_rate", ["expected float"]),
    (dict(load_in_4bit=1), "load_in_4bit", ["expected bool"]),
    (dict(model_name_or_path=3), "model_name_or_path", ["expected str"]),
    (dict(epsilon_high="0.28"), "epsilon_high", ["expected float"]),  # Optional[float]
    (dict(lora_target_modules="q_proj"), "lora_target_modules", ["expected a list"]),
    (dict(reward_weights=[1.0, "2"]), "reward_weights", ["expected float"]),  # an item of a list
    (dict(loss_type="ppo"), "loss_type", ["must be one of grpo, bnpo, dr_grpo, dapo"]),
    (dict(learning_rate=math.nan), "learning_rate", ["must be a finite number"]),
    (dict(dataset_mixture=[0.5, math.inf, 0.1]), "dataset_mixture", ["must be a finite number"]),
    # ------------------------------------------------------------ RANGES (one row each, in their order)
    *[
        (dict(**{name: 0}), name, ["must be > 0"])
        for name in (
            "max_prompt_length",
            "max_completion_length",
            "max_steps",
            "save_steps",
            "logging_steps",
            "per_device_train_batch_size",
            "gradient_accumulation_steps",
            "num_iterations",
            "lora_r",
            "lora_alpha",
            "pubmedqa_max_context_chars",
            "max_nonfinite_updates",
            "eval_size",
            "max_sampling_rounds",
        )
    ],  # fmt: skip
    (dict(temperature=0.0), "temperature", ["must be > 0"]),
    (dict(num_generations=1), "num_generations", ["must be >= 2", "two completions"]),
    (dict(learning_rate=1.0), "learning_rate", ["must be in (0, 1)"]),
    (dict(eval_steps=-1), "eval_steps", ["must be >= 0"]),
    (dict(epsilon=-0.1), "epsilon", ["must be >= 0"]),
    (dict(beta=-0.01), "beta", ["must be >= 0"]),
    (dict(weight_decay=-0.1), "weight_decay", ["must be >= 0"]),
    (dict(entropy_coef=-0.01), "entropy_coef", ["must be >= 0"]),
    (dict(epsilon_high=-0.1), "epsilon_high", ["must be >= 0", "null = epsilon"]),
    (dict(delta=1.0), "delta", ["must be > 1", "1 + epsilon_high"]),
    (dict(clip_ratio_c=1.0), "clip_ratio_c", ["must be > 1"]),
    (dict(top_p=0.0), "top_p", ["must be in (0, 1]"]),
    (dict(top_p=1.5), "top_p", ["must be in (0, 1]"]),
    (dict(top_k=-1), "top_k", ["must be >= 0"]),
    (dict(lora_dropout=1.0), "lora_dropout", ["must be in [0, 1)"]),
    (dict(warmup_ratio=1.5), "warmup_ratio", ["must be in [0, 1]"]),
    (dict(adam_beta1=1.0), "adam_beta1", ["must be in [0, 1)"]),
    (dict(adam_beta2=-0.1), "adam_beta2", ["must be in [0, 1)"]),
    (dict(max_grad_norm=-1.0), "max_grad_norm", ["must be >= 0"]),
    (dict(vllm_gpu_memory_utilization=0.0), "vllm_gpu_memory_utilization", ["must be in (0, 1]"]),
    (dict(vllm_server_port=70000), "vllm_server_port", ["port number"]),
    (dict(vllm_server_timeout=0.0), "vllm_server_timeout", ["must be > 0"]),
    (dict(vllm_server_base_url="localhost:8000"), "vllm_server_base_url", ["http://"]),
    (dict(top_entropy_quantile=0.0), "top_entropy_quantile", ["must be in (0, 1]"]),
    (dict(entropy_coef_min=-0.1), "entropy_coef_min", ["must be >= 0"]),
    (dict(entropy_coef_max=-0.1), "entropy_coef_max", ["must be >= 0"]),
    (dict(entropy_coef_delta=-0.1), "entropy_coef_delta", ["must be >= 0"]),
    (dict(entropy_target=-0.1), "entropy_target", ["must be >= 0"]),
    (dict(off_policy_mask_threshold=0.0), "off_policy_mask_threshold", ["must be > 0"]),
    (dict(vllm_importance_sampling_clip_min=-0.5), "vllm_importance_sampling_clip_min", ["must be >= 0"]),
    (dict(vllm_importance_sampling_clip_max=0.0), "vllm_importance_sampling_clip_max", ["must be > 0"]),
    (dict(vllm_importance_sampling_cap=0.0), "vllm_importance_sampling_cap", ["must be > 0"]),
    (dict(steps_per_generation=0), "steps_per_generation", ["must be > 0"]),
    (dict(num_completions_to_print=0), "num_completions_to_print", ["must be > 0"]),
    (dict(save_total_limit=0), "save_total_limit", ["must be > 0"]),
    (dict(soft_punish_cache=-1), "soft_punish_cache", ["must be >= 0"]),
    (dict(reward_num_workers=-1), "reward_num_workers", ["must be >= 0"]),
    (dict(reward_timeout=0.0), "reward_timeout", ["must be > 0"]),
    (dict(judge_timeout=0.0), "judge_timeout", ["must be > 0"]),
    (dict(judge_max_concurrency=0), "judge_max_concurrency", ["must be > 0"]),
    (dict(model_name_or_path=""), "model_name_or_path", ["must not be empty"]),
    (dict(output_dir=""), "output_dir", ["must not be empty"]),
    (dict(lora_target_modules=[]), "lora_target_modules", ["must name at least one module"]),
    (dict(reward_funcs=[]), "reward_funcs", ["must name at least one reward function"]),
    # ------------------------------------------------------------ data and logging
    (dict(dataset_mixture=[0.5, 0.5]), "dataset_mixture", ["needs 3 probabilities"]),
    (dict(dataset_mixture=[-0.5, 1.0, 0.5]), "dataset_mixture", [">= 0 and not all zero"]),
    (dict(dataset_mixture=[0.0, 0.0, 0.0]), "dataset_mixture", [">= 0 and not all zero"]),
    (dict(dataset_config="main"), "dataset_config", ["needs dataset_name"]),
    (dict(dataset_name="  "), "dataset_name", ["must name local files or a hub dataset"]),
    (dict(dataset_name="rows.jsonl", dataset_train_split=""), "dataset_train_split", ["must name a split"]),
    (dict(dataset_name="rows.jsonl", eval_steps=10), "eval_steps", ["needs dataset_test_split"]),
    (dict(report_to="wandb"), "report_to", ["wandb is not installed", "pip install wandb"]),
    (dict(report_to="trackio"), "report_to", ["trackio is not installed"]),
    (dict(vllm_mode="server", sampler="hf"), "sampler", ["vllm_mode: server", "set sampler: vllm"]),
    # ------------------------------------------------------------ rewards
    (dict(reward_funcs=FUNCS + FUNCS[:1]), "reward_funcs", ["names a function twice"]),
    (dict(reward_funcs=["length_bonus"]), "reward_funcs", ["unknown 'length_bonus'", "import path"]),
    (dict(reward_funcs=["no_such_package_xyz.rewards:bonus"]), "reward_funcs", ["cannot find module"]),
    (
        dict(reward_funcs=FUNCS, reward_weights=[1.0]),
        "reward_weights",
        ["one weight per reward function (2)"],
    ),
    (
        dict(
            reward_funcs=[*FUNCS, "soft_overlong_punishment"],
            max_completion_length=100,
            soft_punish_cache=200,
        ),
        "soft_punish_cache",
        ["must be <= max_completion_length = 100"],
    ),
    # ------------------------------------------------------------ the objective (grpo/objectives.py's table)
    (
        dict(loss_type="luspo"),
        "importance_sampling_level",
        ["luspo is a sequence-level loss: set importance_sampling_level: sequence"],
    ),
    (
        dict(loss_type="vespo", importance_sampling_level="sequence"),
        "importance_sampling_level",
        ["vespo forms"],
    ),
    (
        dict(loss_type="gmpo", importance_sampling_level="sequence"),
        "importance_sampling_level",
        ["gmpo forms"],
    ),
    (dict(loss_type="sapo", delta=4.0), "delta", ["acts on the clipped losses", "not sapo"]),
    (dict(loss_type="cispo", clip_ratio_c=3.0), "clip_ratio_c", ["clipped losses (grpo, bnpo", "not cispo"]),
    (
        dict(loss_type="vespo", sampler="vllm"),  # TRL: vespo takes token-level IS weights only
        "vllm_importance_sampling_mode",
        ["vespo takes per-token importance weights", "token_truncate"],
    ),
    (
        dict(multi_objective_aggregation="normalize_then_sum", scale_rewards="batch"),
        "scale_rewards",
        ["GDPO", "keep scale_rewards: group"],
    ),
    (
        dict(entropy_coef_min=0.5, entropy_coef_max=0.1),
        "entropy_coef_min",
        ["must be <= entropy_coef_max = 0.1"],
    ),
    (
        dict(vllm_importance_sampling_clip_min=3.0),
        "vllm_importance_sampling_clip_min",
        ["must be < vllm_importance_sampling_clip_max = 3.0"],
    ),
    (
        dict(
            vllm_importance_sampling_clip_min=2.5, vllm_importance_sampling_cap=2.0
        ),  # the deprecated name wins
        "vllm_importance_sampling_clip_min",
        ["must be < vllm_importance_sampling_clip_max = 2.0"],
    ),
    # ------------------------------------------------------------ batching
    (dict(train_micro_batch_size=4), "train_micro_batch_size", ["must divide", "= 6"]),
    (
        dict(steps_per_generation=3, gradient_accumulation_steps=2),
        "steps_per_generation",
        ["must be a multiple of gradient_accumulation_steps = 2"],
    ),
    (
        dict(vllm_max_model_len=1000),
        "vllm_max_model_len",
        ["must be >= max_prompt_length + max_completion_length"],
    ),
]


@pytest.fixture
def no_optional_sinks(monkeypatch):
    """wandb and trackio look uninstalled, whatever this machine has."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("wandb", "trackio") else find_spec(name, *a),
    )


@pytest.mark.parametrize("overrides, field, words", CASES, ids=[f"{c[1]}-{i}" for i, c in enumerate(CASES)])
def test_each_rule_names_its_field_in_one_line(overrides, field, words, no_optional_sinks):
    with pytest.raises(ConfigError) as raised:
        GRPOConfig(**overrides)
    message = str(raised.value)
    assert "\n" not in message
    assert message.startswith(f"{field}="), message
    for word in words:
        assert word in message, message


def test_every_range_rule_has_a_case():
    covered = {field for overrides, field, _ in CASES if len(overrides) == 1}
    missing = [name for name, _, _ in RANGES if name not in covered]
    assert missing == [], f"RANGES rows without a case in CASES: {missing}"


@pytest.mark.parametrize(
    "overrides",
    [
        dict(loss_type="luspo", importance_sampling_level="sequence"),
        dict(loss_type="vespo", sampler="vllm", vllm_importance_sampling_mode="token_truncate"),
        dict(loss_type="vespo", sampler="vllm", vllm_importance_sampling_correction=False),
        dict(loss_type="vespo", sampler="hf"),  # HF generate: no IS weights, any mode is fine
        dict(loss_type="dapo", delta=4.0, clip_ratio_c=3.0),
        dict(multi_objective_aggregation="normalize_then_sum"),
        dict(vllm_importance_sampling_clip_min=0.5),
    ],
)
def test_the_valid_neighbours_of_the_rules_pass(overrides):
    GRPOConfig(**overrides)


def test_readme_example_error_is_what_the_cli_prints():
    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"`(config error: [^`]+)`", readme)
    assert examples, "README.md quotes no config error"
    args = {
        "config error: importance_sampling_level='token': luspo is a sequence-level loss: set "
        "importance_sampling_level: sequence": ["--loss_type", "luspo"],
    }
    for example in examples:
        assert example in args, f"README example with no test: {example}"
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train.py"), *args[example]],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=ROOT,
        )
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [example]
