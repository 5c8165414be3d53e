"""Headless Chromium driven over the DevTools protocol: load a page at a given width, run JavaScript in it
and screenshot parts of it, with one browser start (the report's screenshot test, tests/report/test_html.py, and
`docs/report.png`). Test equipment, not library: nothing under pipeline/ imports it.

Chromium speaks the protocol over a pipe when started with ``--remote-debugging-pipe``: it reads commands
on file descriptor 3 and writes answers and events on descriptor 4, one JSON message per NUL-terminated
record (the transport Puppeteer uses), so no websocket client or open port is needed.

    python tests/report/chromium.py PAGE.html OUT.png [--width 1280] [--height 900] [--anchor cka]
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.atomic import atomic_write_bytes
from pipeline.errors import DistilleryError

COMMAND_FD, ANSWER_FD = 3, 4


class ChromiumError(DistilleryError):
    """Chromium is missing, failed to start, or answered a command with an error."""


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Chromium:
    """One headless browser with one page (a tab) at `width` x `height` CSS pixels, device scale 1."""

    def __init__(self, width: int = 1280, height: int = 900, binary: str | None = None, timeout: float = 60) -> None:
        binary = binary or find_chromium()
        if binary is None:
            raise ChromiumError("chromium is not installed (Debian package `chromium`; `make chromium`)")
        self._profile = tempfile.TemporaryDirectory(prefix="distillery-chromium-")
        commands_read, self._commands = os.pipe()
        self._answers, answers_write = os.pipe()

        def wire_pipes() -> None:  # runs in the child: put the pipe ends where Chromium expects them
            # Copies above both targets first, so neither dup2 overwrites the other pipe end.
            ends = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10) for fd in (commands_read, answers_write)]
            for target, fd in zip((COMMAND_FD, ANSWER_FD), ends):
                os.dup2(fd, target)  # dup2's copy is inheritable: it survives the exec

        # --no-sandbox: the sandbox needs user namespaces, which containers and root sessions often lack.
        self._process = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--remote-debugging-pipe", f"--user-data-dir={self._profile.name}", "about:blank"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=wire_pipes, close_fds=False, start_new_session=True)
        os.close(commands_read)
        os.close(answers_write)
        self._timeout = timeout
        self._next_id = 0
        self._buffer = b""
        self._events: list[dict[str, Any]] = []
        try:
            target = self._call("Target.createTarget", url="about:blank")["targetId"]
            self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def _read_message(self) -> dict[str, Any]:
        deadline = time.monotonic() + self._timeout
        while b"\0" not in self._buffer:
            if not select.select([self._answers], [], [], max(0.0, deadline - time.monotonic()))[0]:
                raise ChromiumError(f"chromium sent nothing for {self._timeout:g} s")
            chunk = os.read(self._answers, 1 << 20)
            if not chunk:
                raise ChromiumError(f"chromium exited (code {self._process.poll()}) before answering")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _call(self, method: str, session: str | None = None, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._commands, json.dumps(message).encode() + b"\0")
        while True:
            answer = self._read_message()
            if answer.get("id") == self._next_id:
                if "error" in answer:
                    raise ChromiumError(f"chromium refused {method}: {answer['error'].get('message')}")
                return answer.get("result", {})
            self._events.append(answer)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command to the page (https://chromedevtools.github.io/devtools-protocol/)."""
        return self._call(method, self._session, **params)

    def wait_for_event(self, method: str) -> dict[str, Any]:
        for i, event in enumerate(self._events):
            if event.get("method") == method:
                return self._events.pop(i)
        while True:
            event = self._read_message()
            if event.get("method") == method:
                return event
            self._events.append(event)

    def open(self, url: str) -> None:
        """Load `url` and wait for its load event (every embedded image decoded); a jump to another anchor
        of the page already loaded has no load event (no loader: a same-document navigation)."""
        self._events.clear()
        if "loaderId" in self.call("Page.navigate", url=url):
            self.wait_for_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The JSON value of a JavaScript expression in the page."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise ChromiumError(f"the page's script failed: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def screenshot(self, x: float, y: float, width: float, height: float) -> bytes:
        """PNG of the page area at (x, y) of `width` x `height` CSS pixels, page (not viewport) coordinates."""
        return base64.b64decode(self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                                          clip={"x": x, "y": y, "width": width, "height": height,
                                                "scale": 1})["data"])

    def close(self) -> None:
        """Ask the browser to quit (it then ends its own helper processes and lets go of the profile)."""
        try:
            self._call("Browser.close")
        except (ChromiumError, OSError):
            pass  # already gone: nothing to ask
        try:
            self._process.wait(self._timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self._process.pid, signal.SIGKILL)  # its own process group: Chromium and its helpers
            self._process.wait()
        os.close(self._commands)
        os.close(self._answers)
        self._profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def screenshot_page(page: Path, out: Path, width: int = 1280, height: int = 900, anchor: str | None = None) -> None:
    """A `width` x `height` screenshot of `page`, scrolled to the element with id `anchor` (the top if None)."""
    with Chromium(width, height) as browser:
        browser.open(page.resolve().as_uri() + (f"#{anchor}" if anchor else ""))
        top = browser.evaluate("window.scrollY")
        atomic_write_bytes(out, browser.screenshot(0, top, width, height))


def main() -> None:
    parser = argparse.ArgumentParser(description=screenshot_page.__doc__)
    parser.add_argument("page", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--anchor", default=None, help="id of the element to scroll to (a report section: cka)")
    args = parser.parse_args()
    screenshot_page(args.page, args.out, args.width, args.height, args.anchor)
    print(f"{args.out}: {args.out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
