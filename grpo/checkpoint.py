"""Checkpoints that a kill can never break, that cannot run code, and that say when they are damaged.

``output_dir/checkpoint-<step>/`` holds:

    adapter_model.safetensors, adapter_config.json   the PEFT adapter (PeftModel.from_pretrained reads it)
    optimizer.pt, scheduler.pt                        optimiser and learning-rate schedule state
    rng_state_<rank>.pt                               python / torch RNG state of every process
    trainer_state.json                                step, data position, counters, num_processes, config
    rollout_policy.safetensors                        async_generation: the LoRA weights sampling the next
                                                      rollout (one step behind), to send it again on resume
    checkpoint_manifest.json                          size and sha256 of every file above (written last)

Complete: everything is written into ``checkpoint-<step>.tmp/`` and then renamed in one ``os.replace``.
The rename is the completeness marker: a process killed (even with SIGKILL) during a save leaves only a
``.tmp`` folder, which ``checkpoint_dirs`` ignores and ``remove_incomplete_checkpoints`` deletes.

Intact: the manifest is the last file written before the rename, so it covers every other file. A file
changed afterwards (a truncated copy, a full disk, a power cut before the page cache reached the disk,
a hand edit) no longer matches it: ``verify_checkpoint`` names the file and what is wrong, and
``resolve_checkpoint("latest", ...)`` falls back to the newest checkpoint that verifies.

Checkpoints of the previous version have no manifest. They are accepted, with a note, after structural
checks (each file there and not empty, the JSON parses, the safetensors header matches the file size,
each ``.pt`` zip archive passes its CRC check): those saves were atomic too, so refusing them would
strand every run in progress at the upgrade, and the checks catch the damage that truncation causes.

Safe: every ``.pt`` file is read with ``torch.load(weights_only=True)``, which builds only tensors and
plain containers and refuses any other pickled object, so a tampered file cannot run code. The bitsandbytes
8-bit AdamW state (uint8 tensors, quantisation maps, absmax), the LR scheduler state and the RNG state
(python's ``random.getstate()`` is a tuple of ints) all load that way.

Every problem is one ``CheckpointError`` whose message names the file and what is wrong; the CLI prints it
as one line.

The output folder around the checkpoints (finding and rotating them, refusing to overwrite another run,
checking that a resumed run is the same run) is grpo/run_folder.py's, and so are ``CheckpointError`` and
``OutputDirError`` (both modules raise them). Those names are re-exported here, so
``from grpo.checkpoint import check_output_dir, CheckpointError`` keeps working.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import random
import shutil
import struct
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from grpo.run_folder import (
    CHECKPOINT_NAME_RE,
    PROMPTS_PER_STEP,
    RESUMABLE_FIELDS,
    RUN_OUTPUTS,
    TRAINER_STATE,
    CheckpointError,
    OutputDirError,
    check_output_dir,
    check_resume_config,
    checkpoint_dirs,
    config_defaults,
    config_differences,
    error_line,
    remove_incomplete_checkpoints,
    rotate_checkpoints,
    run_outputs,
    step_folders,
)
from models.policy import ADAPTER_CONFIG, ADAPTER_WEIGHTS, load_adapter, save_adapter

__all__ = [
    # checkpoints: this module
    "MANIFEST", "MANIFEST_FORMAT", "OPTIMIZER", "REQUIRED_FILES", "SCHEDULER", "TRAINER_STATE",
    "has_manifest", "load_checkpoint", "read_trainer_state", "resolve_checkpoint",
    "rng_file_name", "save_checkpoint", "verify_checkpoint", "write_manifest",
    # the output folder: grpo/run_folder.py's, re-exported so that imports from grpo.checkpoint keep working
    "CheckpointError", "OutputDirError", "PROMPTS_PER_STEP", "RESUMABLE_FIELDS", "RUN_OUTPUTS",
    "check_output_dir", "check_resume_config", "checkpoint_dirs", "config_defaults", "config_differences",
    "remove_incomplete_checkpoints", "rotate_checkpoints", "run_outputs",
]  # fmt: skip

MANIFEST = "checkpoint_manifest.json"
OPTIMIZER = "optimizer.pt"
SCHEDULER = "scheduler.pt"
ROLLOUT_POLICY = "rollout_policy.safetensors"
MANIFEST_FORMAT = 1
# files a checkpoint cannot resume without (rng_state_<rank>.pt is per process: at least rank 0's)
REQUIRED_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS, OPTIMIZER, SCHEDULER, TRAINER_STATE, "rng_state_0.pt")


def rng_file_name(rank: int) -> str:
    return f"rng_state_{rank}.pt"


# ============================================================================ manifest and verification


def _sha256(file: Path) -> str:
    digest = hashlib.sha256()
    with file.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _files_in(folder: Path) -> list[str]:
    """Relative names of the regular files under folder, sorted, without the manifest itself."""
    return sorted(
        p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )


def write_manifest(folder: str | os.PathLike, step: int | None = None) -> dict[str, Any]:
    """Write ``checkpoint_manifest.json``: the size and sha256 of every other file in folder.

    It must be the last file written into a checkpoint: it vouches only for what is there when it is made.
    Returns the manifest, e.g. ``{"format": 1, "step": 4, "files": {"optimizer.pt": {"bytes": 2915,
    "sha256": "9f86d0..."}, ...}}``.
    """
    folder = Path(folder)
    files = {
        name: {"bytes": (folder / name).stat().st_size, "sha256": _sha256(folder / name)}
        for name in _files_in(folder)
    }
    manifest = {"format": MANIFEST_FORMAT, "step": step, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return manifest


def has_manifest(path: str | os.PathLike) -> bool:
    return (Path(path) / MANIFEST).is_file()


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in file, or CheckpointError naming the file (missing, empty, torn, not an object)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing", file)
    try:
        value = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{file}: unreadable JSON ({error_line(err)})", file) from err
    if not isinstance(value, dict):
        raise CheckpointError(f"{file}: expected a JSON object, found {type(value).__name__}", file)
    return value


def read_trainer_state(path: str | os.PathLike) -> dict[str, Any]:
    """trainer_state.json of a checkpoint, checked: a JSON object with an integer ``step`` that matches
    the folder name ``checkpoint-<step>`` (when the folder has that name)."""
    path = Path(path)
    file = path / TRAINER_STATE
    state = _read_json_object(file)
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{file}: 'step' is {step!r}, expected a non-negative integer", file)
    if (m := CHECKPOINT_NAME_RE.match(path.name)) and int(m.group(1)) != step:
        raise CheckpointError(f"{file}: step {step} but the folder is {path.name}", file)
    return state


def _verify_against_manifest(path: Path) -> None:
    manifest_file = path / MANIFEST
    manifest = _read_json_object(manifest_file)
    files = manifest.get("files")
    if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
        raise CheckpointError(
            f"{manifest_file}: not a manifest this version reads (format {manifest.get('format')!r})",
            manifest_file,
        )
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{manifest_file}: does not list {name}", manifest_file)
    for name, expected in files.items():
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{manifest_file}: lists {name!r}, outside the checkpoint", manifest_file)
        if not isinstance(expected, dict):
            raise CheckpointError(f"{manifest_file}: the entry of {name} is not an object", manifest_file)
        if not file.is_file():
            raise CheckpointError(f"{file}: missing (the manifest lists it)", file)
        size = file.stat().st_size
        if size != expected.get("bytes"):
            raise CheckpointError(
                f"{file}: {size} bytes, the manifest says {expected.get('bytes')} (truncated or changed)",
                file,
            )
        if _sha256(file) != expected.get("sha256"):
            raise CheckpointError(f"{file}: sha256 differs from the manifest (changed after the save)", file)


def _check_safetensors(file: Path) -> None:
    """The safetensors layout: 8-byte header length n, n bytes of JSON header, then exactly the tensor
    bytes the header's data_offsets describe. A truncated file is shorter than that."""
    size = file.stat().st_size
    with file.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise CheckpointError(f"{file}: {size} bytes, too short for a safetensors file", file)
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise CheckpointError(f"{file}: truncated inside its header ({size} bytes)", file)
        try:
            header = json.loads(fh.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{file}: unreadable safetensors header ({error_line(err)})", file) from err
    try:
        data_end = max(
            (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0
        )
    except (AttributeError, KeyError, IndexError, TypeError, ValueError) as err:
        raise CheckpointError(f"{file}: unreadable safetensors header ({error_line(err)})", file) from err
    if size != 8 + header_len + data_end:
        raise CheckpointError(
            f"{file}: {size} bytes, its header describes {8 + header_len + data_end} (truncated?)", file
        )


def _check_torch_archive(file: Path) -> None:
    """torch.save writes a zip archive with a CRC per member: truncation or changed bytes fail the test."""
    try:
        with zipfile.ZipFile(file) as archive:
            bad_member = archive.testzip()
    except (OSError, zipfile.BadZipFile, EOFError) as err:
        raise CheckpointError(f"{file}: not a complete torch.save archive ({error_line(err)})", file) from err
    if bad_member is not None:
        raise CheckpointError(f"{file}: CRC error in {bad_member} (damaged)", file)


def _verify_structure(path: Path) -> None:
    """What can be checked without a manifest (checkpoints of the previous version)."""
    for name in REQUIRED_FILES:
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing", file)
        if file.stat().st_size == 0:
            raise CheckpointError(f"{file}: empty (0 bytes)", file)
    _read_json_object(path / ADAPTER_CONFIG)
    _check_safetensors(path / ADAPTER_WEIGHTS)
    for file in sorted(path.glob("*.pt")):
        _check_torch_archive(file)


def verify_checkpoint(path: str | os.PathLike) -> None:
    """Raise CheckpointError (naming the file: missing, size, checksum, unreadable JSON) unless the
    checkpoint folder is intact.

    With a manifest: every file it lists exists with its size and sha256, and it lists the required files.
    Without one (written by the previous version): the structural checks of the module docstring.
    Both: trainer_state.json holds a JSON object whose step matches the folder name.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder", path)
    if has_manifest(path):
        _verify_against_manifest(path)
    else:
        _verify_structure(path)
    read_trainer_state(path)


def resolve_checkpoint(
    spec: str, output_dir: str | os.PathLike, warn: Callable[[str], None] | None = None
) -> Path:
    """The checkpoint to resume from: ``'latest'`` -> the newest intact one in output_dir; else the folder
    ``spec``, which must verify.

    For 'latest', each newer checkpoint that fails ``verify_checkpoint`` is skipped, and
    ``warn("skipped <folder>: <file>: <what is wrong>")`` says so; a checkpoint without a manifest is taken
    with ``warn("<folder>: no checkpoint_manifest.json ...")``. CheckpointError when there is no
    checkpoint, none is intact (each reason listed), or the explicit folder does not verify.
    """
    say = warn or (lambda message: None)
    if spec == "latest":
        found = step_folders(output_dir)
        if not found:
            raise CheckpointError(
                f"resume_from_checkpoint='latest': no checkpoint-<step>/ in {output_dir} "
                "(start without --resume_from_checkpoint)",
                output_dir,
            )
        reasons = []
        for path in reversed(found):
            try:
                verify_checkpoint(path)
            except CheckpointError as err:
                reasons.append(str(err))
                say(f"skipped {path}: {err}")
                continue
            _note_if_unverified(path, say)
            return path
        raise CheckpointError(
            f"resume_from_checkpoint='latest': none of the {len(found)} checkpoints in {output_dir} "
            "is intact: " + "; ".join(reasons),
            found[-1],
        )
    path = Path(spec)
    try:
        verify_checkpoint(path)
    except CheckpointError as err:
        raise CheckpointError(f"resume_from_checkpoint={spec!r}: {err}", err.file) from err
    _note_if_unverified(path, say)
    return path


def _note_if_unverified(path: Path, say: Callable[[str], None]) -> None:
    if not has_manifest(path):
        say(
            f"{path}: no {MANIFEST} (saved by an earlier version): "
            "checked its files' structure, not checksums"
        )


# ============================================================================ save and load


def _rng_state() -> dict[str, Any]:
    # python's state is (version, tuple of 625 ints, None): plain containers, so weights_only loads it
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    model,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict[str, Any],
    accelerator,
    rollout_policy: tuple[int, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write checkpoint-<step>/ atomically (all processes call this; rank 0 writes the shared parts).

    trainer_state must be JSON-serialisable (step, data position, counters, config dict); ``step`` and
    ``num_processes`` are added. Order: adapter, optimiser, schedule (and ``rollout_policy``); every process's
    RNG; trainer_state.json; the manifest; then the rename that makes the folder visible.
    rollout_policy: ``async_generation``'s (version, LoRA weights) of the policy sampling the rollout in flight
    (``load_rollout_policy`` reads it back).
    """
    final = Path(output_dir) / f"checkpoint-{step}"
    tmp = Path(output_dir) / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_adapter(accelerator.unwrap_model(model), str(tmp))
        torch.save(optimizer.state_dict(), tmp / OPTIMIZER)
        torch.save(scheduler.state_dict(), tmp / SCHEDULER)
        if rollout_policy is not None:
            version, weights = rollout_policy
            save_file(weights, str(tmp / ROLLOUT_POLICY), metadata={"version": str(version)})
    accelerator.wait_for_everyone()
    torch.save(_rng_state(), tmp / rng_file_name(accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        num_processes = getattr(accelerator, "num_processes", 1)
        state = {**trainer_state, "step": step, "num_processes": num_processes}
        (tmp / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        write_manifest(tmp, step)  # last: it vouches for every file above
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


def load_rollout_policy(path: str | os.PathLike) -> tuple[int, dict[str, torch.Tensor]] | None:
    """(version, LoRA weights) of the policy that was sampling the next rollout when checkpoint ``path`` was
    saved (``async_generation``), or None when nothing was on its way (a synchronous run, or the last step)."""
    file = Path(path) / ROLLOUT_POLICY
    if not file.is_file():
        return None
    with _reading(file, "cannot be read"), safe_open(str(file), framework="pt") as fh:
        version = int((fh.metadata() or {})["version"])
        return version, {name: fh.get_tensor(name) for name in fh.keys()}  # noqa: SIM118 - safe_open has no iter


@contextmanager
def _reading(file: Path, what: str) -> Iterator[None]:
    """Turn any failure while reading or applying file into one CheckpointError that names it."""
    try:
        yield
    except CheckpointError:
        raise
    except torch.OutOfMemoryError:  # not the file's fault
        raise
    except pickle.UnpicklingError as err:  # weights_only refused a pickled object that is not a tensor
        raise CheckpointError(
            f"{file}: refused: it holds pickled Python objects, not only tensors (weights_only=True); "
            "a tampered or foreign file? Nothing in it was run",
            file,
        ) from err
    except Exception as err:
        raise CheckpointError(f"{file}: {what} ({error_line(err)})", file) from err


def _torch_load(file: Path) -> Any:
    """torch.load that can build only tensors and plain containers (no code runs from the file)."""
    if not file.is_file():
        raise CheckpointError(f"{file}: missing", file)
    with _reading(file, "cannot be read"):
        return torch.load(file, map_location="cpu", weights_only=True)


def load_checkpoint(path: str | os.PathLike, model, optimizer, scheduler, accelerator) -> dict[str, Any]:
    """Restore adapter, optimiser, schedule and this process's RNG; return the saved trainer_state.

    Every file is read (safely) before anything is changed, so an unreadable file leaves the model as it
    was. Any failure is a CheckpointError naming the file: unreadable, refused, or not fitting this run
    (a LoRA rank or an optimiser of another shape). Call ``resolve_checkpoint`` first: it verifies the
    checksums. A missing rng_state_<rank>.pt (a resume on more processes) leaves that process's RNG as is.
    """
    path = Path(path)
    trainer_state = read_trainer_state(path)
    optimizer_state = _torch_load(path / OPTIMIZER)
    scheduler_state = _torch_load(path / SCHEDULER)
    rng_file = path / rng_file_name(accelerator.process_index)
    rng_state = _torch_load(rng_file) if rng_file.is_file() else None

    _read_json_object(path / ADAPTER_CONFIG)
    if not (path / ADAPTER_WEIGHTS).is_file():
        raise CheckpointError(f"{path / ADAPTER_WEIGHTS}: missing", path / ADAPTER_WEIGHTS)
    _check_safetensors(path / ADAPTER_WEIGHTS)
    with _reading(path / ADAPTER_WEIGHTS, "does not fit this model"):
        load_adapter(accelerator.unwrap_model(model), str(path))  # in place: the optimiser stays valid
    with _reading(path / OPTIMIZER, "does not fit this run's optimiser"):
        optimizer.load_state_dict(optimizer_state)
    with _reading(path / SCHEDULER, "does not fit this run's schedule"):
        scheduler.load_state_dict(scheduler_state)
    if rng_state is not None:
        with _reading(rng_file, "is not an RNG state"):
            _set_rng_state(rng_state)
    return trainer_state
