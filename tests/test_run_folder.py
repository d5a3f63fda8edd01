"""The output folder (grpo/run_folder.py): rotation, the guard that keeps a fresh run from taking over
another run's folder, and the resume config check. Folders of fake checkpoints (a trainer_state.json
each) are enough here; test_checkpoint.py checks real checkpoints, and check_resume_config on one.
"""

import json
import sys
from pathlib import Path

import pytest

from grpo.run_folder import (
    PROMPTS_PER_STEP,
    RESUMABLE_FIELDS,
    CheckpointError,
    OutputDirError,
    check_output_dir,
    config_defaults,
    config_differences,
    rotate_checkpoints,
)

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
