"""How ``combine_rewards`` runs the reward functions: concurrently where a function allows it, each within
a time limit, the results in the functions' order whatever order they finish in.

Three kinds of function (``call_kind``):

- ``async def`` functions (or objects with an ``async def __call__``, as rewards/judge.py's): awaited
  together (``asyncio.gather``) on one event loop that lives in a background thread for the whole process,
  as TRL 1.16 does. One loop for every call, so a client bound to it (httpx, aiohttp) stays usable.
- plain functions that declare ``fn.thread_safe = True``: run in a pool of ``num_workers`` threads, at
  the same time as each other (a function that waits on a sandbox, a database or the network).
- every other plain function: one after another in the calling thread (or, with a time limit, in a thread
  of its own that the caller stops waiting for), while the two kinds above run in the background.

A time limit (``timeout`` seconds, per function call) cannot stop a Python thread: a plain function that
overruns is abandoned (its thread is a daemon, so it does not keep the process alive) and reported; an
async one is cancelled. Either way the caller gets an ``Outcome`` and decides what to raise.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import inspect
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

ASYNC, THREAD_SAFE, PLAIN = "async", "thread_safe", "plain"
# an async function that blocks the event loop (time.sleep instead of await asyncio.sleep) cannot be
# cancelled at its deadline: the caller waits this much longer before reporting it
LOOP_GRACE_SECONDS = 5.0


@dataclass
class Call:
    """One reward function call: ``func(*args, **kwargs)``; ``kind`` is ASYNC, THREAD_SAFE or PLAIN."""

    func: Callable[..., Any]
    args: tuple
    kwargs: dict
    kind: str


@dataclass
class Outcome:
    """What a call gave: its return value, or the exception it raised, or that it overran the limit."""

    value: Any = None
    error: Optional[BaseException] = None
    timed_out: bool = False


def unwrap(func: Callable[..., Any]) -> Callable[..., Any]:
    """The function under any ``functools.partial`` layers."""
    while isinstance(func, functools.partial):
        func = func.func
    return func


def call_kind(func: Callable[..., Any]) -> str:
    """ASYNC for a coroutine function or an object whose ``__call__`` is one (TRL's ``is_async_callable``),
    THREAD_SAFE for a plain function with a true ``thread_safe`` attribute (on the partial or the function
    it wraps), else PLAIN.

    >>> async def judge(completions, **kw): ...
    >>> def sandbox(completions, **kw): ...
    >>> sandbox.thread_safe = True
    >>> call_kind(judge), call_kind(sandbox), call_kind(len)
    ('async', 'thread_safe', 'plain')
    """
    inner = unwrap(func)
    if inspect.iscoroutinefunction(inner) or inspect.iscoroutinefunction(type(inner).__call__):
        return ASYNC
    if getattr(func, "thread_safe", False) is True or getattr(inner, "thread_safe", False) is True:
        return THREAD_SAFE
    return PLAIN


# ---------------------------------------------------------------------------- plain functions in threads


@dataclass
class _Task:
    """A plain call that a thread runs; ``started`` and ``done`` let the caller time it from its start."""

    call: Call
    started: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    start_time: float = 0.0
    outcome: Outcome = field(default_factory=Outcome)

    def run(self) -> None:
        self.start_time = time.monotonic()
        self.started.set()
        try:
            self.outcome = Outcome(value=self.call.func(*self.call.args, **self.call.kwargs))
        except Exception as err:  # handed to the caller, who names the function
            self.outcome = Outcome(error=err)
        self.done.set()

    def wait(self, timeout: Optional[float]) -> Outcome:
        """The outcome, or a timed-out one once ``timeout`` seconds have passed since the call started."""
        self.started.wait()
        if timeout is None:
            self.done.wait()
        else:
            self.done.wait(max(0.0, timeout - (time.monotonic() - self.start_time)))
        return self.outcome if self.done.is_set() else Outcome(timed_out=True)


def _start_threads(tasks: Sequence[_Task], workers: int) -> None:
    """Run ``tasks`` on ``workers`` daemon threads, started in order (first in, first out).

    In order matters for the time limits: when the caller waits for task k, every earlier task has ended,
    so a thread is free for k at once. Daemon threads, not a ThreadPoolExecutor: the interpreter joins an
    executor's threads at exit, and one stuck reward function would then keep a stopped run from exiting.
    """
    pending: queue.SimpleQueue[_Task] = queue.SimpleQueue()
    for task in tasks:
        pending.put(task)

    def work() -> None:
        while True:
            try:
                task = pending.get_nowait()
            except queue.Empty:
                return
            task.run()

    for _ in range(min(workers, len(tasks))):
        threading.Thread(target=work, daemon=True, name="reward-function").start()


# ---------------------------------------------------------------------------- async functions on one loop

_loop: Optional[asyncio.AbstractEventLoop] = None
_loop_lock = threading.Lock()


def event_loop() -> asyncio.AbstractEventLoop:
    """The process's event loop for async reward functions, running in a daemon thread (started once)."""
    global _loop
    with _loop_lock:
        if _loop is None or _loop.is_closed():
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="reward-event-loop").start()
        return _loop


