"""Stopping long work at a consistent point when asked (Ctrl-C, SIGTERM): one policy for the library and the flows.

A signal handler (`flows/signals.py`: the command line's, and a flow's while it runs) calls `request_stop`.
Work that can stop cleanly says so with `polled()` and calls `raise_if_stopped()` between its steps (the
training loop before each optimiser step, a sweep before each student): it raises `Stopped` there, where
everything on disk is consistent (a run's last checkpoint is a whole epoch; its summary is not written), so
the same command resumes (docs/operations.md#interrupts). Outside `polled()` nothing checks the request, and
the handler raises `Stopped` at once wherever the main thread is. A `time_limit` (a sweep's ``task_timeout`` in
a run outside Prefect) ends the same work at the same points, raising `TimedOut`.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.errors import DistilleryError

_lock = threading.Lock()
_requested: int | None = None  # the first signal asked to stop, until `reset`
_polling = 0  # how many `polled()` scopes are open (a flow runs its work in a worker thread)
_limit: tuple[float, str] | None = None  # the open `time_limit`: (its monotonic deadline, the line to raise)


class TimedOut(DistilleryError):
    """Work that ran past its `time_limit`, ended where it checks for a stop (everything on disk consistent)."""


class Stopped(BaseException):
    """Work ended by a signal (a BaseException: no `except Exception` in a library swallows it); `.signal`
    is the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def request_stop(signum: int) -> bool:
    """Record that `signum` asked to stop; True when polled work will stop at its next step, False when
    nothing polls (then the caller raises `Stopped` itself) or when the request was already made (a second
    Ctrl-C does not wait)."""
    global _requested
    with _lock:
        first = _requested is None
        _requested = _requested or signum
        return first and _polling > 0


def stop_requested() -> int | None:
    """The signal that asked to stop, None when none has."""
    return _requested


def raise_if_stopped() -> None:
    """Raise `Stopped` when a stop was requested, `TimedOut` past the open `time_limit`: call it where stopping
    leaves everything consistent."""
    if _requested is not None:
        raise Stopped(_requested)
    if _limit is not None and time.monotonic() > _limit[0]:
        raise TimedOut(_limit[1])


@contextmanager
def time_limit(seconds: float | None, what: str, then: str) -> Iterator[None]:
    """Meanwhile `raise_if_stopped` raises `TimedOut` once `seconds` have passed (no limit when None): one line
    naming `what`, the limit, and what to do `then`. What a Prefect task's ``timeout_seconds`` does to a flow's
    task, for work run without Prefect."""
    global _limit
    if seconds is None:
        yield
        return
    _limit = (time.monotonic() + seconds,
              f"{what} ran past its task_timeout of {seconds:g} s and stopped before its next step; {then}")
    try:
        yield
    finally:
        _limit = None


def reset() -> None:
    """Forget a request (a process that runs commands one after another, like the tests)."""
    global _requested
    _requested = None


@contextmanager
def polled() -> Iterator[None]:
    """Meanwhile a signal sets the request instead of raising: the work inside checks it between steps."""
    global _polling
    with _lock:
        _polling += 1
    try:
        yield
    finally:
        with _lock:
            _polling -= 1
