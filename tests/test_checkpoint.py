"""Checkpoints: manifest and verification, safe loading (a planted pickle does not run), falling back
from a damaged newest checkpoint, exact restore, and the resume config check on a real checkpoint
(rotation, the output folder guard and the rest of the resume check: test_run_folder.py).

The checkpoints here are real ones written by ``save_checkpoint``: a PEFT LoRA on a two-layer net
(matrices of 4,096 entries, so bitsandbytes' AdamW8bit keeps its 8-bit state: uint8 tensors, quantisation
maps, absmax), a transformers cosine schedule, and the RNG state. No language model is needed for that.
"""

import hashlib
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from grpo.checkpoint import (
    MANIFEST,
    checkpoint_dirs,
    load_checkpoint,
    remove_incomplete_checkpoints,
    resolve_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    write_manifest,
)
from grpo.run_folder import CheckpointError, check_resume_config


class SingleProcess:
    """The part of accelerate.Accelerator that save/load use, for one process."""

    is_main_process = True
    process_index = 0
    num_processes = 1

    def wait_for_everyone(self) -> None:
        pass

    def unwrap_model(self, model):
        return model


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = torch.nn.Linear(64, 128)
        self.down = torch.nn.Linear(128, 64)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def build(seed: int, lora_r: int = 32):
    """A LoRA model, its 8-bit AdamW and a cosine schedule, as the trainer makes them.

    The base weights are always the same (a pretrained model); ``seed`` draws the LoRA matrices.
    """
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    torch.manual_seed(0)
    base = Net()
    torch.manual_seed(seed)
    lora = LoraConfig(r=lora_r, lora_alpha=32, target_modules=["up", "down"], init_lora_weights=False)
    model = get_peft_model(base, lora)
    optimizer = bnb.optim.AdamW8bit([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    scheduler = get_scheduler("cosine", optimizer, num_warmup_steps=1, num_training_steps=10)
    return model, optimizer, scheduler


def train_step(model, optimizer, scheduler, x: torch.Tensor) -> None:
    model(x).pow(2).mean().backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()


def lora_weights(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


CONFIG = {"seed": 7, "lora_r": 32, "max_steps": 10, "per_device_train_batch_size": 2}


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
    """checkpoint-2 and checkpoint-4 of a short run, plus what the run did right after checkpoint-4."""
    out = tmp_path_factory.mktemp("run")
    model, optimizer, scheduler = build(seed=0)
    inputs = torch.randn(5, 4, 64, generator=torch.Generator().manual_seed(1))
    for step in range(1, 5):
        train_step(model, optimizer, scheduler, inputs[step - 1])
        if step % 2 == 0:
            state = {"step": step, "data_position": 3 * step, "config": CONFIG}
            save_checkpoint(out, step, model, optimizer, scheduler, state, SingleProcess())
    after_save = {"python": random.random(), "torch": torch.rand(3)}  # the draws a resume must repeat
    saved_weights = lora_weights(model)
    train_step(model, optimizer, scheduler, inputs[4])
    return {
        "dir": out,
        "saved_weights": saved_weights,
        "after_save": after_save,
        "next_input": inputs[4],
        "next_weights": lora_weights(model),
    }


@pytest.fixture
def run_dir(saved_run, tmp_path):
    """A private copy of the saved run's folder, to damage."""
    dst = tmp_path / "run"
    shutil.copytree(saved_run["dir"], dst)
    return dst


# ----------------------------------------------------------------------------- manifest and restore


def test_manifest_lists_every_file_with_its_size_and_sha256(run_dir):
    folder = run_dir / "checkpoint-4"
    manifest = json.loads((folder / MANIFEST).read_text())
    on_disk = sorted(p.name for p in folder.iterdir() if p.name != MANIFEST)
    assert sorted(manifest["files"]) == on_disk  # trainer_state.json included: the manifest came last
    for expected in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_0.pt"):
        assert expected in on_disk
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["step"] == 4
    state = json.loads((folder / "trainer_state.json").read_text())
    assert (state["step"], state["data_position"], state["num_processes"]) == (4, 12, 1)
    assert checkpoint_dirs(run_dir) == [run_dir / "checkpoint-2", folder]
    verify_checkpoint(folder)  # does not raise


def test_optimizer_file_holds_8bit_state_that_loads_weights_only(run_dir):
    state = torch.load(run_dir / "checkpoint-4" / "optimizer.pt", weights_only=True)
    dtypes = {v["__bnb_optimizer_quant_state__"]["state1"].dtype for v in state["state"].values()}
    assert torch.uint8 in dtypes  # the 8-bit moments really are in the file
    rng = torch.load(run_dir / "checkpoint-4" / "rng_state_0.pt", weights_only=True)
    assert rng["python"][0] == random.getstate()[0] and len(rng["python"][1]) == 625


def test_load_restores_weights_optimizer_schedule_and_rng_exactly(saved_run, run_dir):
    model, optimizer, scheduler = build(seed=99)  # other weights, fresh optimiser state
    random.seed(12345)
    torch.manual_seed(12345)
    state = load_checkpoint(run_dir / "checkpoint-4", model, optimizer, scheduler, SingleProcess())
    assert state["step"] == 4 and state["config"] == CONFIG
    for name, value in lora_weights(model).items():
        torch.testing.assert_close(value, saved_run["saved_weights"][name], rtol=0, atol=0)
    assert scheduler.last_epoch == 4
    assert random.random() == saved_run["after_save"]["python"]
    assert torch.equal(torch.rand(3), saved_run["after_save"]["torch"])
    # the next update (8-bit moments, step count, learning rate) is the one the run made
    train_step(model, optimizer, scheduler, saved_run["next_input"])
    for name, value in lora_weights(model).items():
        torch.testing.assert_close(value, saved_run["next_weights"][name], rtol=0, atol=0)


def test_adapter_of_another_rank_is_one_error_naming_the_adapter(run_dir):
    model, optimizer, scheduler = build(seed=0, lora_r=16)
    with pytest.raises(CheckpointError, match=r"does not fit this model .*r=32 but the model has 16") as err:
        load_checkpoint(run_dir / "checkpoint-4", model, optimizer, scheduler, SingleProcess())
    assert err.value.file == run_dir / "checkpoint-4" / "adapter_model.safetensors"


# ----------------------------------------------------------------------------- a planted pickle


class Payload:
    """Unpickling this creates a file: what an attacker's optimizer.pt would do (with worse code)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _plant(file: Path, marker: Path) -> None:
    torch.save({"state": {}, "param_groups": [], "x": Payload(marker)}, file)


def test_the_planted_payload_is_live_without_weights_only(tmp_path):
    """So the tests below cannot pass because the payload does nothing."""
    marker = tmp_path / "pwned"
    _plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("name", ["optimizer.pt", "scheduler.pt", "rng_state_0.pt"])
@pytest.mark.parametrize("manifest", ["rewritten", "stale", "absent"])
def test_a_planted_pickle_does_not_run(run_dir, tmp_path, name, manifest):
    folder = run_dir / "checkpoint-4"
    marker = tmp_path / "pwned"
    _plant(folder / name, marker)
    if manifest == "rewritten":  # an attacker who can write the folder can write the manifest too
        write_manifest(folder, 4)
    elif manifest == "absent":
        (folder / MANIFEST).unlink()
    if manifest == "stale":
        with pytest.raises(CheckpointError, match=rf"{name}: .*manifest") as err:
            resolve_checkpoint(str(folder), run_dir)
        assert err.value.file == folder / name
    else:
        assert resolve_checkpoint(str(folder), run_dir) == folder  # a well-formed file: only loading tells
    model, optimizer, scheduler = build(seed=0)
    with pytest.raises(CheckpointError, match=rf"{name}: refused: it holds pickled Python objects") as err:
        load_checkpoint(folder, model, optimizer, scheduler, SingleProcess())
    assert err.value.file == folder / name
    assert "\n" not in str(err.value)
    assert not marker.exists()


# ----------------------------------------------------------------------------- damaged checkpoints


def _truncate(file: Path) -> None:
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])


DAMAGES = {
    "adapter_model.safetensors": _truncate,
    "optimizer.pt": _truncate,
    "scheduler.pt": lambda file: file.write_bytes(b""),
    "trainer_state.json": lambda file: file.write_text(file.read_text()[:25]),  # torn mid-write
}
# what verification says about each damage, with the manifest and without (a checkpoint of the
# previous version: structural checks only)
REASONS = {
    ("adapter_model.safetensors", True): "bytes, the manifest says",
    ("optimizer.pt", True): "bytes, the manifest says",
    ("scheduler.pt", True): "0 bytes, the manifest says",
    ("trainer_state.json", True): "bytes, the manifest says",
    ("adapter_model.safetensors", False): "its header describes",
    ("optimizer.pt", False): "not a complete torch.save archive",
    ("scheduler.pt", False): "empty",
    ("trainer_state.json", False): "unreadable JSON",
}


@pytest.mark.parametrize("with_manifest", [True, False], ids=["manifest", "no-manifest"])
@pytest.mark.parametrize("name", list(DAMAGES))
def test_latest_skips_a_damaged_newest_checkpoint(run_dir, name, with_manifest):
    if not with_manifest:
        for folder in checkpoint_dirs(run_dir):
            (folder / MANIFEST).unlink()
    newest = run_dir / "checkpoint-4"
    DAMAGES[name](newest / name)
    notes: list[str] = []
    assert resolve_checkpoint("latest", run_dir, warn=notes.append) == run_dir / "checkpoint-2"
    skipped = [n for n in notes if n.startswith("skipped")]
    assert len(skipped) == 1
    assert f"skipped {newest}: {newest / name}: " in skipped[0]
    assert REASONS[name, with_manifest] in skipped[0]
    assert any("no checkpoint_manifest.json" in n for n in notes) == (not with_manifest)

    # the same folder named explicitly: one error naming the file
    with pytest.raises(CheckpointError, match=REASONS[name, with_manifest]) as err:
        resolve_checkpoint(str(newest), run_dir)
    assert err.value.file == newest / name
    assert str(err.value).startswith(f"resume_from_checkpoint='{newest}': {newest / name}: ")


@pytest.mark.parametrize("name", list(DAMAGES))
def test_loading_a_damaged_file_is_one_error_and_changes_nothing(run_dir, name):
    """Without verification first (the second line of defence): still one CheckpointError."""
    folder = run_dir / "checkpoint-4"
    DAMAGES[name](folder / name)
    model, optimizer, scheduler = build(seed=99)
    before = lora_weights(model)
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(folder, model, optimizer, scheduler, SingleProcess())
    assert err.value.file == folder / name
    assert str(err.value).startswith(f"{folder / name}: ")
    assert "\n" not in str(err.value)
    for key, value in lora_weights(model).items():  # every file is read before anything is applied
        assert torch.equal(value, before[key])
    assert scheduler.last_epoch == 0


def test_changed_bytes_of_the_same_size_fail_the_checksum(run_dir):
    file = run_dir / "checkpoint-4" / "adapter_model.safetensors"
    data = bytearray(file.read_bytes())
    data[-1] ^= 0xFF  # one bit pattern in the last weight: same size, still parses
    file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256 differs from the manifest") as err:
        verify_checkpoint(file.parent)
    assert err.value.file == file


def test_a_damaged_manifest_is_named(run_dir):
    folder = run_dir / "checkpoint-4"
    manifest = json.loads((folder / MANIFEST).read_text())
    (folder / "scheduler.pt").unlink()
    with pytest.raises(CheckpointError, match=r"scheduler\.pt: missing \(the manifest lists it\)"):
        verify_checkpoint(folder)
    del manifest["files"]["scheduler.pt"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"checkpoint_manifest\.json: does not list scheduler\.pt"):
        verify_checkpoint(folder)
    (folder / MANIFEST).write_text('{"format": 1, "files": {"adapt')
    with pytest.raises(CheckpointError, match=r"checkpoint_manifest\.json: unreadable JSON") as err:
        verify_checkpoint(folder)
    assert err.value.file == folder / MANIFEST


def test_trainer_state_must_match_the_folder(run_dir):
    (run_dir / "checkpoint-4").rename(run_dir / "checkpoint-6")
    with pytest.raises(CheckpointError, match="trainer_state.json: step 4 but the folder is checkpoint-6"):
        verify_checkpoint(run_dir / "checkpoint-6")


def test_extra_files_next_to_the_adapter_do_not_break_verification(run_dir):
    """evaluate.py may write its results into a checkpoint folder."""
    (run_dir / "checkpoint-4" / "eval_results.json").write_text("{}")
    verify_checkpoint(run_dir / "checkpoint-4")


def test_latest_reports_a_folder_without_trainer_state(run_dir):
    shutil.copytree(run_dir / "checkpoint-4", run_dir / "checkpoint-6")
    (run_dir / "checkpoint-6" / "trainer_state.json").unlink()
    assert checkpoint_dirs(run_dir)[-1] == run_dir / "checkpoint-4"  # not complete: not listed
    notes: list[str] = []
    assert resolve_checkpoint("latest", run_dir, warn=notes.append) == run_dir / "checkpoint-4"
    assert notes == [f"skipped {run_dir / 'checkpoint-6'}: {run_dir / 'checkpoint-6' / 'trainer_state.json'}: "
                     "missing (the manifest lists it)"]  # fmt: skip


def test_latest_with_nothing_intact_lists_every_reason(run_dir):
    (run_dir / "checkpoint-4" / "optimizer.pt").write_bytes(b"")
    (run_dir / "checkpoint-2" / "trainer_state.json").write_text("{")
    with pytest.raises(CheckpointError, match="none of the 2 checkpoints") as err:
        resolve_checkpoint("latest", run_dir)
    assert "checkpoint-4/optimizer.pt: 0 bytes" in str(err.value)
    assert "checkpoint-2/trainer_state.json: " in str(err.value)


def test_latest_with_no_checkpoint_and_a_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match=r"no checkpoint-<step>/ in .*start without --resume_from"):
        resolve_checkpoint("latest", tmp_path)
    with pytest.raises(CheckpointError, match="no such checkpoint folder") as err:
        resolve_checkpoint(str(tmp_path / "checkpoint-9"), tmp_path)
    assert err.value.file == tmp_path / "checkpoint-9"


def test_a_checkpoint_of_the_previous_version_loads_with_a_note(saved_run, run_dir):
    for folder in checkpoint_dirs(run_dir):
        (folder / MANIFEST).unlink()
    notes: list[str] = []
    path = resolve_checkpoint("latest", run_dir, warn=notes.append)
    assert path == run_dir / "checkpoint-4"
    assert notes == [f"{path}: no checkpoint_manifest.json (saved by an earlier version): "
                     "checked its files' structure, not checksums"]  # fmt: skip
    model, optimizer, scheduler = build(seed=99)
    assert load_checkpoint(path, model, optimizer, scheduler, SingleProcess())["step"] == 4
    for name, value in lora_weights(model).items():
        assert torch.equal(value, saved_run["saved_weights"][name])


def test_remove_incomplete_checkpoints_removes_only_tmp(run_dir):
    (run_dir / "checkpoint-6.tmp").mkdir()
    assert remove_incomplete_checkpoints(run_dir) == [run_dir / "checkpoint-6.tmp"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint-2", "checkpoint-4"]


def test_check_resume_config_names_each_field_and_both_values(saved_run):
    folder = saved_run["dir"] / "checkpoint-4"
    saved_state = json.loads((folder / "trainer_state.json").read_text())
    check_resume_config(folder, saved_state, {**CONFIG, "max_steps": 99}, num_processes=1)  # fine
    current = {**CONFIG, "seed": 1, "lora_r": 16, "per_device_train_batch_size": 1}
    with pytest.raises(CheckpointError) as err:
        check_resume_config(folder, saved_state, current, num_processes=2)
    assert str(err.value) == (
        f"cannot resume from {folder}: it belongs to a run defined differently: seed 7 -> 1; lora_r 32 -> 16. "
        "Put those values back to continue it, or start a new run (another --output_dir, or "
        "--overwrite_output_dir true without --resume_from_checkpoint)"
    )  # 2 x 1 x 1 == 1 x 1 x 2 prompts per step: not a difference
    with pytest.raises(CheckpointError, match="prompts per step .* 2 -> 4"):
        check_resume_config(folder, saved_state, {**CONFIG, "per_device_train_batch_size": 4}, 1)
    with pytest.raises(CheckpointError, match="trainer_state.json: has no 'config'"):
        check_resume_config(folder, {"step": 4}, CONFIG, 1)
