"""Progress off a terminal: plain periodic lines with the rate and the time left."""

from __future__ import annotations

from pipeline import progress
from pipeline.progress import LineReporter, progress_task


def test_lines_are_written_every_interval_and_at_the_end() -> None:
    now = [0.0]
    lines: list[str] = []
    progress.set_reporter(LineReporter(lines.append, interval=10, clock=lambda: now[0]))
    try:
        with progress_task("teacher pass", total=5000) as task:
            for _ in range(10):
                now[0] += 1
                task.advance(120)  # 120 samples/s: one line at 10 s, none before
            now[0] += 5
            task.advance(600)
    finally:
        progress.set_reporter(None)
    assert lines == ["teacher pass: 1,200/5,000 samples (24 %), 120 samples/s, ETA 32 s",
                     "teacher pass: 1,800 samples in 15.0 s, 120 samples/s"]
