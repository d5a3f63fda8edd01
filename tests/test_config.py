"""GRPOConfig: recipe defaults, YAML + CLI overrides, and one clear error per invalid value."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from grpo.config import ConfigError, GRPOConfig, load_config, load_config_or_exit

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_are_the_recipe():
    c = GRPOConfig()
    assert c.model_name_or_path == "Qwen/Qwen2.5-3B-Instruct"
    assert (c.load_in_4bit, c.bnb_4bit_quant_type, c.bnb_4bit_use_double_quant) == (True, "nf4", True)
    assert (c.lora_r, c.lora_alpha) == (64, 64)
    assert c.lora_target_modules == [
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    ]
    assert c.gradient_checkpointing is True
    assert (c.learning_rate, c.adam_beta1, c.adam_beta2, c.weight_decay) == (5e-6, 0.9, 0.99, 0.1)
    assert (c.warmup_ratio, c.lr_scheduler_type, c.optim) == (0.1, "cosine", "adamw_8bit")
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps, c.num_generations) == (1, 1, 6)
    assert (c.max_prompt_length, c.max_completion_length, c.max_steps) == (1024, 1024, 750)
    assert (c.save_steps, c.max_grad_norm, c.logging_steps, c.seed) == (100, 0.1, 1, 3407)
    assert (c.beta, c.epsilon, c.epsilon_high, c.effective_epsilon_high) == (0.04, 0.2, None, 0.2)
    assert (c.loss_type, c.scale_rewards, c.num_iterations, c.kl_estimator) == ("grpo", "group", 1, "k3")
    assert c.dtype == "auto" and c.mask_truncated_completions is False and c.reward_weights is None


def _write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def test_yaml_then_cli_overrides(tmp_path):
    path = _write(
        tmp_path,
        """
        learning_rate: 1.0e-5
        num_generations: 4
        loss_type: dapo
        epsilon_high: 0.28
        reward_weights: [1, 1, 1, 1, 2]
        load_in_4bit: false
        """,
    )
    c = load_config(["--config", path])
    assert (c.learning_rate, c.num_generations, c.loss_type) == (1e-5, 4, "dapo")
    assert (c.effective_epsilon_high, c.reward_weights, c.load_in_4bit) == (0.28, [1, 1, 1, 1, 2], False)
    assert c.beta == 0.04  # untouched fields keep the recipe default
    # the command line wins over the file; --config may come anywhere, also as --config=FILE
    c = load_config(
        ["--num_generations", "8", f"--config={path}", "--loss_type", "grpo", "--load_in_4bit", "true"]
    )
    assert (c.num_generations, c.loss_type, c.learning_rate, c.load_in_4bit) == (8, "grpo", 1e-5, True)
    c = load_config(["--reward_weights", "2", "1", "1", "1", "1", "--epsilon_high", "0.3"])
    assert c.reward_weights == [2.0, 1.0, 1.0, 1.0, 1.0] and c.epsilon_high == 0.3


def test_yaml_string_numbers_are_converted(tmp_path):
    # YAML 1.1 reads 5e-6 (no dot) as a string; it must still become a float
    c = load_config(["--config", _write(tmp_path, "learning_rate: 5e-6\n")])
    assert c.learning_rate == 5e-6


INVALID_CLI = [
    (["--num_generations", "1"], "num_generations=1"),
    (["--max_completion_length", "0"], "max_completion_length=0"),
    (["--max_prompt_length", "-5"], "max_prompt_length=-5"),
    (["--learning_rate", "0"], "learning_rate=0.0"),
    (["--learning_rate", "abc"], "--learning_rate"),
    (["--loss_type", "ppo"], "--loss_type"),
    (["--scale_rewards", "global"], "--scale_rewards"),
    (["--kl_estimator", "k4"], "--kl_estimator"),
    (["--epsilon", "-0.1"], "epsilon=-0.1"),
    (["--epsilon_high", "-0.1"], "epsilon_high=-0.1"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size=0"),
    (["--train_micro_batch_size", "4"], "train_micro_batch_size=4"),  # 1 prompt x 6 completions
    (["--num_iterations", "0"], "num_iterations=0"),
    (["--temperature", "0"], "temperature=0.0"),
    (["--beta", "-1"], "beta=-1.0"),
    (["--reward_weights", "1", "2"], "reward_weights"),
    (["--reward_funcs", "nope"], "reward_funcs"),
    (["--dataset_mixture", "1", "0"], "dataset_mixture"),
    (["--warmup_ratio", "2"], "warmup_ratio=2.0"),
    (["--no_such_field", "1"], "--no_such_field"),
    (["--config", "/does/not/exist.yaml"], "/does/not/exist.yaml"),
    (["--config"], "--config"),
]


@pytest.mark.parametrize("argv, needle", INVALID_CLI)
def test_invalid_cli_values_name_the_field(argv, needle):
    with pytest.raises(ConfigError) as err:
        load_config(argv)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    "yaml_text, needle",
    [
        ("num_generations: 1\n", "num_generations=1"),
        ("num_generations: 2.5\n", "num_generations=2.5"),
        ("loss_type: ppo\n", "loss_type='ppo'"),
        ("bogus_field: 3\n", "bogus_field"),
        ("learning_rate: -1.0\n", "learning_rate=-1.0"),
        ("lora_target_modules: q_proj\n", "lora_target_modules"),
        ("- just\n- a list\n", "mapping"),
        ("a: [unclosed\n", "not valid YAML"),
        ("per_device_train_batch_size: 2\ntrain_micro_batch_size: 5\n", "train_micro_batch_size=5"),
    ],
)
def test_invalid_yaml_values_name_the_field(tmp_path, yaml_text, needle):
    with pytest.raises(ConfigError) as err:
        load_config(["--config", _write(tmp_path, yaml_text)])
    assert needle in str(err.value)


def test_batch_sizes_that_fit_the_group_are_accepted():
    c = load_config(["--per_device_train_batch_size", "2", "--train_micro_batch_size", "4"])
    assert c.train_micro_batch_size == 4  # 2 prompts x 6 = 12 completions, in passes of 4


def test_cli_prints_one_line_and_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_config_or_exit(["--num_generations", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.strip() == (
        "config error: num_generations=1: must be >= 2 (a group needs two completions to compare)"
    )


def test_config_reference_is_up_to_date():
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "config_reference.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_the_names_the_config_accepts_are_the_names_the_math_knows():
    """grpo/config.py keeps its own copies (validation imports no torch): they must agree with grpo/loss.py."""
    import grpo.config as config
    import grpo.loss as loss

    assert config.LOSS_TYPES == loss.LOSS_TYPES
    assert config.KL_ESTIMATORS == loss.KL_ESTIMATORS
    assert config.SAMPLER_IS_MODES == loss.SAMPLER_IS_MODES
