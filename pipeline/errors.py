"""The one error base of the library: the CLI turns any :class:`DistilleryError` into one line and exit 2.

Each layer has its own subclass (``CacheError``, ``DatasetError``, ``MethodError``, ...), whose message
says what is wrong and what to do; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class DistilleryError(ValueError):
    """Bad input or state a user can fix; the message is one line that says how."""


def one_line(error: BaseException) -> str:
    """The one line to show for ``error``. An error raised inside a DataLoader worker reaches the main process
    re-raised by torch with the worker's traceback folded into its message ("Caught CacheError in DataLoader
    worker process 0. Original Traceback ..."): the line is the original message, the traceback's last line
    without the class name."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    name, sep, message = last.partition(": ")
    return message if sep and name.rsplit(".", 1)[-1] == type(error).__name__ else last


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` naming the closest of ``known`` to a mistyped ``word``, or ``""`` when none is
    close: one place for the suggestion every "unknown NAME" line carries."""
    close = difflib.get_close_matches(word, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
