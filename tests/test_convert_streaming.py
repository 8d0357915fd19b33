"""Chunk-by-chunk writes of large leaves: the chunk grid covers every element exactly once."""

import numpy as np

from allava_jax.convert.streaming import chunk_boxes


def test_chunk_boxes_tile_the_array_exactly_once():
    shape, chunk = (5, 37, 300), (2, 37, 128)
    hits = np.zeros(shape, np.int32)
    boxes = list(chunk_boxes(shape, chunk))
    for box in boxes:
        hits[box] += 1
    assert (hits == 1).all()
    assert len(boxes) == 3 * 1 * 3
    assert list(chunk_boxes((4, 4), (4, 4))) == [(slice(0, 4), slice(0, 4))]