async def _await_call(call: Call, timeout: Optional[float], slots: list, index: int) -> None:
    """Await one async call, cancelled at ``timeout``, and put its outcome in ``slots[index]``. Its own
    exceptions (a TimeoutError of its own included) are its outcome, told apart from our limit by
    ``asyncio.wait``."""
    try:
        task = asyncio.ensure_future(call.func(*call.args, **call.kwargs))
    except Exception as err:  # the call itself failed before giving a coroutine
        slots[index] = Outcome(error=err)
        return
    done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        slots[index] = Outcome(timed_out=True)
    elif task.exception() is not None:
        slots[index] = Outcome(error=task.exception())
    else:
        slots[index] = Outcome(value=task.result())


async def _await_all(calls: Sequence[Call], timeout: Optional[float], slots: list) -> None:
    await asyncio.gather(*(_await_call(c, timeout, slots, i) for i, c in enumerate(calls)))


# ---------------------------------------------------------------------------- all of them


def run_calls(calls: Sequence[Call], num_workers: int, timeout: Optional[float]) -> list[Optional[Outcome]]:
    """The outcome of every call, in the order of ``calls``, as if each had run alone one after another.

    Async calls start first (on ``event_loop()``), thread-safe ones next (on ``num_workers`` threads; 0 = in
    turn with the plain ones), then the plain ones run in this thread. ``timeout`` (seconds, None = none)
    limits each call from its own start. Outcomes are read in the calls' order up to the first error or
    overrun; the outcomes after it are None (not waited for, and a plain call after a failed one does not
    start). So the failure reported is the first in the functions' order, whichever failed first in time.
    """
    outcomes: list[Optional[Outcome]] = [None] * len(calls)
    async_index = [i for i, c in enumerate(calls) if c.kind == ASYNC]
    pooled_index = [i for i, c in enumerate(calls) if c.kind == THREAD_SAFE and num_workers > 0]
    in_turn = [i for i in range(len(calls)) if i not in async_index and i not in pooled_index]

    slots: list[Optional[Outcome]] = [None] * len(async_index)
    gathered: Optional[concurrent.futures.Future] = None
    if async_index:
        coroutine = _await_all([calls[i] for i in async_index], timeout, slots)
        gathered = asyncio.run_coroutine_threadsafe(coroutine, event_loop())
    pooled = {i: _Task(calls[i]) for i in pooled_index}
    _start_threads(list(pooled.values()), num_workers)
    try:
        last = len(calls) - 1  # the last call whose outcome is read
        for i in in_turn:
            task = _Task(calls[i])
            if timeout is None:
                task.run()  # here, in this thread: nothing to time, and a traceback as plain as it gets
            else:
                _start_threads([task], 1)
            outcomes[i] = task.wait(timeout)
            if _failed(outcomes[i]):
                last = i
                break
        if gathered is not None:
            _wait_for_loop(gathered, timeout)
            for i, slot in zip(async_index, slots, strict=True):
                outcomes[i] = slot if slot is not None else Outcome(timed_out=True)  # None: the loop is stuck
        for i in range(last + 1):
            if i in pooled:
                outcomes[i] = pooled[i].wait(timeout)
            if _failed(outcomes[i]):
                return outcomes[: i + 1] + [None] * (len(calls) - i - 1)
        return outcomes
    finally:
        if gathered is not None and not gathered.done():
            gathered.cancel()  # a failure elsewhere, or a stuck loop: stop what is still in flight


def _failed(outcome: Optional[Outcome]) -> bool:
    return outcome is not None and (outcome.error is not None or outcome.timed_out)


def _wait_for_loop(gathered: concurrent.futures.Future, timeout: Optional[float]) -> None:
    """Wait for the async calls. Each is cancelled at its deadline, so this ends by then, unless one blocks
    the loop itself (it calls time.sleep, not await asyncio.sleep): then stop waiting a little later."""
    try:
        gathered.result(timeout=None if timeout is None else timeout + LOOP_GRACE_SECONDS)
    except concurrent.futures.TimeoutError:
        pass
