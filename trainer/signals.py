"""SIGTERM/SIGINT: finish the current iteration, save a checkpoint, stop cleanly."""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType
from typing import Any

from loguru import logger

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopOnSignal:
    """Context manager: the first SIGTERM/SIGINT sets :attr:`received`; a second SIGINT raises KeyboardInterrupt.

    Handlers are installed only in the main thread and restored on exit.
    """

    def __init__(self) -> None:
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only record it: logging from a signal handler can deadlock on the logger's lock.
        sig = signal.Signals(signum)
        if self.received is not None and sig == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = sig

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        else:
            logger.debug("not in the main thread: SIGTERM/SIGINT handlers not installed")
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
