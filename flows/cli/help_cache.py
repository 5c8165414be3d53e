"""`distillery COMMAND --help` without importing torch: the help screen as last rendered from the same code.

A command's options read their defaults and help from the library's configs (`default_of`, `Declared`), and
those import torch, timm and faiss (3-5 s on 2 cores). The screen depends only on the code and on where it is
printed, so the first `COMMAND --help` renders it as usual and keeps the text under a key of everything it
depends on: every source file of `pipeline/` and `flows/` (each byte), the versions of typer, click and rich,
the terminal's width and whether it is one, and the environment variables rich reads. Any change to any of
them is another key: a kept screen is never stale, only unused. Later calls print the kept text (0.2 s). The
screens live under ``$XDG_CACHE_HOME/distillery/help`` (default ``~/.cache``); where that cannot be written,
help is rendered every time, as before.
"""

import hashlib
import io
import os
import shutil
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.metadata import version
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[2]  # the checkout or installed tree holding pipeline/ and flows/
RICH_ENVIRONMENT = ("COLUMNS", "LINES", "NO_COLOR", "FORCE_COLOR", "TERM", "COLORTERM", "TTY_COMPATIBLE",
                    "TTY_INTERACTIVE", "JUPYTER_COLUMNS")
KEPT_BYTES_MAX = 256 * 1024  # a help screen is a few KB; a larger file there is not one of ours


def help_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "distillery" / "help"


def screen_key(command: str, out: TextIO) -> str:
    """Everything `command`'s help screen printed to `out` depends on, hashed."""
    digest = hashlib.sha256()
    for package in ("pipeline", "flows"):
        for path in sorted((ROOT / package).rglob("*.py")):
            digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    tty = out.isatty()
    digest.update(repr((command, sys.argv[0], sys.version, [version(p) for p in ("typer", "click", "rich")], tty,
                        shutil.get_terminal_size() if tty else None,
                        [os.environ.get(name) for name in RICH_ENVIRONMENT])).encode())
    return digest.hexdigest()


def help_request(argv: list[str]) -> str | None:
    """The command of `distillery COMMAND --help` (nothing else on the line), else None."""
    return argv[0] if len(argv) == 2 and argv[1] == "--help" and not argv[0].startswith("-") else None


def print_kept(command: str) -> bool:
    """Print `command`'s kept help screen, if one was kept for this code and terminal; True when printed."""
    try:
        path = help_dir() / f"{screen_key(command, sys.stdout)}.txt"
        if path.stat().st_size > KEPT_BYTES_MAX:
            return False
        sys.stdout.write(path.read_text())
    except (OSError, UnicodeDecodeError):
        return False
    sys.stdout.flush()
    return True


class Tee(io.TextIOBase):
    """`out` that also keeps what is written (rich asks the terminal's width and colours of `out` itself)."""

    def __init__(self, out: TextIO) -> None:
        self.out, self.kept = out, io.StringIO()

    def write(self, text: str) -> int:
        self.kept.write(text)
        return self.out.write(text)

    def flush(self) -> None:
        self.out.flush()

    def isatty(self) -> bool:
        return self.out.isatty()

    def fileno(self) -> int:
        return self.out.fileno()


@contextmanager
def keeping(command: str | None) -> Iterator[None]:
    """Meanwhile, keep what is printed as `command`'s help screen (`keep`) if the block ends without an error;
    nothing when `command` is None."""
    if command is None:
        yield
        return
    tee = Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = tee.out
    keep(command, tee.kept.getvalue())


def keep(command: str, text: str) -> None:
    """Keep `text` as `command`'s help screen for this code and terminal (atomically; nothing when unwritable)."""
    from pipeline.atomic import atomic_write_text

    if not text or len(text.encode()) > KEPT_BYTES_MAX:
        return
    try:
        directory = help_dir()
        directory.mkdir(parents=True, exist_ok=True)
        atomic_write_text(directory / f"{screen_key(command, sys.stdout)}.txt", text)
    except OSError:
        pass
