"""The scripts as a user meets them (issue 14 §4, §6): every error a user can cause ends scripts/train.py
with exactly one line on stderr naming the problem, a non-zero exit status and no traceback; --help;
--debug; a reward module in the working folder; where scripts/evaluate.py writes its report. Also what
train.py says before it starts (issue 19 §4, §7; issue 23 §3): the accelerate settings it refuses, one run per
output folder, and the ``config warning:`` lines.

Each bad input runs scripts/train.py in a subprocess (offline, the tiny model, the bundled fixtures) and
fails before any training step.
"""

from __future__ import annotations

import dataclasses
import doctest
import importlib
import importlib.util
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tiny_run import tiny

from grpo.config import ConfigError, load_config
from grpo.run_folder import RUN_HOLDER, RUN_LOCK, checkpoint_dirs, process_is_running, read_holder
from grpo.validation import SUPPORTED_LAUNCHES, AccelerateConfigError, accelerate_dtype, config_warnings

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "data" / "fixtures"
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"
EVALUATE_SCRIPT = ROOT / "scripts" / "evaluate.py"

# A small run on the random tiny model: every error here comes before a training step, so no warm-started model is needed
# (and the random one's cache does not change when data/*.py does).
TINY_ARGS = [
    *tiny("tiny-random-qwen2"), "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2",
    "--max_completion_length", "16", "--max_steps", "2", "--save_steps", "1", "--seed", "7",
]  # fmt: skip


def train_environment(**env: str) -> dict[str, str]:
    """The caller's environment, offline, unbuffered, without GRPO_DEBUG, plus ``env``."""
    environment = {k: v for k, v in os.environ.items() if k != "GRPO_DEBUG"}
    environment.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    return environment


def run_train(*args: str, cwd: Path = ROOT, **env: str) -> subprocess.CompletedProcess:
    """scripts/train.py in a subprocess, offline, without GRPO_DEBUG from the caller's environment."""
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=train_environment(**env),
        cwd=cwd,
        timeout=900,
    )


