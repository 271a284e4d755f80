"""SIGTERM/SIGINT: finish the current iteration, save a checkpoint, stop cleanly."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
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


class Signalled(BaseException):
    """A SIGTERM/SIGINT that arrived outside a training loop, raised by :func:`raise_on_signal`'s handler (a
    ``BaseException``, like ``KeyboardInterrupt``, so ``except Exception`` blocks do not swallow it)."""

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal_number)
        self.signal_number = signal_number


@contextmanager
def raise_on_signal() -> Iterator[None]:
    """For multi-stage pipelines: a SIGTERM/SIGINT raises :class:`Signalled` wherever the pipeline is, except inside
    a training loop, whose :class:`StopOnSignal` takes over (it finishes the iteration, saves a checkpoint, returns,
    and restores this handler). Previous handlers are restored on exit; main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Signalled(signum)

    previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
