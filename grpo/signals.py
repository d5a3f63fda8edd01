"""Stopping cleanly: Ctrl-C or SIGTERM (a scheduler's preemption) end the run between two rollouts, after a
checkpoint and the plot, on every process at the same step."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator
from typing import Any

import torch


@contextlib.contextmanager
def stop_requests() -> Iterator[list[str]]:
    """Catch Ctrl-C and SIGTERM: the list gets the signal's name and the run stops after the current rollout
    (a second Ctrl-C stops at once). Outside the main thread (tests) nothing is installed."""
    requested: list[str] = []

    def request(signum, frame) -> None:
        requested.append(signal.Signals(signum).name)
        signal.signal(signal.SIGINT, signal.default_int_handler)

    try:
        previous = {s: signal.signal(s, request) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread
        previous = {}
    try:
        yield requested
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def agreed_stop(accelerator: Any, requested: list[str]) -> str | None:
    """The signal that asked to stop, if any process got one: every process stops after the same rollout."""
    flag = torch.tensor([1.0 if requested else 0.0], device=accelerator.device)
    if accelerator.num_processes > 1:
        flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() == 0:
        return None
    return requested[0] if requested else "a signal to another process"
