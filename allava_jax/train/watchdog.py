"""A step that never ends (a stuck collective, a host that died mid-all-reduce, a data worker that
hangs) shows nothing on a pod but silence: the watchdog logs every thread's stack instead."""

from __future__ import annotations

import logging
import sys
import threading
import time
import traceback
from typing import Callable

log = logging.getLogger("allava_jax.train")


def thread_stacks() -> str:
    """Every Python thread's stack, named, innermost call last."""
    names = {t.ident: t.name for t in threading.enumerate()}
    parts = []
    for ident, frame in sys._current_frames().items():
        parts.append(f"--- thread {names.get(ident, '?')} ({ident}) ---\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(parts)


class HangWatchdog:
    """Logs all thread stacks once when no step finished for ``timeout_s`` (0 = off).

    ``beat`` is called after each step; ``check`` compares the clock with the last beat (a thread
    calls it every ``poll_s`` once ``start``ed; tests call it directly with an injected clock).
    It fires once per stall: the next beat re-arms it.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic, poll_s: float | None = None):
        self.timeout_s = timeout_s
        self._clock = clock
        self._poll_s = poll_s or max(min(timeout_s / 4, 60.0), 0.05)
        self._last = clock()
        self._step = 0
        self._fired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.fired_count = 0

    def beat(self, step: int) -> None:
        self._last, self._step, self._fired = self._clock(), step, False

    def check(self) -> bool:
        """True when it fired on this call."""
        if not self.timeout_s or self._fired:
            return False
        idle = self._clock() - self._last
        if idle < self.timeout_s:
            return False
        self._fired = True
        self.fired_count += 1
        log.error("hang watchdog: no step finished for %.0f s after step %d (hang_timeout_s=%g); "
                  "every thread's stack follows\n%s", idle, self._step, self.timeout_s, thread_stacks())
        return True

    def start(self) -> "HangWatchdog":
        if self.timeout_s and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.check()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
