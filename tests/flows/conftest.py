"""Fixtures for the command-line and flow tests."""

from __future__ import annotations

import sys
from collections.abc import Callable

import pytest


@pytest.fixture
def cli(monkeypatch, capsys) -> Callable[..., tuple[int, str]]:
    """Run `distillery ARGS...` in this process (so it talks to the session's Prefect test server);
    returns the exit code and stdout + stderr (errors go to stderr, results to stdout)."""
    from flows.cli import main

    def run(*args: str) -> tuple[int, str]:
        monkeypatch.setattr(sys, "argv", ["distillery", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = int(e.code or 0)
        captured = capsys.readouterr()
        return code, captured.out + captured.err

    return run
