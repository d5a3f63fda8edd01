"""The output folder of a run: which checkpoints it holds, how many are kept, whether a new run may
write into it, and whether a checkpoint there belongs to the run that resumes it.

``output_dir/`` holds::

    checkpoint-<step>/       a complete checkpoint (it has trainer_state.json); grpo/checkpoint.py
                             writes, verifies and loads what is inside
    checkpoint-<step>.tmp/   a save that was killed before its final rename: never used, removed
    metrics.jsonl, metrics.png, runs/   the run's other outputs (RUN_OUTPUTS)
    .grpo_run.lock           locked (flock, by the ``filelock`` package) by the run writing here; kept, empty
    .grpo_run.holder.json    who holds it: host, pid, start time; removed when the run ends

This module only looks at those names, never inside a checkpoint's files:

1. finding: ``checkpoint_dirs`` (complete ones, oldest first), ``remove_incomplete_checkpoints``, and
   ``rotate_checkpoints`` (keep at most save_total_limit);
2. guarding, before any model is loaded: ``hold_output_dir`` locks the folder for the run's whole life (one
   run per folder: a second one stops at once, naming the holder), and ``check_output_dir`` keeps a fresh
   run from silently taking over a folder that holds an earlier run;
3. resuming: ``check_resume_config``: a checkpoint is continued only by a run defined the same way
   (``RESUMABLE_FIELDS`` is the allow-list of what may change).

``CheckpointError`` (and its ``OutputDirError``) is defined here because both this module and
grpo/checkpoint.py raise it; grpo/checkpoint.py imports this module (and re-exports its names), never
the other way round.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout

if TYPE_CHECKING:
    from accelerate import Accelerator

CHECKPOINT_NAME_RE = re.compile(r"^checkpoint-(\d+)$")  # checkpoint-<step>; the group is the step
INCOMPLETE_NAME_RE = re.compile(r"^checkpoint-(\d+)\.tmp$")  # a save still under way, or killed
# every checkpoint holds it (grpo/checkpoint.py writes it); a checkpoint-<step>/ without it is not complete
TRAINER_STATE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint or output folder cannot be used; the message names the file and what is wrong.

    ``file`` is the path of the file (or folder) at fault, when there is one.
    """

    def __init__(self, message: str, file: str | os.PathLike | None = None):
        super().__init__(message)
        self.file = None if file is None else Path(file)


class OutputDirError(CheckpointError):
    """output_dir cannot be written, or holds another run that a fresh run would overwrite."""


def error_line(err: BaseException) -> str:
    """How a library's error is quoted inside a CheckpointError: its type and the first line of its message.

    Example: ``error_line(OSError("disk full\\nmore"))`` -> ``"OSError: disk full"``.
    """
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


# ============================================================================ finding checkpoints


def step_folders(output_dir: str | os.PathLike) -> list[Path]:
    """Every ``checkpoint-<step>/`` folder in output_dir (complete or not), by step, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_NAME_RE.match(p.name)) and p.is_dir()
    ]
    return [p for _, p in sorted(found)]


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in output_dir, oldest first (``.tmp`` folders are incomplete: skipped)."""
    return [p for p in step_folders(output_dir) if (p / TRAINER_STATE).is_file()]


def remove_incomplete_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Delete the ``checkpoint-<step>.tmp`` folders a killed save left behind; return what was removed."""
    root = Path(output_dir)
    stale = sorted(root.glob("checkpoint-*.tmp")) if root.is_dir() else []
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def rotate_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, keep: str | os.PathLike | None = None
) -> list[Path]:
    """Delete the oldest complete checkpoints so that at most ``save_total_limit`` remain (HF semantics).

    ``keep`` (the checkpoint just written) is never deleted, even when its step is not the highest (a
    resume from an older checkpoint re-writes a lower step): it counts as the newest. None or a limit
    <= 0 keeps everything. Only complete ``checkpoint-<step>/`` folders are counted and deleted.
    Call it on the main process only. Returns the deleted folders, oldest first.

    Example: checkpoint-2, -4, -6, -8 with limit 2 -> deletes 2 and 4; with keep=checkpoint-4 -> deletes
    2 and 6 (4 and 8 remain).
    """
    if not save_total_limit or save_total_limit <= 0:
        return []
    complete = checkpoint_dirs(output_dir)
    if keep is not None:
        kept = Path(keep).resolve()
        others = [p for p in complete if p.resolve() != kept]
        complete = others + [p for p in complete if p.resolve() == kept]
    doomed = complete[: max(0, len(complete) - save_total_limit)]
    for path in doomed:
        shutil.rmtree(path)
    return sorted(doomed, key=lambda p: int(CHECKPOINT_NAME_RE.match(p.name).group(1)))


# ============================================================================ the output folder

# What a run writes into output_dir besides its checkpoints; --overwrite_output_dir deletes only these
# (and checkpoint-<step>/, checkpoint-<step>.tmp/), never other files a user keeps there.
RUN_OUTPUTS = ("metrics.jsonl", "metrics.png", "runs")


def run_outputs(output_dir: str | os.PathLike) -> list[Path]:
    """An earlier run's files and folders in output_dir: checkpoints (complete or not) and RUN_OUTPUTS."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    checkpoints = [
        p
        for p in root.iterdir()
        if p.is_dir() and (CHECKPOINT_NAME_RE.match(p.name) or INCOMPLETE_NAME_RE.match(p.name))
    ]
    others = [root / name for name in RUN_OUTPUTS if (root / name).exists()]
    return sorted(checkpoints) + others


