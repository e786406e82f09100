"""SIGINT / SIGTERM during training: finish the step, checkpoint, exit cleanly.

A scheduler pre-empting a job sends SIGTERM (torchrun forwards it to every rank); a user presses Ctrl-C.
Either only sets a flag here. The loop all-reduces the flag with the step's loss, so every rank stops
after the same step, writes the checkpoint, and returns. A second Ctrl-C raises KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class StopRequest:
    """SIGINT / SIGTERM set a flag the loop checks after each step; a second SIGINT aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread (e.g. not under some test runners)
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        self.signal_name = signal.Signals(signum).name
