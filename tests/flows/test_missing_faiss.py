"""An install without either faiss extra: every command that needs faiss says so in one line, exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# `None` in sys.modules makes `import faiss` fail as an absent module does (ModuleNotFoundError, name "faiss").
WITHOUT_FAISS = ("import sys; sys.modules['faiss'] = None; sys.argv = ['distillery', 'inspect', 'no-such-cache']; "
                 "from flows.cli import main; main()")


def test_a_missing_faiss_is_one_line_naming_the_extras() -> None:
    done = subprocess.run([sys.executable, "-c", WITHOUT_FAISS], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: faiss is not installed: install distillery with one of its faiss extras, pip install -c "
        "constraints.txt '.[cpu]' (or '.[gpu]' on a CUDA machine)"]