def make_writable(output_dir: str | os.PathLike) -> None:
    """Create output_dir if needed and write (then delete) a probe file in it: OutputDirError naming it if not."""
    root = Path(output_dir)
    probe = root / f".write_probe_{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise OutputDirError(f"output_dir {str(root)!r} is not writable ({error_line(err)})", root) from err


def check_output_dir(
    output_dir: str | os.PathLike, overwrite_output_dir: bool, resuming: bool, is_main_process: bool = True
) -> list[Path]:
    """Make sure a run may write into output_dir, before any model is loaded. Returns what was deleted.

    1. The folder is created if needed and must be writable (a probe file is written and deleted):
       OutputDirError naming output_dir if not.
    2. A fresh run (not ``resuming``) in a folder that holds an earlier run's checkpoints or metrics.jsonl
       is refused (OutputDirError saying both ways out), unless ``overwrite_output_dir``: then the
       earlier run's outputs (``run_outputs``) are deleted, by the main process only.
    A resumed run deletes nothing, even with overwrite_output_dir: it needs those checkpoints.
    Call it on every process (they all see the same folder, so they all raise alike), then wait.
    """
    root = Path(output_dir)
    make_writable(root)
    if resuming:
        return []
    earlier = run_outputs(root)
    if not any(p.name == "metrics.jsonl" or p.name.startswith("checkpoint-") for p in earlier):
        return []  # a plot or a tensorboard folder alone is no run to lose
    if not overwrite_output_dir:
        shown = ", ".join(p.name for p in earlier[:4]) + (", ..." if len(earlier) > 4 else "")
        raise OutputDirError(
            f"output_dir {str(root)!r} already holds a run ({shown}); continue it with "
            "--resume_from_checkpoint latest, or start over with --overwrite_output_dir true "
            "(deletes those), or choose another --output_dir",
            root,
        )
    if is_main_process:
        for path in earlier:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return earlier


# ============================================================================ one run per folder

RUN_LOCK = ".grpo_run.lock"  # flock'ed by the run that writes into output_dir, for its whole life
RUN_HOLDER = ".grpo_run.holder.json"  # {"host", "pid", "started"} of that run; removed when it ends
HOLDER_WAIT_SECONDS = 5.0  # how long a refused run waits for the holder to write RUN_HOLDER (it locks first)

_held: dict[Path, RunLock] = {}  # this process's locks, by resolved folder


@dataclasses.dataclass
class RunLock:
    """The lock a run holds on its output_dir, and what it wrote in RUN_HOLDER (``holder``)."""

    output_dir: Path
    lock: FileLock
    holder: dict[str, Any]

    def release(self) -> None:
        """Remove RUN_HOLDER and unlock. Only the process that took the lock does anything (a forked child
        inherits the atexit hook, not the lock), and only once."""
        if self.holder["pid"] != os.getpid() or _held.get(self.output_dir.resolve()) is not self:
            return
        del _held[self.output_dir.resolve()]
        if read_holder(self.output_dir) == self.holder:
            (self.output_dir / RUN_HOLDER).unlink(missing_ok=True)
        self.lock.release(force=True)


def read_holder(output_dir: str | os.PathLike) -> dict[str, Any] | None:
    """The RUN_HOLDER record of output_dir: {"host", "pid", "started"}; None when absent or unreadable."""
    try:
        holder = json.loads((Path(output_dir) / RUN_HOLDER).read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) and {"host", "pid", "started"} <= holder.keys() else None


