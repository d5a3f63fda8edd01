"""The output folder (grpo/run_folder.py): rotation, the guard that keeps a fresh run from taking over
another run's folder, the lock that allows one run per folder, and the resume config check. Folders of fake
checkpoints (a trainer_state.json each) are enough here; test_checkpoint.py checks real checkpoints, and
check_resume_config on one; tests/test_cli.py starts two real runs into one folder.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import grpo.run_folder
from grpo.run_folder import (
    PROMPTS_PER_STEP,
    RESUMABLE_FIELDS,
    RUN_HOLDER,
    RUN_LOCK,
    CheckpointError,
    OutputDirError,
    check_output_dir,
    config_defaults,
    config_differences,
    hold_output_dir,
    lock_output_dir,
    process_is_running,
    read_holder,
    release_output_dir,
    rotate_checkpoints,
)

ROOT = Path(__file__).resolve().parents[1]

# ----------------------------------------------------------------------------- rotation


def _fake_checkpoints(root: Path, steps) -> None:
    for step in steps:
        (root / f"checkpoint-{step}").mkdir(parents=True)
        (root / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps({"step": step}))


def _names(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def test_rotate_keeps_the_newest(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4, 6, 8, 10])
    (tmp_path / "checkpoint-12.tmp").mkdir()  # an interrupted save: not rotation's business
    (tmp_path / "checkpoint-14").mkdir()  # no trainer_state.json: not complete, not counted
    removed = rotate_checkpoints(tmp_path, 2)
    assert removed == [tmp_path / "checkpoint-2", tmp_path / "checkpoint-4", tmp_path / "checkpoint-6"]
    assert _names(tmp_path) == ["checkpoint-10", "checkpoint-12.tmp", "checkpoint-14", "checkpoint-8"]


def test_rotate_never_deletes_the_checkpoint_just_written(tmp_path):
    _fake_checkpoints(tmp_path, [2, 4, 6, 8])
    # resumed from checkpoint-2, the run has just re-written checkpoint-4
    assert rotate_checkpoints(tmp_path, 2, keep=tmp_path / "checkpoint-4") == [
        tmp_path / "checkpoint-2",
        tmp_path / "checkpoint-6",
    ]
    assert _names(tmp_path) == ["checkpoint-4", "checkpoint-8"]
    assert rotate_checkpoints(tmp_path, 1, keep=tmp_path / "checkpoint-4") == [tmp_path / "checkpoint-8"]
    assert _names(tmp_path) == ["checkpoint-4"]


@pytest.mark.parametrize("limit", [None, 0, -1, 3, 4])
def test_rotate_without_a_limit_or_under_it_deletes_nothing(tmp_path, limit):
    _fake_checkpoints(tmp_path, [2, 4, 6])
    assert rotate_checkpoints(tmp_path, limit) == []
    assert _names(tmp_path) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]


# ----------------------------------------------------------------------------- the output folder


def _earlier_run(root: Path) -> None:
    _fake_checkpoints(root, [2, 4])
    (root / "checkpoint-6.tmp").mkdir()
    (root / "metrics.jsonl").write_text('{"step": 1}\n')
    (root / "metrics.png").write_bytes(b"png")
    (root / "runs").mkdir()
    (root / "runs" / "events.out").write_bytes(b"tb")
    # the user's own files: never a run's output
    (root / "notes.txt").write_text("mine")
    (root / "checkpoint-best").mkdir()


def test_a_fresh_run_gets_a_new_writable_folder(tmp_path):
    out = tmp_path / "a" / "b"
    assert check_output_dir(out, overwrite_output_dir=False, resuming=False) == []
    assert out.is_dir() and list(out.iterdir()) == []  # the probe file is gone


@pytest.mark.parametrize("holds", ["checkpoint", "metrics"])
def test_a_fresh_run_into_a_used_folder_is_refused(tmp_path, holds):
    if holds == "checkpoint":
        _fake_checkpoints(tmp_path, [4])
    else:
        (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    before = _names(tmp_path)
    with pytest.raises(OutputDirError) as err:
        check_output_dir(tmp_path, overwrite_output_dir=False, resuming=False)
    message = str(err.value)
    assert str(tmp_path) in message and "already holds a run" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir true" in message
    assert isinstance(err.value, CheckpointError)
    assert _names(tmp_path) == before


def test_a_folder_with_only_other_files_is_fine(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "metrics.png").write_bytes(b"png")
    assert check_output_dir(tmp_path, overwrite_output_dir=False, resuming=False) == []
    assert _names(tmp_path) == ["metrics.png", "notes.txt"]


def test_overwrite_deletes_only_what_a_run_writes(tmp_path):
    _earlier_run(tmp_path)
    removed = check_output_dir(tmp_path, overwrite_output_dir=True, resuming=False)
    assert sorted(p.name for p in removed) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-6.tmp", "metrics.jsonl", "metrics.png", "runs",
    ]  # fmt: skip
    assert _names(tmp_path) == ["checkpoint-best", "notes.txt"]


def test_overwrite_on_another_process_deletes_nothing(tmp_path):
    _earlier_run(tmp_path)
    before = _names(tmp_path)
    check_output_dir(tmp_path, overwrite_output_dir=True, resuming=False, is_main_process=False)
    assert _names(tmp_path) == before


@pytest.mark.parametrize("overwrite", [False, True])
def test_a_resumed_run_deletes_nothing(tmp_path, overwrite):
    _earlier_run(tmp_path)
    before = _names(tmp_path)
    assert check_output_dir(tmp_path, overwrite_output_dir=overwrite, resuming=True) == []
    assert _names(tmp_path) == before


def test_an_output_dir_that_cannot_be_created_is_named(tmp_path):
    (tmp_path / "file").write_text("x")
    for out in (tmp_path / "file", tmp_path / "file" / "out"):  # a file, and a folder inside a file
        with pytest.raises(OutputDirError, match=rf"output_dir '{out}' is not writable") as err:
            check_output_dir(out, overwrite_output_dir=False, resuming=False)
        assert err.value.file == out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")
def test_an_existing_read_only_output_dir_is_named():
    # a folder nobody can create files in, root included (chmod does not stop root)
    with pytest.raises(OutputDirError, match=r"output_dir '/proc/self' is not writable \(FileNotFoundError"):
        check_output_dir("/proc/self", overwrite_output_dir=False, resuming=False)


# ----------------------------------------------------------------------------- one run per folder


@pytest.fixture
def lines():
    """What lock_output_dir says (its ``warn``); every lock the test took is released at the end."""
    said: list[str] = []
    yield said
    for folder in list(grpo.run_folder._held):
        release_output_dir(folder)


def holding_process(output_dir: Path, how: str = "lock_output_dir") -> subprocess.Popen:
    """Another process that holds output_dir's lock (``lock_output_dir``, or only the bare file lock, without a
    holder record) and waits on its stdin; returns once it holds it."""
    take = {
        "lock_output_dir": f"from grpo.run_folder import lock_output_dir; lock_output_dir({str(output_dir)!r})",
        "bare": f"import filelock; lock = filelock.FileLock({str(output_dir / RUN_LOCK)!r}); lock.acquire()",
    }[how]
    child = subprocess.Popen(
        [sys.executable, "-c", f"{take}; print('held', flush=True); import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert child.stdout.readline() == "held\n"
    return child


def test_a_folder_another_run_holds_is_refused_naming_it(tmp_path, lines):
    out = tmp_path / "out"
    child = holding_process(out)
    try:
        holder = read_holder(out)
        assert holder["pid"] == child.pid and holder["host"] == socket.gethostname()
        with pytest.raises(OutputDirError) as err:
            lock_output_dir(out, lines.append)
        assert str(err.value) == (
            f"output_dir '{out}' is in use by another run: pid {child.pid} on host {socket.gethostname()} "
            f"(started {holder['started']}); wait for it to end, or choose another --output_dir"
        )
        assert lines == [] and read_holder(out) == holder  # the refused run changed nothing
    finally:
        child.kill()
        child.wait()
    # killed (SIGKILL: no clean-up), its lock went with it: the next run takes it over and says whose it was
    run_lock = lock_output_dir(out, lines.append)
    assert lines == [
        f"output_dir '{out}': took over the lock left by pid {child.pid} on host {socket.gethostname()} "
        f"(started {holder['started']}), which is no longer running"
    ]
    assert read_holder(out) == run_lock.holder and run_lock.holder["pid"] == os.getpid()


def test_a_planted_record_of_a_dead_pid_is_taken_over(tmp_path, lines):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    )
    pid = int(dead.stdout)
    assert not process_is_running(pid)
    stale = {"host": socket.gethostname(), "pid": pid, "started": "2025-01-01T00:00:00+00:00"}
    (tmp_path / RUN_HOLDER).write_text(json.dumps(stale))
    lock_output_dir(tmp_path, lines.append)
    assert lines == [
        f"output_dir '{tmp_path}': took over the lock left by pid {pid} on host {socket.gethostname()} "
        "(started 2025-01-01T00:00:00+00:00), which is no longer running"
    ]
    # another host's record cannot be checked for a live pid: the lock itself says it is free
    release_output_dir(tmp_path)
    (tmp_path / RUN_HOLDER).write_text(json.dumps({**stale, "host": "elsewhere", "pid": os.getpid()}))
    lines.clear()
    lock_output_dir(tmp_path, lines.append)
    assert lines == [
        f"output_dir '{tmp_path}': took over the lock left by pid {os.getpid()} on host elsewhere "
        "(started 2025-01-01T00:00:00+00:00), which no longer holds it"
    ]


def test_a_holder_that_never_names_itself(tmp_path, lines, monkeypatch):
    monkeypatch.setattr(grpo.run_folder, "HOLDER_WAIT_SECONDS", 0.2)
    child = holding_process(tmp_path, how="bare")
    try:
        with pytest.raises(
            OutputDirError, match=r"in use by another run: another process \(it has not written"
        ):
            lock_output_dir(tmp_path, lines.append)
    finally:
        child.kill()
        child.wait()


def test_the_lock_is_held_until_released_then_free(tmp_path, lines):
    run_lock = lock_output_dir(tmp_path, lines.append)
    assert lock_output_dir(tmp_path, lines.append) is run_lock  # the same process again: the lock it holds
    assert lines == [] and sorted(p.name for p in tmp_path.iterdir()) == [RUN_HOLDER, RUN_LOCK]
    probe = [
        sys.executable,
        "-c",
        f"from grpo.run_folder import lock_output_dir; lock_output_dir({str(tmp_path)!r})",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    held = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, env=env)
    assert held.returncode == 1 and f"in use by another run: pid {os.getpid()} on host" in held.stderr
    release_output_dir(tmp_path)
    release_output_dir(tmp_path)  # twice: nothing more
    assert [p.name for p in tmp_path.iterdir()] == [
        RUN_LOCK
    ]  # the record goes; the lock file stays, unlocked
    free = subprocess.run(probe, capture_output=True, text=True, cwd=ROOT, env=env)
    assert free.returncode == 0, free.stderr
    assert lines == []


def test_the_lock_files_are_no_run_output(tmp_path, lines):
    _earlier_run(tmp_path)
    lock_output_dir(tmp_path, lines.append)
    check_output_dir(tmp_path, overwrite_output_dir=True, resuming=False)
    assert _names(tmp_path) == [RUN_HOLDER, RUN_LOCK, "checkpoint-best", "notes.txt"]


def test_an_unwritable_folder_is_named_before_any_lock(tmp_path, lines):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputDirError, match=rf"output_dir '{tmp_path}/file/out' is not writable"):
        lock_output_dir(tmp_path / "file" / "out", lines.append)


def test_only_the_main_process_locks(tmp_path, lines):
    other = SimpleNamespace(is_main_process=False, num_processes=1)
    assert hold_output_dir(tmp_path / "a", other, lines.append) is None
    assert not (tmp_path / "a").exists()
    main = SimpleNamespace(is_main_process=True, num_processes=1)
    run_lock = hold_output_dir(tmp_path / "b", main, lines.append)
    assert run_lock is not None and read_holder(tmp_path / "b") == run_lock.holder


# ----------------------------------------------------------------------------- the resume config


def test_config_defaults_are_the_config_class_defaults():
    from grpo.config import GRPOConfig

    assert config_defaults() == json.loads(json.dumps(GRPOConfig().to_dict()))


def test_the_same_config_has_no_differences():
    config = config_defaults()
    assert config_differences(config, dict(config)) == []


ALLOWED_CHANGES = {
    "max_steps": 10_000, "logging_steps": 7, "save_steps": 3, "eval_steps": 5, "eval_size": 4,
    "output_dir": "elsewhere", "report_to": "tensorboard", "resume_from_checkpoint": "latest",
    "sampler": "hf", "gradient_checkpointing": False, "train_micro_batch_size": 2, "logprob_backend": "torch",
}  # fmt: skip


def test_what_may_change_on_resume_is_not_a_difference():
    saved = config_defaults()
    assert set(ALLOWED_CHANGES) <= set(saved) and set(ALLOWED_CHANGES) <= RESUMABLE_FIELDS
    current = {**saved, **ALLOWED_CHANGES}
    assert all(current[k] != saved[k] for k in ALLOWED_CHANGES)
    assert config_differences(saved, current) == []
    # fields a newer config will have (save_total_limit, overwrite_output_dir, debug) may change too
    extra = {"save_total_limit": 2, "overwrite_output_dir": True, "debug": True}
    assert config_differences({**saved, "save_total_limit": None}, {**current, **extra}) == []


DEFINING_CHANGES = {
    "model_name_or_path": "other/model", "load_in_4bit": False, "lora_r": 8, "lora_alpha": 16,
    "lora_dropout": 0.1, "lora_target_modules": ["q_proj"], "seed": 1, "gsm8k_data_files": "x.jsonl",
    "dataset_mixture": [1.0, 0.0, 0.0], "loss_type": "dapo", "beta": 0.0, "epsilon": 0.3,
    "epsilon_high": 0.28, "num_generations": 8, "scale_rewards": "none", "num_iterations": 2,
    "kl_estimator": "k1", "reward_funcs": ["correctness_reward_func"], "reward_weights": [2.0] * 5,
    "learning_rate": 1e-4, "temperature": 0.7, "max_completion_length": 64,
}  # fmt: skip


@pytest.mark.parametrize("name", list(DEFINING_CHANGES))
def test_what_defines_the_run_is_a_difference(name):
    saved = config_defaults()
    assert saved[name] != DEFINING_CHANGES[name]
    current = {**saved, name: DEFINING_CHANGES[name], "max_steps": 1}
    assert config_differences(saved, current) == [name]


def test_new_fields_are_defining_unless_at_their_default():
    saved = {"seed": 7}
    defaults = {"seed": 3407, "new_knob": 0.5}
    assert config_differences(saved, {"seed": 7, "new_knob": 0.5}, defaults) == []  # absent = the default
    assert config_differences(saved, {"seed": 7, "new_knob": 0.9}, defaults) == ["new_knob"]
    assert config_differences(saved, {"seed": 7, "unknown": 1}, defaults) == ["unknown"]  # no default known
    # a field only the checkpoint has (removed since) cannot be honoured: ignored
    assert config_differences({"seed": 7, "old_knob": 1}, {"seed": 7}, defaults) == []
    # a field both have but the allow-list does not name: defining
    assert config_differences({"new_knob": 0.5}, {"new_knob": 0.9}, defaults) == ["new_knob"]


def test_values_compare_as_json_reads_them_back():
    saved = {"dataset_mixture": [1, 0, 0], "lora_target_modules": ["q_proj", "v_proj"]}
    current = {"dataset_mixture": (1.0, 0.0, 0.0), "lora_target_modules": ("q_proj", "v_proj")}
    assert config_differences(saved, current, {}) == []


def test_the_global_batch_is_compared_across_process_counts():
    six_on_one = {"per_device_train_batch_size": 6, "gradient_accumulation_steps": 1}
    three = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 1}
    three_ga2 = {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}
    kw = dict(saved_num_processes=1)
    assert config_differences(six_on_one, three, {}, **kw, current_num_processes=2) == []
    assert config_differences(six_on_one, three_ga2, {}, **kw, current_num_processes=1) == []
    assert config_differences(six_on_one, three, {}, **kw, current_num_processes=1) == [PROMPTS_PER_STEP]
    # process count unknown (a checkpoint of the previous version): field by field
    assert config_differences(six_on_one, three, {}) == ["per_device_train_batch_size"]


def test_grpo_checkpoint_still_offers_the_output_folder_names():
    # grpo/trainer.py, scripts/train.py (its one-line errors) and tests/test_cli.py import them from there
    import grpo.checkpoint
    import grpo.run_folder

    for name in ("CheckpointError", "OutputDirError", "check_output_dir", "check_resume_config",
                 "checkpoint_dirs", "remove_incomplete_checkpoints", "rotate_checkpoints", "RUN_OUTPUTS",
                 "RESUMABLE_FIELDS", "config_differences", "TRAINER_STATE"):  # fmt: skip
        assert getattr(grpo.checkpoint, name) is getattr(grpo.run_folder, name)
