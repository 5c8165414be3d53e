"""The one error base of the library: the CLI turns any :class:`DistilleryError` into one line and exit 2.

Each layer has its own subclass (``CacheError``, ``DatasetError``, ``MethodError``, ...), whose message
says what is wrong and what to do; anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class DistilleryError(ValueError):
    """Bad input or state a user can fix; the message is one line that says how."""
