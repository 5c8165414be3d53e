"""Stopping long work at a consistent point when asked (Ctrl-C, SIGTERM): one policy for the library and the flows.

A signal handler (`flows/signals.py`: the command line's, and a flow's while it runs) calls `request_stop`.
Work that can stop cleanly says so with `polled()` and calls `raise_if_stopped()` between its steps (the
training loop before each optimiser step, a sweep before each student): it raises `Stopped` there, where
everything on disk is consistent (a run's last checkpoint is a whole epoch; its summary is not written), so
the same command resumes (docs/operations.md#interrupts). Outside `polled()` nothing checks the request, and
the handler raises `Stopped` at once wherever the main thread is.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

_lock = threading.Lock()
_requested: int | None = None  # the first signal asked to stop, until `reset`
_polling = 0  # how many `polled()` scopes are open (a flow runs its work in a worker thread)


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
    """Raise `Stopped` when a stop was requested: call it where stopping leaves everything consistent."""
    if _requested is not None:
        raise Stopped(_requested)


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