def process_is_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this host (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def _is_live(holder: dict[str, Any] | None) -> bool:
    """A holder record that may belong to a running process (another host's pid cannot be checked from here)."""
    return holder is not None and (
        holder["host"] != socket.gethostname() or process_is_running(holder["pid"])
    )


def describe_holder(holder: dict[str, Any]) -> str:
    """Example: ``describe_holder({"host": "n1", "pid": 42, "started": "2025-01-01T10:00:00"})`` ->
    ``"pid 42 on host n1 (started 2025-01-01T10:00:00)"``."""
    return f"pid {holder['pid']} on host {holder['host']} (started {holder['started']})"


def lock_output_dir(output_dir: str | os.PathLike, warn: Callable[[str], None] = print) -> RunLock:
    """Lock output_dir for this process's run, until ``release_output_dir`` or the process ends.

    The lock is an OS file lock (flock) on RUN_LOCK, which the OS drops when its process dies, however it
    dies; RUN_HOLDER beside it names the holder. So:
    - a folder another live run holds: OutputDirError naming it (host, pid, start time), at once;
    - a RUN_HOLDER left by a run that died (SIGKILL, OOM kill, power loss): its lock is gone with it, so this
      run takes it and ``warn`` says whose lock it took over (one line);
    - the same process again (a second run in one Python session): the lock it already holds.
    """
    root = Path(output_dir)
    if (held := _held.get(root.resolve())) is not None:
        return held
    make_writable(root)
    lock = FileLock(root / RUN_LOCK, thread_local=False)  # released by whichever thread ends the run
    try:
        lock.acquire(timeout=0)
    except Timeout:
        # the holder locks, then writes RUN_HOLDER: wait briefly until a live one is there
        deadline = time.monotonic() + HOLDER_WAIT_SECONDS
        while not _is_live(holder := read_holder(root)) and time.monotonic() < deadline:
            time.sleep(0.05)
        who = describe_holder(holder) if holder else "another process (it has not written its name)"
        raise OutputDirError(
            f"output_dir {str(root)!r} is in use by another run: {who}; wait for it to end, or choose another "
            "--output_dir",
            root,
        ) from None
    except OSError as err:
        raise OutputDirError(f"output_dir {str(root)!r} cannot be locked ({error_line(err)})", root) from err
    previous = read_holder(root)
    holder = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started": datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    partial = root / f"{RUN_HOLDER}.{os.getpid()}.tmp"
    partial.write_text(json.dumps(holder) + "\n")
    os.replace(partial, root / RUN_HOLDER)  # whole or absent: a refused run never reads half a record
    if previous is not None:
        gone = "is no longer running" if not _is_live(previous) else "no longer holds it"
        warn(
            f"output_dir {str(root)!r}: took over the lock left by {describe_holder(previous)}, which {gone}"
        )
    run_lock = _held[root.resolve()] = RunLock(root, lock, holder)
    atexit.register(run_lock.release)  # a run that ends by an exception still leaves the folder free
    return run_lock


def release_output_dir(output_dir: str | os.PathLike) -> None:
    """Release this process's lock on output_dir, if it holds one (a no-op otherwise)."""
    held = _held.get(Path(output_dir).resolve())
    if held is not None:
        held.release()


def hold_output_dir(
    output_dir: str | os.PathLike, accelerator: Accelerator, warn: Callable[[str], None] = print
) -> RunLock | None:
    """``lock_output_dir`` for a run of one or many processes: the main process locks (one lock per run,
    whatever the process count), then tells the others (one broadcast) whether it may go on, so that
    every process of a refused run raises the same OutputDirError. Returns the lock on the main process."""
    from accelerate.utils import broadcast_object_list

    run_lock, refusal = None, None
    if accelerator.is_main_process:
        try:
            run_lock = lock_output_dir(output_dir, warn)
        except OutputDirError as err:
            refusal = str(err)
    if accelerator.num_processes > 1:
        refusal = broadcast_object_list([refusal], from_process=0)[0]
    if refusal is not None:
        raise OutputDirError(refusal, output_dir)
    return run_lock


# ============================================================================ resuming the same run

# The config fields that MAY differ between a checkpoint and the run that resumes it. Every other field
# defines the run (model, LoRA, data, sampling, GRPO math, rewards, optimiser, seed): an allow-list, so a
# field added later is defining until someone decides otherwise.
RESUMABLE_FIELDS = frozenset(
    {
        # how long and where
        "max_steps", "output_dir", "resume_from_checkpoint", "overwrite_output_dir",
        # what is logged, saved and evaluated along the way
        "logging_steps", "logging_first_step", "log_completions", "num_completions_to_print",
        "save_steps", "save_total_limit", "eval_steps", "eval_size", "report_to", "run_name",
        "debug", "disable_tqdm",
        # how the same computation is carried out (memory, speed, engine): the objective is unchanged
        "sampler", "logprob_backend", "gradient_checkpointing", "train_micro_batch_size",
        "vllm_gpu_memory_utilization", "vllm_max_model_len", "max_nonfinite_updates",
        "vllm_mode", "vllm_server_base_url", "vllm_server_host", "vllm_server_port", "vllm_server_timeout",
        "vllm_server_adapter_dir",
        # how the rewards are computed (not what they are): a stopped run may resume with a longer limit
        "reward_num_workers", "reward_timeout", "judge_base_url", "judge_timeout", "judge_max_concurrency",
        # compared as one product, prompts per optimiser step, when both process counts are known
        "per_device_train_batch_size", "gradient_accumulation_steps",
    }
)  # fmt: skip
# the one derived quantity: the number of processes does not change the math, the global batch does
PROMPTS_PER_STEP = "prompts_per_step"
_BATCH_FIELDS = ("per_device_train_batch_size", "gradient_accumulation_steps")


def config_defaults() -> dict[str, Any]:
    """The default value of every GRPOConfig field (JSON form), without building or validating a config."""
    from grpo.config import GRPOConfig

    defaults = {}
    for f in dataclasses.fields(GRPOConfig):
        if f.default is not dataclasses.MISSING:
            defaults[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            defaults[f.name] = f.default_factory()
    return _as_json(defaults)


def _as_json(value: Any) -> Any:
    """The value as it reads back from trainer_state.json (tuples -> lists), so both sides compare alike."""
    return json.loads(json.dumps(value, default=str))


def _prompts_per_step(config: dict[str, Any], num_processes: int) -> int | None:
    try:
        return (
            int(config["per_device_train_batch_size"])
            * int(config.get("gradient_accumulation_steps", 1))
            * num_processes
        )
    except (KeyError, TypeError, ValueError):
        return None


def config_differences(
    saved: dict[str, Any],
    current: dict[str, Any],
    defaults: dict[str, Any] | None = None,
    *,
    saved_num_processes: int | None = None,
    current_num_processes: int | None = None,
) -> list[str]:
    """The fields that define the run and differ between the checkpoint's config and the current one.

    A field differs unless it is in RESUMABLE_FIELDS, or both values are equal (compared as JSON reads
    them back: 1 == 1.0, a tuple equals its list). A field the checkpoint does not have (added to the
    config since) differs only if its current value is not its default (``defaults``, GRPOConfig's when
    None): the default must keep the old behaviour. A field only the checkpoint has (since removed)
    is ignored: the current code cannot act on it.
    With both process counts, per_device_train_batch_size x gradient_accumulation_steps x processes is
    compared as ``prompts_per_step`` (6 x 1 x 1 == 3 x 1 x 2: the same run); without them (a checkpoint
    of the previous version), the two fields are compared one by one.

    Example: saved {"seed": 7, "lora_r": 8, "max_steps": 4}, current {"seed": 1, "lora_r": 8,
    "max_steps": 40} -> ["seed"].
    """
    saved, current = _as_json(saved), _as_json(current)
    defaults = config_defaults() if defaults is None else _as_json(defaults)
    by_product = saved_num_processes is not None and current_num_processes is not None
    differing = []
    for name, value in current.items():
        if name in RESUMABLE_FIELDS and (by_product or name not in _BATCH_FIELDS):
            continue
        if name in saved:
            if saved[name] != value:
                differing.append(name)
        elif name not in defaults or defaults[name] != value:
            differing.append(name)
    if by_product and _prompts_per_step(saved, saved_num_processes) != _prompts_per_step(
        current, current_num_processes
    ):
        differing.append(PROMPTS_PER_STEP)
    return differing


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_resume_config(
    checkpoint: str | os.PathLike,
    saved_state: dict[str, Any],
    current: dict[str, Any],
    num_processes: int | None = None,
) -> None:
    """CheckpointError naming each field (checkpoint value -> current value) when the checkpoint belongs to
    a run defined differently (``config_differences``). ``saved_state`` is the checkpoint's trainer_state."""
    saved = saved_state.get("config")
    if not isinstance(saved, dict):
        file = Path(checkpoint) / TRAINER_STATE
        raise CheckpointError(f"{file}: has no 'config' to compare this run with", file)
    saved_processes = saved_state.get("num_processes")
    differing = config_differences(
        saved,
        current,
        saved_num_processes=saved_processes,
        current_num_processes=num_processes if saved_processes is not None else None,
    )
    if not differing:
        return
    parts = []
    for name in differing:
        if name == PROMPTS_PER_STEP:
            before = _prompts_per_step(_as_json(saved), saved_processes)
            after = _prompts_per_step(_as_json(current), num_processes)
            parts.append(
                f"prompts per step (per_device_train_batch_size x gradient_accumulation_steps x processes) "
                f"{before} -> {after}"
            )
        elif name in saved:
            parts.append(f"{name} {_short(saved[name])} -> {_short(current[name])}")
        else:
            parts.append(f"{name} (not in the checkpoint) -> {_short(current[name])}")
    raise CheckpointError(
        f"cannot resume from {checkpoint}: it belongs to a run defined differently: {'; '.join(parts)}. "
        "Put those values back to continue it, or start a new run (another --output_dir, or "
        "--overwrite_output_dir true without --resume_from_checkpoint)",
        checkpoint,
    )
