"""The shared-memory folders of the vLLM sampler (models/shm.py, models.vllm_sampler.AdapterChannel).

No vLLM and no model here: the adapter's writer is replaced by one that counts its writes. What is checked:
the folders' names, the free-space check and its one-line fall-back, the sweep of folders whose writer is gone
(and only those), and, with two real processes of one node (``accelerate launch``, gloo on CPU), one adapter
write per node per sync that every process of the node reads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from models import shm
from models.export import ExportError, export_folder
from models.vllm_sampler import AdapterChannel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


class TinyAdapter(torch.nn.Module):
    """Stands for a PEFT model: 2 x (4 x 3) LoRA parameters, nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = torch.nn.Parameter(torch.ones(4, 3))
        self.lora_B = torch.nn.Parameter(torch.ones(3, 4))


class CountingWriter:
    """An adapter writer that records each write and leaves one file in the folder."""

    def __init__(self) -> None:
        self.folders: list[str] = []

    def __call__(self, model, folder: str, dtype: torch.dtype) -> None:
        self.folders.append(folder)
        with open(os.path.join(folder, "adapter_model.safetensors"), "w") as fh:
            fh.write(str(dtype))


# ---------------------------------------------------------------------------- names and room


def test_folder_names_carry_the_run_and_the_writers_pid():
    assert shm.run_name("outputs/qwen2.5-3b-medical/") == "qwen2.5-3b-medical"
    assert shm.run_name("runs/my run") == "my_run"
    assert shm.run_name("") == "run"
    assert shm.folder_prefix("medical", "lora", 4242) == "grpo-medical-4242-lora-"
    # the run's name may hold '-' and digits: the pid is the number right before -base- / -lora-
    assert shm.owner_pid("/dev/shm/grpo-run-7-b-4242-base-x1_y2z3") == 4242
    assert shm.owner_pid("/dev/shm/grpo-vllm-base-x1y2z3") is None  # the old names (no pid): not ours
    assert shm.owner_pid("/dev/shm/other") is None
    with pytest.raises(ValueError, match="kind='adapter'"):
        shm.folder_prefix("run", "adapter")


def test_room_needed_is_the_size_plus_5_percent_plus_1_mib():
    # a rank-64 adapter of Qwen2.5-3B in bf16: 119.7 M parameters, 239.4 MB -> 251.37 MB + 1.05 MB
    assert shm.room_needed(239_400_000) == 251_370_000 + 1_048_576
    assert shm.room_needed(0) == 1_048_576


def test_a_new_folder_is_named_held_and_removed(tmp_path, capsys):
    folder = shm.new_folder("base", "med", 1000, [str(tmp_path)])
    assert os.path.dirname(folder) == str(tmp_path)
    assert os.path.basename(folder).startswith(f"grpo-med-{os.getpid()}-base-")
    assert shm.owner_pid(folder) == os.getpid()
    assert shm.held_by_someone(folder)  # this process holds its lock
    shm.remove_folder(folder)
    assert not os.path.exists(folder)
    assert capsys.readouterr().out == ""  # the first choice: nothing to say


def test_a_full_shared_memory_falls_back_to_the_temp_folder_with_one_line(tmp_path, monkeypatch, capsys):
    """/dev/shm reports 0.06 GB free (Docker's default 64 MB): the base goes to the temp folder, one line."""
    in_ram, on_disk = tmp_path / "shm", tmp_path / "tmp"
    in_ram.mkdir()
    on_disk.mkdir()
    free = {str(in_ram): 60_000_000, str(on_disk): 10**12}
    monkeypatch.setattr(shm, "free_bytes", lambda parent: free[parent])
    folder = export_folder(6_200_000_000, candidates=[str(in_ram), str(on_disk)], run="med")
    assert os.path.dirname(folder) == str(on_disk)
    assert capsys.readouterr().out.splitlines() == [
        f"shared memory: {in_ram} has 0.06 GB free, the exported base needs 6.51 GB: writing it to {on_disk} instead"
    ]  # 6.2 GB x 1.05 + 1 MiB = 6.511 GB
    shm.remove_folder(folder)
    with pytest.raises(
        ExportError, match=rf"no room for the sampler's exported base \(6.51 GB\): {in_ram} has 0.06 GB"
    ):
        export_folder(6_200_000_000, candidates=[str(in_ram)], run="med")


def test_the_adapter_falls_back_with_one_line_for_the_whole_run(tmp_path, monkeypatch, capsys):
    """Three syncs with a full /dev/shm: three writes to the temp folder, one line; the previous adapter's
    folder goes after each sync, the last one on close."""
    in_ram, on_disk = tmp_path / "shm", tmp_path / "tmp"
    in_ram.mkdir()
    on_disk.mkdir()
    room = {str(in_ram): 1000, str(on_disk): 10**12}
    monkeypatch.setattr(shm, "free_bytes", lambda parent: room[parent])
    writer = CountingWriter()
    channel = AdapterChannel("med", torch.bfloat16, parents=[str(in_ram), str(on_disk)], write=writer)
    folders = [channel.publish(TinyAdapter()) for _ in range(3)]
    assert writer.folders == folders and len(set(folders)) == 3
    assert all(os.path.dirname(f) == str(on_disk) for f in folders)
    assert os.listdir(on_disk) == [os.path.basename(folders[-1])]  # the earlier ones are gone
    # 24 parameters x 2 bytes (bf16) + 5% + 1 MiB = 1,048,626 bytes
    assert capsys.readouterr().out.splitlines() == [
        f"shared memory: {in_ram} has 0.00 GB free, the adapter needs 0.00 GB: writing it to {on_disk} instead"
    ]
    with open(os.path.join(folders[-1], "adapter_model.safetensors")) as fh:
        assert fh.read() == "torch.bfloat16"  # written in the engine's dtype
    channel.close()
    assert os.listdir(on_disk) == []


