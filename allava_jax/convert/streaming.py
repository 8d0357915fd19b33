"""Let orbax write a param tree whose leaves are computed one at a time, as it writes them.

``checkpoints.save_model`` takes a whole tree; a full fp32 Phi-2 + CLIP tree is 12 GB, more than
the 1.5x-of-disk memory target. A ``LazyLeaf`` is a zero-memory numpy view (shape and dtype right,
so orbax plans and records it as an ordinary ``np.ndarray`` leaf) that carries a function making
its real value. Inside ``streaming_numpy_saves()``, orbax's numpy handler is swapped for one that
materialises and writes the leaves one after another (no defensive deep copy), so peak memory is
the largest leaf. The on-disk result is exactly what ``save_model`` writes for numpy leaves.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from typing import Any, Callable, Iterator, Sequence

import numpy as np


class LazyLeaf(np.ndarray):
    """A stand-in array of the right shape/dtype whose data ``materialize()`` produces."""

    make: Callable[[], np.ndarray] | None = None

    @classmethod
    def create(cls, shape: tuple[int, ...], dtype: Any, make: Callable[[], np.ndarray]) -> "LazyLeaf":
        leaf = np.broadcast_to(np.zeros((), dtype), shape).view(cls)
        leaf.make = make
        return leaf

    def materialize(self) -> np.ndarray:
        value = np.asarray(self.make())
        if value.shape != self.shape or value.dtype != self.dtype:
            raise ValueError(f"lazy leaf made {value.shape} {value.dtype}, expected {self.shape} {self.dtype}")
        return value


def chunk_boxes(shape: tuple[int, ...], chunk: tuple[int, ...]) -> Iterator[tuple[slice, ...]]:
    """The index boxes of the regular chunk grid ``chunk`` over an array of ``shape``, in C order."""
    starts = [range(0, n, c) for n, c in zip(shape, chunk)]
    for corner in itertools.product(*starts):
        yield tuple(slice(s, min(s + c, n)) for s, c, n in zip(corner, chunk, shape))


def _handler_class():
    import tensorstore as ts
    from orbax.checkpoint._src.futures import future
    from orbax.checkpoint._src.serialization import type_handlers, types

    class StreamingNumpyHandler(type_handlers.NumpyHandler):
        """Writes numpy leaves sequentially, materialising ``LazyLeaf`` ones just in time."""

        async def serialize(self, values: Sequence[np.ndarray], infos: Sequence[Any], args: Sequence[Any] | None = None):
            args = args or [types.SaveArgs()] * len(values)
            return [future.CommitFutureAwaitingContractedSignals(self._one_by_one(values, infos, args), name="np_stream")]

        async def _one_by_one(self, values, infos, args) -> None:
            for value, info, arg in zip(values, infos, args):
                array = value.materialize() if isinstance(value, LazyLeaf) else value
                await self._background_serialize([array], [info], [arg])
                del array

        async def _open_and_write(self, value: np.ndarray, tspec: dict, ts_context: Any) -> None:
            # Same spec (so the same array on disk) as orbax's, but written one chunk at a time:
            # a whole-array write makes tensorstore hold a copy of every chunk of a multi-chunk
            # leaf (e.g. Phi's stacked fc1, 3.4 GB fp32, in two 1.7 GB chunks) at once.
            t = await ts.open(ts.Spec(tspec), create=True, open=True, context=ts_context)
            chunk = t.chunk_layout.write_chunk.shape
            if chunk is None or tuple(chunk) == value.shape or value.ndim == 0:
                await t.write(value, can_reference_source_data_indefinitely=True)
                return
            for box in chunk_boxes(value.shape, tuple(chunk)):
                await t[box].write(value[box])

    return StreamingNumpyHandler


@contextlib.contextmanager
def streaming_numpy_saves() -> Iterator[None]:
    """Within: orbax saves numpy leaves one at a time, computing ``LazyLeaf`` values on demand."""
    import orbax.checkpoint as ocp

    handlers = ocp.type_handlers
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)  # orbax warns on every handler override
    old = handlers.get_type_handler(np.ndarray)
    handlers.register_type_handler(np.ndarray, _handler_class()(deepcopy_host_arrays=False), override=True)
    try:
        yield
    finally:
        handlers.register_type_handler(np.ndarray, old, override=True)
        absl_logger.setLevel(level)
