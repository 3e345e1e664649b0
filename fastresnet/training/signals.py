"""SIGTERM / SIGINT (preemption, Ctrl-C): finish the step, save, exit cleanly.

The handler only sets a flag; the loop looks at it after each step (alone) or
at each logging interval (under torchrun, where all ranks must agree on the
step at which they stop, so the flag is all-reduced there). A second signal
gives up at once.
"""

from __future__ import annotations

import signal


class StopRequest:
    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}

    def __bool__(self) -> bool:
        return self.signal_name is not None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: the embedding program handles signals
                pass
        return self

    def _handle(self, signum, frame):
        if self.signal_name is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signal_name = signal.Signals(signum).name

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
