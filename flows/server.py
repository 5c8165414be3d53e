"""Prefect's temporary API server, tied to the process that starts it.

Without ``PREFECT_API_URL``, Prefect 3 starts a temporary server for the first flow run
(``prefect.server.api.server.SubprocessASGIServer``: ``python -m uvicorn ...`` in a child process) and
stops it from an ``atexit`` hook, which never runs when the CLI is killed (SIGKILL, the OOM killer): the
server would outlive it. Here the CLI starts that same server itself, from its main thread, with Linux's
parent-death signal set in the child (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), so the kernel kills the
server the moment the CLI dies, however it dies. Prefect's client then finds the server running (it is
a per-process singleton) and uses it.
"""

import ctypes
import os
import signal
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def default_prefect_home() -> None:
    """One Prefect home however the CLI is started (`distillery`, `python -m flows.cli`, `make demo`): unless
    ``PREFECT_HOME`` is set, ``<venv>/prefect-home`` of the virtual environment running it (README, "Prefect in
    production"). Call it before Prefect is imported: Prefect reads the variable once. Outside a virtual
    environment Prefect keeps its own default, ``~/.prefect``.
    """
    if "PREFECT_HOME" not in os.environ and sys.prefix != sys.base_prefix:
        os.environ["PREFECT_HOME"] = str(Path(sys.prefix) / "prefect-home")


def _die_with(parent: int) -> Callable[[], None]:
    """A ``preexec_fn``: the child gets SIGKILL when ``parent`` exits, or exits at once if it already has.

    The child also leaves the terminal's process group: a Ctrl-C reaches every process of that group, and a
    server it killed could not record the interrupted flow run, whose client would retry for minutes."""

    def tie() -> None:
        os.setpgid(0, 0)
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody would signal us
            os._exit(1)

    return tie


class _TiedSubprocess(types.ModuleType):
    """``subprocess`` as Prefect's server module sees it while we start the server: Popen ties the child."""

    def __init__(self, parent: int) -> None:
        super().__init__("subprocess")
        self._tie = _die_with(parent)

    def Popen(self, *args: Any, **kwargs: Any) -> subprocess.Popen:  # noqa: N802 - the name Prefect calls
        return subprocess.Popen(*args, preexec_fn=self._tie, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)


def recorded() -> bool:
    """Whether runs are recorded: ``PREFECT_API_URL`` (environment or Prefect profile) names a server. Without
    one the commands run the library directly: Prefect 3 has no flow run without an API, and its temporary
    server costs 20-35 s per command on a busy machine (docs/operations.md#local-runs)."""
    from prefect.settings import PREFECT_API_URL

    return bool(PREFECT_API_URL.value())


def start_temporary_server() -> None:
    """Start Prefect's temporary server now, tied to this process; a no-op when ``PREFECT_API_URL`` names a
    server, when the temporary server is disabled, or off Linux (there Prefect starts it untied, as before).

    Call it from the main thread: the parent-death signal follows the thread that forked the child.
    """
    from prefect.server.api import server as prefect_server
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value() or not sys.platform.startswith("linux"):
        return
    temporary = prefect_server.SubprocessASGIServer()  # the instance Prefect's client will use
    if temporary.running:
        return
    # Prefect builds the uvicorn command itself; only its module's view of subprocess changes, only meanwhile.
    prefect_server.subprocess = _TiedSubprocess(os.getpid())
    try:
        temporary.start()
    finally:
        prefect_server.subprocess = subprocess
