"""Fault injection (issue 13): every test here tries one fault or bad input against a real cache, run
directory or command, and asserts that it is refused or detected with one line naming the culprit, or
recovered to the same bytes as an uninterrupted run. The tally printed at the end counts the faults tried
and how many the product handled.
"""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    outcomes: dict[str, str] = {}
    for key in ("passed", "failed", "error"):
        for report in terminalreporter.stats.get(key, []):
            if "tests/faults/" in getattr(report, "nodeid", "").replace("\\", "/"):
                if outcomes.get(report.nodeid) in (None, "passed"):
                    outcomes[report.nodeid] = key
    if outcomes:
        handled = sum(v == "passed" for v in outcomes.values())
        terminalreporter.write_line(
            f"fault injection: {len(outcomes)} faults tried, {handled} handled, {len(outcomes) - handled} not handled")
