"""A reward function that fails stops the run with a checkpoint and one line; the run resumes once it is fixed.

Each failure mode is a real run of scripts/train.py (a subprocess, offline, the tiny model) with a user's reward
module in the working folder, as a user would write it: the function scores the first rollout, then fails on the
second (it raises, hangs past reward_timeout, returns inf, returns one value too few, or returns None where no
other function scores). Each time: exit status 1, no traceback, one line naming the function, the completion
(its prompt's position in the training stream, its source, its number in the group) and the error; the steps
done are kept (metrics lines and a checkpoint that only the failure wrote: checkpoint-1, or checkpoint-0 for a
function that fails from the start); and with the module fixed, ``--resume_from_checkpoint latest`` trains the
failed step on the same prompts and ends normally. ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_run import tiny

ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = ROOT / "scripts" / "train.py"

# two steps of 2 prompts x 4 completions; save_steps beyond the run: a checkpoint before the end is the failure's
ARGS = [
    *tiny("tiny-random-qwen2"), "--gradient_checkpointing", "false", "--per_device_train_batch_size", "2",
    "--max_completion_length", "16", "--max_steps", "2", "--save_steps", "100", "--seed", "7",
    "--reward_timeout", "3",
]  # fmt: skip

# The user's module: scores the first call, fails from the second on as FAILURE says ("no_function_applies" from
# the first: a run that fails before any step). "raises" fails on the completions equal to the second completion
# of the failing batch, so the error can name one completion.
FAILING_MODULE = """
import math
import os
import threading

CALLS = 0
BAD = []


def flaky(completions, **columns):
    global CALLS
    CALLS += 1
    n = len(completions)
    mode = os.environ["FAILURE"]
    if CALLS == 1 and mode != "no_function_applies":
        return [0.5] * n
    if mode == "raises":
        if not BAD:
            BAD.append(completions[1])
        if BAD[0] in completions:
            raise ZeroDivisionError("division by zero in my scorer")
        return [0.5] * n
    if mode == "hangs":
        threading.Event().wait()  # forever
    if mode == "non_finite":
        return [0.5, math.inf] + [0.5] * (n - 2)
    if mode == "wrong_size":
        return [0.5] * (n - 1)
    if mode == "no_function_applies":
        return [None] * n
    raise AssertionError(mode)
