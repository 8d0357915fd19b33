"""Shape buckets: round batch sizes and lengths up so new requests reuse compiled programs.

Every distinct (batch, length) pair costs one XLA compile; rounding to a short ladder of sizes
bounds the number of programs at the price of some padding.
"""

from __future__ import annotations


def bucket_length(n: int, minimum: int = 16, step: int = 128) -> int:
    """Powers of two up to ``step``, then multiples of ``step`` (keeps long image prompts tight)."""
    n = max(int(n), 1)
    if n <= step:
        size = minimum
        while size < n:
            size *= 2
        return size
    return -(-n // step) * step


def bucket_batch(n: int, maximum: int | None = None) -> int:
    """The next power of two >= n (capped at ``maximum`` when given)."""
    size = 1
    while size < n:
        size *= 2
    return min(size, maximum) if maximum else size
