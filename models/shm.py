"""The RAM-backed folders through which the trainer hands weights to vLLM: named, sized, shared, swept.

vLLM 0.32 loads a base model and a LoRA adapter from folders only, so the colocated sampler
(``models/vllm_sampler.py``) writes them to ``/dev/shm`` (tmpfs: RAM, no disk I/O)::

    /dev/shm/grpo-<run>-<pid>-base-<random>/   the exported 4-bit base (models/export.py), once at start
    /dev/shm/grpo-<run>-<pid>-lora-<random>/   the adapter of one sync, replaced after each optimiser step

``run`` is the name of the run's output_dir, ``pid`` the process that wrote the folder and removes it.
Four rules keep RAM from filling up:

1. once per node: the node's first process writes, every process of the node reads (``once_per_node``);
2. free space is checked before each write (``new_folder``); when ``/dev/shm`` lacks room the folder goes
   to the temp folder (disk) instead, and one line says so;
3. the writer holds an ``flock`` on each folder it made until it removes it (the kernel drops the lock when
   the process dies, however it dies);
4. at start, folders whose writer is gone (its pid is not running and nobody holds the folder's lock) are
   removed, with one line (``sweep_stale``): a crash (OOM kill, NCCL abort) leaves its 6 GB base behind.

docs/SAMPLING.md ("Shared memory") has the sizes.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, Optional, TypeVar

SHM = "/dev/shm"
KINDS = ("base", "lora")
WHAT = {"base": "exported base", "lora": "adapter"}  # a kind in the lines a user reads
# grpo-<run>-<pid>-<kind>-<mkdtemp's random suffix, which has no '-'>; the run name may hold '-' itself
FOLDER_NAME = re.compile(r"grpo-(?P<run>.+)-(?P<pid>\d+)-(?P<kind>base|lora)-[^-]+")

T = TypeVar("T")


class SharedMemoryError(OSError):
    """No folder has room for a write, or the node's writer failed; the message says which and why."""


# ------------------------------------------------------------------------------------ names


def run_name(output_dir: str) -> str:
    """The run's name in folder names: output_dir's last part, other characters than [A-Za-z0-9._-] as '_'.

    Example: "outputs/qwen2.5-3b-medical/" -> "qwen2.5-3b-medical"; "runs/my run" -> "my_run".
    """
    name = os.path.basename(os.path.normpath(str(output_dir))) if output_dir else ""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)[:64] or "run"


def folder_prefix(run: str, kind: str, pid: Optional[int] = None) -> str:
    """``grpo-<run>-<pid>-<kind>-``: the start of a folder's name (mkdtemp adds a random suffix).

    Example: folder_prefix("medical", "lora", 4242) -> "grpo-medical-4242-lora-".
    """
    if kind not in KINDS:
        raise ValueError(f"kind={kind!r}: must be one of {KINDS}")
    return f"grpo-{run}-{os.getpid() if pid is None else pid}-{kind}-"


def owner_pid(path: str) -> Optional[int]:
    """The writer's pid in a folder's name, or None when the name is not one of ours."""
    match = FOLDER_NAME.fullmatch(os.path.basename(path))
    return int(match["pid"]) if match else None


def default_parents() -> list[str]:
    """Where folders go, in order of preference: /dev/shm (RAM), then the temp folder (disk)."""
    return [SHM, tempfile.gettempdir()]


# ------------------------------------------------------------------------------------ room


def free_bytes(parent: str) -> int:
    """Free bytes in the file system of ``parent`` (``shutil.disk_usage``; tests replace this function)."""
    return shutil.disk_usage(parent).free


def room_needed(size_bytes: int) -> int:
    """Bytes a write of ``size_bytes`` needs free: 5% for file headers and rounding, plus 1 MiB.

    Example: a rank-64 adapter of Qwen2.5-3B in bf16 (119.7 M parameters, 239.4 MB) needs 252.4 MB.
    """
    return int(size_bytes * 1.05) + 2**20


def new_folder(
    kind: str,
    run: str,
    size_bytes: int,
    parents: Optional[Sequence[str]] = None,
    say: Optional[Callable[[str], None]] = print,
) -> str:
    """A new empty folder ``<parent>/grpo-<run>-<pid>-<kind>-<random>`` with room for ``size_bytes``.

    parents: in order of preference (default ``default_parents()``). A parent is taken when it is a writable
    folder with ``room_needed(size_bytes)`` free. When it is not the first one, ``say`` gets one line naming
    why the others were passed over. The folder is held (``flock``) until ``remove_folder``.
    SharedMemoryError when no parent has room.
    """
    parents = list(parents) if parents is not None else default_parents()
    needed = room_needed(size_bytes)
    reasons = []
    for parent in parents:
        if not (os.path.isdir(parent) and os.access(parent, os.W_OK)):
            reasons.append(f"{parent} is not a writable folder")
            continue
        free = free_bytes(parent)
        if free < needed:
            reasons.append(f"{parent} has {free / 1e9:.2f} GB free")
            continue
        if reasons and say is not None:
            say(
                f"shared memory: {'; '.join(reasons)}, the {WHAT[kind]} needs {needed / 1e9:.2f} GB: "
                f"writing it to {parent} instead"
            )
        folder = tempfile.mkdtemp(prefix=folder_prefix(run, kind), dir=parent)
        _hold(folder)
        return folder
    raise SharedMemoryError(
        f"no room for the sampler's {WHAT[kind]} ({needed / 1e9:.2f} GB): " + "; ".join(reasons)
    )


