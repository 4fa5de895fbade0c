"""How library code says what it is doing, without printing: a Reporter. The base class is silent, so a
program that uses capcli's API gets no output unless it passes a reporter; the CLI passes one that writes to
stderr. Also: Ctrl-C and SIGTERM as one interruption."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager
from typing import Callable, Iterator


class Reporter:
    """Lines of progress text, warnings about single inputs, and progress over a known total."""

    def line(self, text: str) -> None:
        """A message about the job (what is loaded, how far it got)."""

    def warn(self, text: str) -> None:
        """A problem with one input; the job goes on."""

    def progress(self, total: int, description: str) -> Callable[[int], None]:
        """Start a progress count; call the result with the number of items just done."""
        return lambda n: None

    def end_progress(self) -> None:
        """Remove or finish the progress display before a summary line."""


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM (what a batch scheduler sends) raises KeyboardInterrupt, as Ctrl-C does, so
    a job keeps its finished work the same way for both. Outside the main thread, nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def raise_interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM wait for it to end, then interrupt. For short writes that must not
    stop halfway (a checkpoint, a log line, a plot): an interruption that lands while a C extension is being
    imported (matplotlib's, on the first plot) can abort the interpreter instead of raising."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum))
                for s in (signal.SIGINT, signal.SIGTERM) if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received:
        raise KeyboardInterrupt
