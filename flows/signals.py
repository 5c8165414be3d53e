"""The command line's one signal policy: Ctrl-C (SIGINT) and SIGTERM end any command the same way.

`installed` (the command line) and `polled` (a flow's body, where Prefect's own SIGTERM handler would mark the
run Crashed) make both signals a stop request (`pipeline.stop`). Work that stops at a consistent point (a
training run before its next step, a sweep before its next student) checks the request and ends there, its
flow run Cancelled; anywhere else the handler raises `Stopped` at once. A second signal never waits. Neither is
a `KeyboardInterrupt`, which typer would turn into a bare exit 130. `main` prints one line and exits 128 + the
signal number, as a shell reports a command a signal ended: 130 for SIGINT, 143 for SIGTERM.
Nothing half-written is marked complete: files are written under temporary names and renamed, a cache's
manifest says `complete` only after its last shard, a run's checkpoint holds whole epochs and its summary is
written last, so rerunning the same command (`train` with --resume) resumes (docs/operations.md#interrupts).
"""

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

from pipeline import stop
from pipeline.stop import Stopped

RESUME = {"train": "rerun the same command with --resume to continue from the last whole epoch"}


def interrupted_line(command: str) -> str:
    """The one line of `command` ended by a signal."""
    return f"interrupted; {RESUME.get(command, 'rerun the same command to resume')}"


def on_signal(signum: int, frame: FrameType | None) -> None:
    if not stop.request_stop(signum):
        raise Stopped(signum)


@contextmanager
def handling() -> Iterator[None]:
    """SIGINT and SIGTERM handled by `on_signal` meanwhile, in the main thread (elsewhere Python cannot set a
    handler); the handlers before are restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


@contextmanager
def installed() -> Iterator[None]:
    """The command line's handlers (Python's SIGTERM default ends the process without a word); a request
    left by an earlier command is forgotten first (`main` also runs inside test processes)."""
    stop.reset()
    with handling():
        yield


@contextmanager
def polled() -> Iterator[None]:
    """Inside a flow's body: its work stops at its next consistent point when a signal arrives."""
    with stop.polled(), handling():
        yield


def exit_code(error: BaseException) -> int | None:
    """128 + the signal that `error` stands for (or that asked to stop before it), None when it is no
    interrupt."""
    if isinstance(error, KeyboardInterrupt):  # a Ctrl-C outside `installed`
        return 128 + signal.SIGINT
    signum = getattr(error, "signal", None) or stop.stop_requested()  # Stopped, Prefect's TerminationSignal
    return 128 + signum if signum in (signal.SIGINT, signal.SIGTERM) else None
