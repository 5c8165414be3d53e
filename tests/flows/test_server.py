"""`flows.server`: the temporary Prefect server's child process is tied to its parent (Linux)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from flows.server import _die_with

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")


def test_a_child_whose_parent_already_died_exits_at_once() -> None:
    # A parent pid that is not ours stands for a parent that died between fork and prctl.
    child = subprocess.run([sys.executable, "-c", "import time; time.sleep(30)"],
                           preexec_fn=_die_with(os.getpid() + 10 ** 6), timeout=10)
    assert child.returncode == 1


def test_a_tied_grandchild_gets_sigkill_when_its_parent_is_killed() -> None:
    # parent (python) -> grandchild (sleep, tied); SIGKILL the parent, the grandchild follows.
    code = ("import os, subprocess, sys, time; from flows.server import _die_with\n"
            "p = subprocess.Popen(['sleep', '60'], preexec_fn=_die_with(os.getpid()))\n"
            "print(p.pid, flush=True); time.sleep(60)")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    grandchild = int(parent.stdout.readline())
    parent.kill()
    parent.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = open(f"/proc/{grandchild}/stat").read().rsplit(")", 1)[1].split()[0]
        except FileNotFoundError:
            break
        if state in ("Z", "X"):
            break
        time.sleep(0.05)
    else:
        os.kill(grandchild, 9)
        pytest.fail("the tied process outlived its killed parent")
