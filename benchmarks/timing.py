"""Timing shared by the benchmark scripts (imported as ``timing``: a script's folder is on its path)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any


def best_times(fns: Sequence[Callable[[], Any]], repeats: int) -> list[tuple[float, Any]]:
    """For each of ``fns``: (seconds of its fastest of ``repeats`` calls, its last result). The
    calls are interleaved (a, b, a, b, ...) so that both sides of a comparison see the same
    stretches of this shared machine's load; its noise only ever slows a call down."""
    times: list[list[float]] = [[] for _ in fns]
    results: list[Any] = [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            start = time.perf_counter()
            results[i] = fn()
            times[i].append(time.perf_counter() - start)
    return [(min(t), r) for t, r in zip(times, results)]
