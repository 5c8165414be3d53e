"""The command line's one signal policy: Ctrl-C (SIGINT) and SIGTERM end any command the same way.

`installed` makes both raise `Interrupted` in the main thread (inside a flow run Prefect's own SIGTERM handler
raises its `TerminationSignal` instead, after marking the run; both carry the signal as `.signal`). Neither
is a `KeyboardInterrupt`, which typer would turn into a bare exit 130. `main` prints one line and exits
128 + the signal number, as a shell reports a command a signal ended: 130 for SIGINT, 143 for SIGTERM.
Nothing half-written is marked complete: files are written under temporary names and renamed, a cache's
manifest says `complete` only after its last shard, a run's summary is written last, so rerunning the same
command resumes (docs/operations.md#interrupts).
"""

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

INTERRUPTED = "interrupted; rerun the same command to resume"


class Interrupted(BaseException):
    """A signal that ends the command, raised where the main thread is (a BaseException: no `except
    Exception` in a library swallows it)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signal = signum


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextmanager
def installed() -> Iterator[None]:
    """SIGINT and SIGTERM raise `Interrupted` meanwhile (Python's SIGTERM default ends the process without a
    word); the handlers before are restored after (`main` also runs inside test processes)."""
    before = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)


def exit_code(error: BaseException) -> int | None:
    """128 + the signal that `error` stands for, or None when it is no interrupt."""
    if isinstance(error, KeyboardInterrupt):  # a Ctrl-C outside `installed`
        return 128 + signal.SIGINT
    signum = getattr(error, "signal", None)  # Interrupted, Prefect's TerminationSignal
    return 128 + signum if signum in (signal.SIGINT, signal.SIGTERM) else None
