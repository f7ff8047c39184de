"""Clean stops: SIGINT (Ctrl-C) and SIGTERM (`kill`, a cluster's preemption, torchrun passing on its own signal)
ask the training loop to finish the step it is in and write a checkpoint; train.run decides when (with several
processes, at the same step on every rank)."""

from __future__ import annotations

import signal
import sys
import time


class StopFlag:
    """SIGINT/SIGTERM set a flag; the loop checkpoints at the end of the current step. A second Ctrl-C aborts.
    Under a launcher a signal may arrive twice within moments (the terminal's Ctrl-C reaches every process, and
    torchrun forwards its own): a repeat within a second is the same request."""

    def __init__(self, announce: bool = True):
        self.signal: int | None = None
        self.announce, self._at = announce, 0.0

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            if time.monotonic() - self._at < 1.0:
                return
            raise KeyboardInterrupt
        self.signal, self._at = signum, time.monotonic()
        if self.announce:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint...", file=sys.stderr)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