# ---------------------------------------------------------------------------- the sweep


def test_folders_of_dead_writers_are_swept_the_others_kept(tmp_path, capsys):
    dead = dead_pid()
    parent = tmp_path / "shm"
    parent.mkdir()
    stale_base = parent / f"grpo-med-{dead}-base-abc123"
    stale_lora = parent / f"grpo-other-run-{dead}-lora-def456"
    live = parent / f"grpo-med-{os.getpid()}-lora-ghi789"  # this process: alive
    held = parent / f"grpo-med-{dead}-base-held01"  # pid gone, but its lock is held (another pid namespace)
    unrelated = parent / "grpo-vllm-base-old"  # not one of our names
    for folder in (stale_base, stale_lora, live, held, unrelated):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x" * 1000)
    holder = os.open(held, os.O_RDONLY | os.O_DIRECTORY)
    import fcntl

    fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        swept = shm.sweep_stale([str(parent), str(tmp_path / "missing")])
    finally:
        os.close(holder)
    assert swept == [str(stale_base), str(stale_lora)]
    assert sorted(os.listdir(parent)) == sorted(p.name for p in (live, held, unrelated))
    assert capsys.readouterr().out.splitlines() == [
        f"shared memory: removed 2 folder(s) left by processes that are gone (0.00 GB): {stale_base}, {stale_lora}"
    ]
    assert shm.sweep_stale([str(parent)]) == [str(held)]  # once its lock is released, it is stale too
    assert shm.sweep_stale([str(parent)]) == []
    assert capsys.readouterr().out.count("\n") == 1  # nothing to say the second time


# ---------------------------------------------------------------------------- two processes, one node

# Run by each process of `accelerate launch`: three syncs of an AdapterChannel whose writer appends a line to
# <tmp>/writes (O_APPEND: one line per write, whoever writes). Each process writes what it got to
# <tmp>/result-<rank>.
CHANNEL_SCRIPT = """
import json, os, sys
sys.path.insert(0, sys.argv[1])
import torch
from accelerate import Accelerator
from models.vllm_sampler import AdapterChannel

state = Accelerator().state  # as grpo.trainer.setup makes one before make_sampler (gloo on CPU)
tmp = sys.argv[2]

def write(model, folder, dtype):
    with open(os.path.join(tmp, "writes"), "a") as fh:
        fh.write(f"{state.process_index} {folder}\\n")
    with open(os.path.join(folder, "adapter_model.safetensors"), "w") as fh:
        fh.write(str(dtype))

model = torch.nn.Linear(2, 2)
model.lora_A = torch.nn.Parameter(torch.ones(4, 3))
channel = AdapterChannel("two", torch.bfloat16, parents=[os.path.join(tmp, "shm")], write=write)
got = []
for sync in range(3):
    folder = channel.publish(model)
    with open(os.path.join(folder, "adapter_model.safetensors")) as fh:  # every process can read it now
        got.append({"folder": folder, "owner": channel.owner, "content": fh.read()})
    state.wait_for_everyone()  # this test's own check: all have read before the next sync
channel.close()
with open(os.path.join(tmp, f"result-{state.process_index}"), "w") as fh:
    json.dump(got, fh)
state.wait_for_everyone()  # leave together (a gloo peer exiting first can abort the other)
state.destroy_process_group()
"""


@pytest.mark.slow
def test_two_processes_of_a_node_write_one_adapter_per_sync(tmp_path):
    script = tmp_path / "channel.py"
    script.write_text(CHANNEL_SCRIPT)
    (tmp_path / "shm").mkdir()
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
        str(script), ROOT, str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    writes = (tmp_path / "writes").read_text().splitlines()
    results = [json.loads((tmp_path / f"result-{rank}").read_text()) for rank in (0, 1)]
    # 3 syncs x 1 node = 3 writes (not 6), all by the node's first process
    assert [line.split()[0] for line in writes] == ["0", "0", "0"]
    written = [line.split()[1] for line in writes]
    assert len(set(written)) == 3
    for sync in range(3):
        first, second = results[0][sync], results[1][sync]
        assert first["folder"] == second["folder"] == written[sync]  # both read the one copy
        assert (first["owner"], second["owner"]) == (True, False)
        assert first["content"] == second["content"] == "torch.bfloat16"
        assert os.path.basename(written[sync]).startswith("grpo-two-")
        assert shm.owner_pid(written[sync]) not in (None, os.getpid())  # the first process's pid
    assert os.listdir(tmp_path / "shm") == []  # the writer removed each one
