"""Progress reporting and cancellation shared by inference, training and the pipeline.

A progress callback is any ``callable(fraction: float, stage: str)`` with fraction in [0, 1].
A :class:`CancelToken` is checked between units of work (windows, batches); a cancelled run
raises :class:`Cancelled` and leaves no output file behind.
"""
from __future__ import annotations

import re
import threading
from typing import Callable, Optional

from .volume import TransferSegError

ProgressCallback = Callable[[float, str], None]

# C0 and C1 controls, DEL, and the Unicode line and paragraph separators: what can end or rewrite a line
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def one_line(text) -> str:
    """``text`` with every character that could break or rewrite a line escaped (``\\n``, ``\\x1b``, …),
    and undecodable file-name bytes shown as ``\\xff``: what we print that carries a user's string
    (a file name, a card's label) stays one line, so a name cannot forge a ``PROGRESS`` line."""
    text = str(text)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a file name that is not UTF-8 (Python holds its bytes as surrogates)
        try:
            text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return _CONTROLS.sub(lambda m: repr(m.group())[1:-1], text)


class Cancelled(TransferSegError):
    """The user cancelled the run; nothing was written."""

    def __init__(self, message: str = "cancelled by the user; no output was written"):
        super().__init__(message)


class CancelToken:
    """Thread-safe flag: the GUI or a signal handler calls :meth:`cancel`, the worker calls :meth:`check`."""

    def __init__(self):
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()

    def check(self) -> None:
        if self._event.is_set():
            raise Cancelled()


def check_cancel(cancel: Optional[CancelToken]) -> None:
    if cancel is not None:
        cancel.check()


class StageProgress:
    """Maps a sub-task's 0…1 progress into [start, stop] of the overall progress."""

    def __init__(self, callback: Optional[ProgressCallback], start: float = 0.0, stop: float = 1.0):
        self.callback, self.start, self.stop = callback, start, stop

    def __call__(self, fraction: float, stage: str) -> None:
        if self.callback is not None:
            fraction = min(max(float(fraction), 0.0), 1.0)
            self.callback(self.start + (self.stop - self.start) * fraction, stage)

    def sub(self, start: float, stop: float) -> "StageProgress":
        span = self.stop - self.start
        return StageProgress(self.callback, self.start + span * start, self.start + span * stop)
