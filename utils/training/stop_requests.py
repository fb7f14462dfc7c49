"""Why a training run should stop after its step in flight: SIGINT or SIGTERM (a
Ctrl-C, a batch scheduler's time limit), or the reader of its log gone (SIGPIPE).

The run does not stop inside a step: it records the request, tells every rank
through the step's statistics, saves its checkpoint once the ranks agree, and exits
with 128 + the signal's number, as a process killed by it would.
"""

import contextlib
import signal
from typing import Iterator, Optional

__all__ = ["StopRequests"]


class StopRequests:
    """The first stop request of a run, as a signal number (None: none yet)."""

    def __init__(self):
        self.signal: Optional[int] = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @contextlib.contextmanager
    def caught(self) -> Iterator[None]:
        """SIGINT and SIGTERM become requests while the block runs; the handlers
        before are restored after it."""
        previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in previous:
            signal.signal(s, self._on_signal)
        try:
            yield
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum, frame) -> None:
        self.signal = signum
        # A second Ctrl-C kills the process at once.
        signal.signal(signum, signal.SIG_DFL)

    def reader_gone(self) -> None:
        """The log's reader went away: a request as SIGPIPE (a signal's stop wins)."""
        if self.signal is None:
            self.signal = signal.SIGPIPE