"""
FIXED_MODULE = "def flaky(completions, **columns):\n    return [0.5] * len(completions)\n"

COMPLETION = r"prompt [23] of the training stream \((gsm8k|pubmedqa|med_mc)\), completion [0-3]"
BATCH = r"a batch of 8 completions \(prompt 2 of the training stream \(\w+\), completion 0 \.\.\. prompt 3 of the training stream \(\w+\), completion 3\)"
NAME = "reward function 'my_rewards:flaky'"
MODES = {
    # mode: (reward_funcs, the error after "step 2: ", or "step 1: " for no_function_applies)
    "raises": (["correctness_reward_func", "my_rewards:flaky"],
               rf"{NAME} raised ZeroDivisionError: division by zero in my scorer on {COMPLETION}"),
    "hangs": (["correctness_reward_func", "my_rewards:flaky"],
              rf"{NAME} did not return within reward_timeout=3 s on {BATCH}"),
    "non_finite": (["correctness_reward_func", "my_rewards:flaky"],
                   rf"{NAME} returned inf for prompt 2 of the training stream \(\w+\), completion 1; a reward must be "
                   r"a finite number, or None where the function does not apply"),
    "wrong_size": (["correctness_reward_func", "my_rewards:flaky"], rf"{NAME} returned 7 values for {BATCH}"),
    "no_function_applies": (["my_rewards:flaky"],
                            r"no reward function applies to prompt 0 of the training stream \(\w+\), completion 0: "
                            r"'my_rewards:flaky' all returned None for it; every completion needs a reward from at "
                            r"least one function"),
}  # fmt: skip


def run_train(workdir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k != "GRPO_DEBUG"}
    environment.update(HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", **env)
    return subprocess.run(
        [sys.executable, str(TRAIN_SCRIPT), *args],
        capture_output=True,
        text=True,
        env=environment,
        cwd=workdir,  # where my_rewards.py is, as a user runs it
        timeout=900,
    )


def start(
    tmp_path: Path, mode: str, *extra: str, **env: str
) -> tuple[subprocess.CompletedProcess, list[str]]:
    (tmp_path / "my_rewards.py").write_text(FAILING_MODULE)
    funcs, _ = MODES[mode]
    args = [*ARGS, "--reward_funcs", *funcs, "--output_dir", str(tmp_path / "out")]
    return run_train(tmp_path, *args, *extra, FAILURE=mode, **env), args


def the_error_line(result: subprocess.CompletedProcess) -> str:
    """The run's one error line: the last line of stderr, and the only one naming a reward function (what
    comes before it is the progress bar); no traceback."""
    assert result.returncode == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert sum("reward function" in line for line in lines) == 1, result.stderr[-3000:]
    return lines[-1]


def steps_logged(out: Path) -> list[int]:
    metrics = out / "metrics.jsonl"
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


@pytest.mark.slow
@pytest.mark.parametrize("mode", list(MODES))
def test_a_failing_reward_stops_with_a_checkpoint_and_one_line_then_resumes(tmp_path, mode):
    result, args = start(tmp_path, mode)
    out = tmp_path / "out"
    done = 0 if mode == "no_function_applies" else 1  # steps done before the failure
    line = the_error_line(result)
    expected = (
        rf"reward function error: step {done + 1}: {MODES[mode][1]}; "
        rf"saved {re.escape(str(out / f'checkpoint-{done}'))}; fix it and continue with --resume_from_checkpoint latest"
    )
    assert re.fullmatch(expected, line), line
    # what was done is kept: its metrics and a checkpoint of it, written by the failure (save_steps 100)
    assert steps_logged(out) == list(range(1, done + 1))
    state = json.loads((out / f"checkpoint-{done}" / "trainer_state.json").read_text())
    assert state["step"] == done and state["data_position"] == 2 * done  # the failed prompts are not used up
    assert sorted(p.name for p in out.glob("checkpoint-*")) == [f"checkpoint-{done}"]

    # the user fixes the function and resumes: the failed step is trained on the prompts that failed
    (tmp_path / "my_rewards.py").write_text(FIXED_MODULE)
    resumed = run_train(tmp_path, *args, "--resume_from_checkpoint", "latest", FAILURE=mode)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and f"at step {done}" in resumed.stdout
    assert steps_logged(out) == [1, 2]
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["data_position"] == 4


@pytest.mark.slow
def test_debug_shows_the_reward_functions_traceback(tmp_path):
    result, _ = start(tmp_path, "raises", "--debug")
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert (
        'my_rewards.py", line' in result.stderr
        and "ZeroDivisionError: division by zero in my scorer" in result.stderr
    )
    assert (
        "rewards.registry.RewardFuncError: step 2: reward function 'my_rewards:flaky' raised" in result.stderr
    )
    assert (tmp_path / "out" / "checkpoint-1" / "trainer_state.json").is_file()


# Two processes (accelerate, CPU): a reward failure on one must stop both, or the other waits forever for it in
# the next exchange of groups.
TWO_PROCESS_SCRIPT = """
import os
import sys
sys.path.insert(0, {root!r})
from accelerate import Accelerator
from grpo.rollout import raise_reward_failure
from rewards import RewardFuncError

accelerator = Accelerator()
rank = accelerator.process_index
for failing in (None, 1):
    failure = RewardFuncError(f"reward function 'f' raised ValueError: bad row on rank {{rank}}") if rank == failing else None
    try:
        raise_reward_failure(accelerator, failure)
        line = f"rank {{rank}} round {{failing}}: no error"
    except RewardFuncError as err:
        line = f"rank {{rank}} round {{failing}}: {{err}}"
    os.write(1, (line + "\\n").encode())  # one write: the two processes share the pipe, lines must not interleave
accelerator.wait_for_everyone()  # both got here: nobody is left waiting in a collective
accelerator.end_training()
"""


@pytest.mark.slow
def test_a_failure_on_one_process_stops_every_process(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESS_SCRIPT.format(root=str(ROOT)))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank "))
    assert lines == [
        "rank 0 round 1: on process 1: reward function 'f' raised ValueError: bad row on rank 1",
        "rank 0 round None: no error",
        "rank 1 round 1: reward function 'f' raised ValueError: bad row on rank 1",
        "rank 1 round None: no error",
    ]
