"""Progress reporting without a UI dependency in the library.

Long loops call `progress_task(...)`; a front end installs a reporter with `set_reporter`: the CLI's rich
display on a terminal, `LineReporter` when its output goes to a file or a CI log (where a redrawn bar shows
nothing until the end). With no reporter installed, nothing is shown (tests, notebooks, Prefect workers).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Protocol


class ProgressReporter(Protocol):
    def start(self, key: str, description: str, total: int, unit: str) -> None: ...
    def advance(self, key: str, amount: int) -> None: ...
    def finish(self, key: str) -> None: ...


@dataclass
class _Line:
    description: str
    total: int
    unit: str
    started: float
    done: int = 0
    shown: float = field(default=0.0)


class LineReporter:
    """Plain progress lines, one per task every ``interval`` seconds and one when it ends:
    ``teacher pass: 1,200/5,000 samples (24 %), 530 samples/s, ETA 7 s``."""

    def __init__(self, write: Callable[[str], None], interval: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.write, self.interval, self.clock = write, interval, clock
        self.tasks: dict[str, _Line] = {}
        self.lock = threading.Lock()

    def start(self, key: str, description: str, total: int, unit: str) -> None:
        now = self.clock()
        with self.lock:
            self.tasks[key] = _Line(description, total, unit, started=now, shown=now)

    def advance(self, key: str, amount: int) -> None:
        now = self.clock()
        with self.lock:
            line = self.tasks[key]
            line.done += amount
            if now - line.shown < self.interval:
                return
            line.shown = now
        self.write(self._text(line, now))

    def finish(self, key: str) -> None:
        now = self.clock()
        with self.lock:
            line = self.tasks.pop(key)
        elapsed = now - line.started
        rate = f", {line.done / elapsed:,.0f} {line.unit}/s" if elapsed > 0 else ""
        self.write(f"{line.description}: {line.done:,} {line.unit} in {elapsed:.1f} s{rate}")

    @staticmethod
    def _text(line: _Line, now: float) -> str:
        elapsed = now - line.started
        rate = line.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * line.done / line.total:.0f} %)" if line.total else ""
        eta = f", ETA {(line.total - line.done) / rate:,.0f} s" if rate > 0 and line.total >= line.done else ""
        return (f"{line.description}: {line.done:,}/{line.total:,} {line.unit}{share}, {rate:,.0f} {line.unit}/s"
                f"{eta}")


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