# ------------------------------------------------------------------------------------ owning and sweeping

# folder -> an open descriptor of it, flock-ed by this process (the lock goes when the process does)
_HELD: dict[str, int] = {}


def _hold(folder: str) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    _HELD[folder] = descriptor


def held_by_someone(folder: str) -> bool:
    """Whether a process holds the folder's lock (a live writer, also one in another pid namespace)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)  # releases the lock if we just took it
    return False


def remove_folder(folder: str) -> None:
    """Delete a folder this process made with ``new_folder`` and release its lock (a no-op when gone)."""
    shutil.rmtree(folder, ignore_errors=True)
    descriptor = _HELD.pop(folder, None)
    if descriptor is not None:
        os.close(descriptor)


def pid_alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def folder_bytes(folder: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(folder) for f in files)


def stale_folders(parents: Optional[Sequence[str]] = None) -> list[str]:
    """Our folders (by name) in ``parents`` whose writer is gone: its pid is not running and nobody holds
    the folder's lock. Only folders of this user are considered (another user's cannot be removed anyway)."""
    stale = []
    for parent in parents if parents is not None else default_parents():
        if not os.path.isdir(parent):
            continue
        for name in sorted(os.listdir(parent)):
            path = os.path.join(parent, name)
            pid = owner_pid(path)
            if pid is None or os.path.islink(path) or not os.path.isdir(path):
                continue
            if os.stat(path).st_uid != os.getuid() or pid_alive(pid) or held_by_someone(path):
                continue
            stale.append(path)
    return stale


def sweep_stale(
    parents: Optional[Sequence[str]] = None, say: Optional[Callable[[str], None]] = print
) -> list[str]:
    """Remove ``stale_folders(parents)``; ``say`` gets one line naming them (none when there are none)."""
    stale = stale_folders(parents)
    if not stale:
        return []
    total = sum(folder_bytes(path) for path in stale)
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    if say is not None:
        say(
            f"shared memory: removed {len(stale)} folder(s) left by processes that are gone "
            f"({total / 1e9:.2f} GB): {', '.join(stale)}"
        )
    return stale


# ------------------------------------------------------------------------------------ once per node


def once_per_node(
    write: Callable[[], T], what: str = "write its folder", error: type[Exception] = SharedMemoryError
) -> tuple[T, bool]:
    """Run ``write`` (which writes a folder and returns its path) on the first process of each node only.

    Returns (result, owner): every process of a node gets what its node's first process wrote, and
    ``owner`` is True on that first process alone (the one that removes the folder). The hand-over is one
    ``gather_object``, a collective: every process calls this at the same point of the run, and none
    returns before its node's writer has finished (this is the barrier between the write and the reads).
    Ranks of a node are contiguous (torchrun's order), so the node's first process is
    ``process_index - local_process_index``. An error on the writer reaches every process of its node
    (as ``error`` saying "the first process of this node could not <what>"): nobody waits forever.
    One process: ``write()`` and owner True, no collective.
    """
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return write(), True
    from accelerate.utils import gather_object

    owner = state.local_process_index == 0
    result: Any = None
    failure: Optional[BaseException] = None
    if owner:
        try:
            result = write()
        except Exception as exc:  # handed to the node's other processes, then raised here too
            failure = exc
    message = None if failure is None else f"{type(failure).__name__}: {failure}"
    written = gather_object([(result, message)])  # every process takes part (a collective)
    if failure is not None:
        raise failure
    result, message = written[state.process_index - state.local_process_index]
    if message is not None:
        raise error(f"the first process of this node could not {what}: {message}")
    return result, owner


def is_node_writer() -> bool:
    """Whether this process is its node's first (the one ``once_per_node`` runs ``write`` on)."""
    from accelerate import PartialState

    return PartialState().local_process_index == 0


__all__ = [
    "FOLDER_NAME",
    "SHM",
    "SharedMemoryError",
    "default_parents",
    "folder_prefix",
    "free_bytes",
    "held_by_someone",
    "is_node_writer",
    "new_folder",
    "once_per_node",
    "owner_pid",
    "pid_alive",
    "remove_folder",
    "room_needed",
    "run_name",
    "stale_folders",
    "sweep_stale",
]