def the_one_line(result: subprocess.CompletedProcess, status: int = 1) -> str:
    """The single stderr line of a run that failed with ``status``; fails on a traceback or any other line
    (a progress bar counts: str.splitlines splits at its carriage returns)."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr[-3000:]
    assert result.returncode == status, result.stderr[-3000:]
    return lines[0]


def tiny_run(tmp_path: Path, *extra: str, **env: str) -> subprocess.CompletedProcess:
    return run_train(*TINY_ARGS, "--output_dir", str(tmp_path / "out"), *extra, **env)


def gsm8k_files(tmp_path: Path, train_text: str) -> tuple[Path, str]:
    """A gsm8k train file with ``train_text`` beside a good test file; (train file, the --gsm8k_data_files value)."""
    train = tmp_path / "gsm8k_train.jsonl"
    train.write_text(train_text)
    shutil.copy(FIXTURES / "gsm8k_test.jsonl", tmp_path / "gsm8k_test.jsonl")
    return train, str(tmp_path / "gsm8k_{split}.jsonl")


GOOD_ROW = json.dumps({"question": "Q?", "answer": "1 + 1 = 2\n#### 2"})


# ---------------------------------------------------------------------------- data


def test_a_broken_json_line(tmp_path):
    train, pattern = gsm8k_files(tmp_path, f'{GOOD_ROW}\n{{"question": "Q?", "answer": \n{GOOD_ROW}\n')
    line = the_one_line(tiny_run(tmp_path, "--gsm8k_data_files", pattern))
    assert line.startswith(f"data error: gsm8k: could not read {train}: line 2: not valid JSON ("), line


def test_an_empty_data_file(tmp_path):
    train, pattern = gsm8k_files(tmp_path, "")
    line = the_one_line(tiny_run(tmp_path, "--gsm8k_data_files", pattern))
    assert line == f"data error: gsm8k: could not read {train}: the file is empty"


def test_a_missing_data_file(tmp_path):
    line = the_one_line(tiny_run(tmp_path, "--gsm8k_data_files", str(tmp_path / "nothing_{split}.jsonl")))
    assert line == f"data error: gsm8k: no data file matches '{tmp_path}/nothing_train.jsonl' (split 'train')"


def test_all_rows_bad(tmp_path):
    bad = [{"question": "Q?", "answer": "no marker"}, {"question": "", "answer": "#### 1"}]
    train, pattern = gsm8k_files(tmp_path, "".join(json.dumps(r) + "\n" for r in bad))
    line = the_one_line(tiny_run(tmp_path, "--gsm8k_data_files", pattern))
    assert line.startswith(f"data error: gsm8k: no valid row left in {train} (2 row(s) read; malformed: "), (
        line
    )
    assert (
        "no '####' line in answer: 1 (first at row 0)" in line
        and "empty question: 1 (first at row 1)" in line
    )


# ---------------------------------------------------------------------------- model and LoRA


def test_a_model_path_that_does_not_exist(tmp_path):
    missing = tmp_path / "no_model_here"
    line = the_one_line(tiny_run(tmp_path, "--model_name_or_path", str(missing)))
    assert line.startswith(f"model error: model_name_or_path='{missing}': no such folder"), line


def test_a_folder_that_is_not_a_model(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("not a model")
    line = the_one_line(tiny_run(tmp_path, "--model_name_or_path", str(folder)))
    assert (
        line
        == f"model error: model_name_or_path='{folder}': the folder {folder} has no config.json (not a model folder)"
    )


def test_lora_target_modules_that_the_model_does_not_have(tmp_path):
    line = the_one_line(tiny_run(tmp_path, "--lora_target_modules", "foo_proj"))
    assert "lora_target_modules" in line and "foo_proj" in line, line


# ---------------------------------------------------------------------------- output folder and checkpoints


def test_an_unwritable_output_dir(tmp_path):
    regular_file = tmp_path / "a_file"
    regular_file.write_text("")
    output_dir = regular_file / "out"  # a folder cannot be made under a regular file
    line = the_one_line(run_train(*TINY_ARGS, "--output_dir", str(output_dir)))
    assert line.startswith(f"output_dir error: output_dir '{output_dir}' is not writable"), line


def test_resume_latest_without_a_checkpoint(tmp_path):
    line = the_one_line(tiny_run(tmp_path, "--resume_from_checkpoint", "latest"))
    assert line.startswith("checkpoint error: resume_from_checkpoint='latest': no checkpoint-<step>/ in "), (
        line
    )
    assert str(tmp_path / "out") in line


@pytest.mark.parametrize("kind", ["missing", "empty folder"])
def test_a_bad_resume_path(tmp_path, kind):
    path = tmp_path / "checkpoint-3"
    if kind == "empty folder":
        path.mkdir()
    line = the_one_line(tiny_run(tmp_path, "--resume_from_checkpoint", str(path)))
    assert line.startswith(f"checkpoint error: resume_from_checkpoint='{path}': {path}"), line
    assert ("no such checkpoint folder" in line) == (kind == "missing")


def wait_for(condition, what: str, timeout: float = 600.0):
    """Poll ``condition`` (a file written, a process gone) until it returns something true, and return it."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


def dead_pid() -> int:
    """The pid of a process that has just ended (and been reaped)."""
    done = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(done.stdout)
    assert not process_is_running(pid)
    return pid


@pytest.mark.slow
def test_two_runs_started_at_once_into_one_folder(tmp_path):
    """A scheduler starts the same job twice: exactly one trains, the other stops at once with one line naming
    the holder. The folder also holds the record of a run that was killed (a dead pid): the run that trains
    takes its lock over and says so. Once a run holds the lock it is paused (SIGSTOP) until the other has
    exited, so the other meets the lock however the two are scheduled."""
    out = tmp_path / "out"
    out.mkdir()
    host, killed = socket.gethostname(), dead_pid()
    (out / RUN_HOLDER).write_text(
        json.dumps({"host": host, "pid": killed, "started": "2025-01-01T00:00:00+00:00"})
    )
    runs = {}  # pid -> (name, process)
    for name in ("a", "b"):
        with open(tmp_path / f"{name}.out", "w") as stdout, open(tmp_path / f"{name}.err", "w") as stderr:
            proc = subprocess.Popen(
                [sys.executable, str(TRAIN_SCRIPT), *TINY_ARGS, "--output_dir", str(out)],
                stdout=stdout, stderr=stderr, env=train_environment(), cwd=ROOT,
            )  # fmt: skip
        runs[proc.pid] = (name, proc)
    try:
        holder = wait_for(
            lambda: (h := read_holder(out)) and h["pid"] in runs and h, "a run to lock the folder"
        )
        winner_name, winner = runs[holder["pid"]]
        loser_name, loser = next(run for pid, run in runs.items() if pid != winner.pid)
        winner.send_signal(signal.SIGSTOP)
        loser.wait(timeout=600)
        winner.send_signal(signal.SIGCONT)
        winner.wait(timeout=900)
    finally:
        for _, proc in runs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
                proc.wait()
    err = {name: (tmp_path / f"{name}.err").read_text() for name in ("a", "b")}
    assert winner.returncode == 0, err[winner_name][-3000:]
    assert "Traceback" not in err[loser_name], err[loser_name][-3000:]
    assert loser.returncode == 1 and err[loser_name].strip().splitlines() == [
        f"output_dir error: output_dir '{out}' is in use by another run: pid {winner.pid} on host {host} "
        f"(started {holder['started']}); wait for it to end, or choose another --output_dir"
    ], err[loser_name][-3000:]
    took_over = [
        line for line in (tmp_path / f"{winner_name}.out").read_text().splitlines() if "lock" in line
    ]
    assert took_over == [
        f"output_dir '{out}': took over the lock left by pid {killed} on host {host} "
        "(started 2025-01-01T00:00:00+00:00), which is no longer running"
    ]
    # one run's outputs: its 2 steps once each, its 2 checkpoints; the lock is free again
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert [p.name for p in checkpoint_dirs(out)] == ["checkpoint-1", "checkpoint-2"]
    assert (out / RUN_LOCK).exists() and not (out / RUN_HOLDER).exists()


