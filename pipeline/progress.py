"""Progress reporting without a UI dependency in the library.

Long loops call `progress_task(...)`; a front end (the CLI's rich display) installs a reporter with
`set_reporter`. With no reporter installed, nothing is shown (tests, notebooks, Prefect workers).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Protocol


class ProgressReporter(Protocol):
    def start(self, key: str, description: str, total: int, unit: str) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def finish(self, key: str) -> None: ...


_reporter: ProgressReporter | None = None
_lock = threading.Lock()
_counter = 0


def set_reporter(reporter: ProgressReporter | None) -> None:
    """Install (or remove, with None) the process-wide reporter; shard tasks may run in threads."""
    global _reporter
    _reporter = reporter


class _Task:
    def __init__(self, key: str) -> None:
        self.key = key

    def advance(self, amount: int = 1) -> None:
        if _reporter is not None:
            _reporter.advance(self.key, amount)


@contextmanager
def progress_task(description: str, total: int, unit: str = "samples") -> Iterator[_Task]:
    global _counter
    with _lock:
        _counter += 1
        key = f"task-{_counter}"
    if _reporter is not None:
        _reporter.start(key, description, total, unit)
    try:
        yield _Task(key)
    finally:
        if _reporter is not None:
            _reporter.finish(key)
