"""What the SDK lacks: requests/min and tokens/min limits (the concurrency limit is the worker count).

Token buckets refilled continuously. The bucket holds one second's allowance, not a minute's:
providers enforce per-minute limits over shorter windows too, so a full minute's burst at start-up
would only earn 429s. Acquirers are served in arrival order. A request larger than the whole bucket
waits for a full bucket and then goes (the bucket goes negative), so the average rate still holds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    """``per_minute`` units per minute; ``acquire(n)`` waits until ``n`` units are available."""

    def __init__(self, per_minute: float, clock: Callable[[], float] = time.monotonic, burst_seconds: float = 1.0):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_seconds)
        self.level = self.capacity
        self._clock = clock
        self._last = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._last) * self.rate)
        self._last = now

    def wait_time(self, n: float) -> float:
        """Seconds until ``n`` units can be taken (0 if now)."""
        self._refill()
        need = min(n, self.capacity)
        # A shortfall within rounding counts as none: waiting for it would never end on a clock
        # whose next reading rounds back to the same value.
        return 0.0 if self.level >= need - 1e-9 * self.capacity else (need - self.level) / self.rate

    def take(self, n: float) -> None:
        self._refill()
        self.level -= n


class RateLimiter:
    """Requests/min and tokens/min limits together; 0 or None disables a limit."""

    def __init__(self, rpm: float | None = None, tpm: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.requests = TokenBucket(rpm, clock=clock) if rpm else None
        self.tokens = TokenBucket(tpm, clock=clock) if tpm else None
        self._sleep = sleep
        self._lock = asyncio.Lock()

    async def acquire(self, tokens: int = 0) -> None:
        """Wait for one request slot and ``tokens`` of allowance (prompt estimate + max tokens, as
        providers count it when the request arrives)."""
        if self.requests is None and self.tokens is None:
            return
        async with self._lock:  # FIFO: the first waiter is served first
            while True:
                wait = max(self.requests.wait_time(1) if self.requests else 0.0,
                           self.tokens.wait_time(tokens) if self.tokens else 0.0)
                if wait <= 0:
                    break
                await self._sleep(wait)
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(tokens)