# ---------------------------------------------------------------------------- accelerate launch


@pytest.mark.parametrize(
    "variable, value, what",
    [
        ("ACCELERATE_MIXED_PRECISION", "fp16", "mixed_precision fp16 (ACCELERATE_MIXED_PRECISION=fp16) is not supported"),
        ("ACCELERATE_USE_DEEPSPEED", "true", "DeepSpeed (ACCELERATE_USE_DEEPSPEED=true) is not supported"),
        ("ACCELERATE_USE_FSDP", "true", "FSDP (ACCELERATE_USE_FSDP=true) is not supported"),
    ],
)  # fmt: skip
def test_an_unsupported_accelerate_config_stops_before_anything_starts(tmp_path, variable, value, what):
    """`accelerate launch` with an fp16, DeepSpeed or FSDP config hands these variables to the process."""
    result = tiny_run(tmp_path, **{variable: value})
    line = the_one_line(result, status=2)
    assert line.startswith(f"accelerate config error: {what}"), line
    assert line.endswith(SUPPORTED_LAUNCHES), line
    # before the process group (its "device:" line), the output folder and the model
    assert result.stdout == "" and not (tmp_path / "out").exists()


def test_accelerate_bf16_against_an_explicit_fp32_dtype_is_one_line(tmp_path):
    # TINY_ARGS set dtype: fp32
    line = the_one_line(tiny_run(tmp_path, ACCELERATE_MIXED_PRECISION="bf16"), status=2)
    assert line == (
        "accelerate config error: accelerate's mixed_precision bf16 (ACCELERATE_MIXED_PRECISION=bf16) and the "
        "config's dtype fp32 disagree: set dtype: bf16 (or auto), or launch with --mixed_precision no"
    )


MP = "ACCELERATE_MIXED_PRECISION"


@pytest.mark.parametrize(
    "dtype, environ, expected",
    [
        ("auto", {}, "auto"), ("fp32", {MP: "no"}, "fp32"), ("fp16", {}, "fp16"),  # no mixed precision: the config's
        ("auto", {MP: "bf16"}, "bf16"), ("auto", {MP: "BF16"}, "bf16"), ("bf16", {MP: "bf16"}, "bf16"),
        ("auto", {"ACCELERATE_USE_DEEPSPEED": "false", "ACCELERATE_USE_FSDP": "0"}, "auto"),
    ],
)  # fmt: skip
def test_the_dtype_under_a_supported_accelerate_config(dtype, environ, expected):
    assert accelerate_dtype(dtype, environ) == expected


@pytest.mark.parametrize(
    "dtype, environ, start",
    [
        ("fp32", {MP: "bf16"}, "accelerate's mixed_precision bf16 (ACCELERATE_MIXED_PRECISION=bf16) and the config's dtype fp32 disagree"),
        ("fp16", {MP: "bf16"}, "accelerate's mixed_precision bf16 (ACCELERATE_MIXED_PRECISION=bf16) and the config's dtype fp16 disagree"),
        ("bf16", {MP: "fp16"}, "mixed_precision fp16 (ACCELERATE_MIXED_PRECISION=fp16) is not supported (it needs a loss scaler"),
        ("auto", {MP: "fp8"}, "mixed_precision fp8 (ACCELERATE_MIXED_PRECISION=fp8) is not supported; supported: one process"),
        ("auto", {"ACCELERATE_USE_FSDP": "1"}, "FSDP (ACCELERATE_USE_FSDP=1) is not supported"),
        ("auto", {"ACCELERATE_USE_MEGATRON_LM": "True"}, "Megatron-LM (ACCELERATE_USE_MEGATRON_LM=True) is not supported"),
        ("auto", {"ACCELERATE_USE_DEEPSPEED": "yes", MP: "bf16"}, "DeepSpeed (ACCELERATE_USE_DEEPSPEED=yes)"),
    ],
)  # fmt: skip
def test_an_unsupported_accelerate_config_is_a_config_error(dtype, environ, start, train_cli):
    with pytest.raises(AccelerateConfigError) as err:
        accelerate_dtype(dtype, environ)
    assert str(err.value).startswith(start), str(err.value)
    assert isinstance(err.value, ConfigError)
    line, status = train_cli.expected_error(err.value)
    assert line == f"accelerate config error: {err.value}" and status == 2


# ---------------------------------------------------------------------------- config warnings

OFF_POLICY = (
    "the sampler draws from a truncated distribution while every log-prob of the loss is of the full softmax, "
    "so the samples are off-policy (ratios far from 1)"
)
# one case per warning config_warnings can give (and top_p with top_k: still one line)
WARNINGS = {
    "top_p": (["--top_p", "0.9"], f"top_p=0.9: {OFF_POLICY}"),
    "top_k": (["--top_k", "20"], f"top_k=20: {OFF_POLICY}"),
    "top_p and top_k": (["--top_p", "0.9", "--top_k", "20"], f"top_p=0.9, top_k=20: {OFF_POLICY}"),
    "sequence level with a token sum": (
        ["--importance_sampling_level", "sequence", "--loss_type", "dapo"],
        "importance_sampling_level=sequence with loss_type=dapo: the token sum weights each sequence by its "
        "length; GSPO's setup is loss_type: grpo",
    ),
    "cispo capped below 1": (
        ["--loss_type", "cispo"],
        "loss_type=cispo caps the importance weight at epsilon_high=0.2 (< 1): every token is capped; CISPO uses "
        "a cap above 1 (e.g. epsilon_high: 4.0)",
    ),
    "async generation without a server": (
        ["--async_generation", "true"],
        "async_generation=True without vllm_mode: server: a colocated sampler shares the trainer's device and "
        "thread, so nothing overlaps; the rollouts are only sampled one step behind (staleness 1)",
    ),
    "sleep mode without CUDA": (
        ["--sampler", "vllm", "--vllm_enable_sleep_mode", "true"],
        "vllm_enable_sleep_mode=True: vLLM has no sleep mode without CUDA (here: CPU), so the engine runs without "
        "it and keeps its KV cache between generations",
    ),
}


def test_every_warning_has_its_case():
    """A warning added to config_warnings without a case here fails this test."""
    distinct = {text.split(":")[0] for _, text in WARNINGS.values()} - {"top_p=0.9", "top_k=20"}
    assert inspect.getsource(config_warnings).count("notes.append(") == len(distinct)


@pytest.mark.parametrize("case", list(WARNINGS))
def test_each_config_warning_is_one_line_on_stderr(case, train_cli, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the sleep-mode warning is about CPU
    for name in train_cli.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    args, text = WARNINGS[case]
    config = load_config([*TINY_ARGS, *args])
    assert train_cli.print_config_warnings(config) == [f"config warning: {text}"]
    assert capsys.readouterr().err == f"config warning: {text}\n"


def test_no_warning_for_the_defaults_or_the_shipped_configs(train_cli, capsys):
    assert train_cli.print_config_warnings(load_config(TINY_ARGS), environ={}) == []
    for path in sorted((ROOT / "scripts" / "configs").glob("*.yaml")):
        assert config_warnings(load_config(["--config", str(path)]), cuda=False) == [], path.name
    assert capsys.readouterr().err == ""


def test_config_warnings_print_on_the_main_process_only(train_cli, capsys):
    config = load_config([*TINY_ARGS, "--top_k", "20"])
    for environ in ({"RANK": "1"}, {"PMI_RANK": "2"}):  # accelerate launch (torchrun style), an MPI launcher
        assert train_cli.print_config_warnings(config, environ) == []
    assert capsys.readouterr().err == ""
    assert train_cli.print_config_warnings(config, {"RANK": "0"}) == [
        f"config warning: top_k=20: {OFF_POLICY}"
    ]


def test_config_warnings_come_first_then_the_run_goes_on(tmp_path):
    """Wired into train.py: the warning, then the run starts (here it stops at the next check: no checkpoint)."""
    result = tiny_run(tmp_path, "--top_p", "0.9", "--resume_from_checkpoint", "latest")
    assert "Traceback" not in result.stderr and result.returncode == 1, result.stderr[-3000:]
    warning, error = result.stderr.strip().splitlines()
    assert warning == f"config warning: top_p=0.9: {OFF_POLICY}"
    assert error.startswith("checkpoint error: resume_from_checkpoint='latest': no checkpoint-<step>/ in "), (
        error
    )
    assert result.stdout.startswith("device: ")  # the run had started


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("value", ["inf", "1e30"])
def test_a_learning_rate_that_is_not_finite_or_absurd(tmp_path, value):
    line = the_one_line(tiny_run(tmp_path, "--learning_rate", value), status=2)
    assert line.startswith(f"config error: learning_rate={float(value)!r}: "), line


def test_no_arguments_prints_how_to_start_and_loads_nothing():
    result = run_train()
    line = the_one_line(result, status=2)
    assert line.startswith("train.py: no arguments; usage: train.py --config FILE [--field value ...]"), line
    assert "python scripts/train.py --config scripts/configs/tiny-cpu.yaml" in line
    assert result.stdout == ""  # nothing started: no device line, no model
    assert the_one_line(run_train("--debug"), status=2) == line  # --debug alone is no arguments either


# ---------------------------------------------------------------------------- --help, --debug, the working folder


def test_help_shows_the_description_the_config_flag_and_every_field():
    result = run_train("--help")
    assert result.returncode == 0, result.stderr[-2000:]
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert text.startswith("usage: train.py --config FILE [--field value ...] [--debug]")
    assert "Fine-tune a language model with GRPO (Group Relative Policy Optimization" in text
    assert "--config FILE a YAML file of field: value pairs" in text
    assert "--debug show the traceback of an error instead of one line" in text
    from grpo.config import GRPOConfig

    for field in dataclasses.fields(GRPOConfig):
        assert f"--{field.name}" in text, field.name


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_debug_shows_the_traceback(tmp_path, how):
    missing = str(tmp_path / "no_model_here")
    if how == "flag":
        result = run_train(
            *TINY_ARGS, "--model_name_or_path", missing, "--debug", "--output_dir", str(tmp_path)
        )
    else:
        result = run_train(
            *TINY_ARGS, "--model_name_or_path", missing, "--output_dir", str(tmp_path), GRPO_DEBUG="1"
        )
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert f"models.policy.ModelLoadError: model_name_or_path='{missing}'" in result.stderr


def test_a_reward_module_in_the_working_folder_imports(tmp_path):
    (tmp_path / "my_rewards.py").write_text(
        "def always_one(completions, **columns):\n    return [1.0] * len(completions)\n"
    )
    args = [
        *TINY_ARGS,
        "--reward_funcs",
        "my_rewards:always_one",
        "--model_name_or_path",
        str(tmp_path / "none"),
    ]
    # from the folder that holds it, the config accepts the function and the run gets as far as the model
    line = the_one_line(run_train(*args, "--output_dir", str(tmp_path / "out"), cwd=tmp_path))
    assert line.startswith("model error: "), line
    # from anywhere else, the same config cannot import it
    line = the_one_line(run_train(*args, "--output_dir", str(tmp_path / "out")), status=2)
    assert line.startswith("config error: reward_funcs=") and "my_rewards" in line, line


# ---------------------------------------------------------------------------- train.py's error table (in process)


def load_script(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # as an import would: a dataclass in the script looks its module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_cli():
    return load_script(TRAIN_SCRIPT, "train_cli")


def test_train_script_docstring_examples(train_cli):
    assert doctest.testmod(train_cli).failed == 0


def test_every_listed_error_class_exists(train_cli):
    for module_name, class_name, label, status in train_cli.EXPECTED_ERRORS:
        error_class = getattr(importlib.import_module(module_name), class_name)
        assert issubclass(error_class, Exception), (module_name, class_name)
        assert status in (1, 2, 130) and label
    listed = [c for _, c, _, _ in train_cli.EXPECTED_ERRORS]
    # a subclass is listed before its base class, or the base's words would be printed for it
    assert listed.index("OutputDirError") < listed.index("CheckpointError")


def test_each_error_type_gets_its_words_and_status(train_cli):
    from data.common import DataError
    from grpo.checkpoint import CheckpointError, OutputDirError
    from grpo.config import ConfigError
    from models.policy import ModelLoadError

    expected = train_cli.expected_error
    assert expected(ConfigError("lora_r=0: must be > 0")) == ("config error: lora_r=0: must be > 0", 2)
    assert expected(DataError("gsm8k: x\n  y")) == ("data error: gsm8k: x y", 1)
    assert expected(ModelLoadError("m", "gone")) == ("model error: model_name_or_path='m': gone", 1)
    assert expected(OutputDirError("output_dir 'o' is not writable")) == (
        "output_dir error: output_dir 'o' is not writable",
        1,
    )
    assert expected(CheckpointError("c: missing")) == ("checkpoint error: c: missing", 1)
    assert expected(KeyboardInterrupt()) == ("interrupted (Ctrl-C): stopped at once, without saving", 130)
    assert expected(RuntimeError("a bug")) is None and expected(ValueError("a bug")) is None


def test_ctrl_c_is_one_line_and_status_130_and_a_bug_keeps_its_traceback(train_cli, monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_cli, "load_config", interrupted)
    assert train_cli.main(["--max_steps", "1"]) == 130
    assert capsys.readouterr().err == "interrupted (Ctrl-C): stopped at once, without saving\n"

    def bug(argv):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(train_cli, "load_config", bug)
    with pytest.raises(ZeroDivisionError):
        train_cli.main(["--max_steps", "1"])


# ---------------------------------------------------------------------------- scripts/evaluate.py


@pytest.fixture(scope="module")
def evaluate_cli():
    return load_script(EVALUATE_SCRIPT, "evaluate_cli")


def test_evaluate_help_lists_the_sources_and_their_default(evaluate_cli, capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_cli.main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    names = ", ".join(evaluate_cli.SOURCES)
    assert names == "gsm8k, pubmedqa, health_benchmarks, medqa, medmcqa, mmlu_medical"
    assert f"sources to score, any of: {names} (default: gsm8k pubmedqa health_benchmarks)" in text
    assert "(default: <adapter>/evaluation.json;" in text


def test_evaluate_report_goes_beside_the_adapter_or_under_outputs(evaluate_cli):
    where = evaluate_cli.default_output_path
    assert where("o/checkpoint-9", None, "M") == Path("o/checkpoint-9/evaluation.json")
    assert where(None, ["base", "o/checkpoint-9"], "M") == Path("o/checkpoint-9/evaluation_vs_base.json")
    assert where(None, ["o/checkpoint-9", "base"], "M") == Path("o/checkpoint-9/evaluation_vs_base.json")
    assert where(None, ["o/checkpoint-3", "o/checkpoint-9"], "M") == Path(
        "o/checkpoint-9/evaluation_vs_checkpoint-3.json"
    )
    assert where(None, None, "Qwen/Qwen2.5-3B-Instruct") == Path(
        "outputs/evaluation_Qwen2.5-3B-Instruct.json"
    )
    assert where(None, None, "/models/local/") == Path("outputs/evaluation_local.json")
    assert doctest.testmod(evaluate_cli).failed == 0


def fake_adapter(folder: Path) -> str:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"]})
    )
    (folder / "adapter_model.safetensors").write_bytes(b"")
    return str(folder)


@pytest.mark.parametrize("how", ["adapter", "base"])
def test_evaluate_writes_no_report_into_the_working_folder(evaluate_cli, tmp_path, monkeypatch, how):
    """main() with the evaluation itself replaced: only where the report lands is under test."""
    monkeypatch.chdir(tmp_path)
    document = {"model": "org/Some-Model", "all": {}, "command": "evaluate.py"}
    monkeypatch.setattr(
        evaluate_cli,
        "run",  # run() names the report's path with output_path(), from the model it evaluated
        lambda args, rest, argv: (document, "| table |", evaluate_cli.output_path(args, document["model"])),
    )
    adapter = fake_adapter(tmp_path / "run" / "checkpoint-4")
    argv = ["--adapter", adapter] if how == "adapter" else ["--model", "org/Some-Model"]
    assert evaluate_cli.main(argv) == 0
    report = (
        Path(adapter) / "evaluation.json"
        if how == "adapter"
        else tmp_path / "outputs" / "evaluation_Some-Model.json"
    )
    assert json.loads(report.read_text()) == document
    assert report.with_suffix(".md").read_text() == "`evaluate.py`\n\n| table |\n"
    assert not (tmp_path / "evaluation.json").exists()
