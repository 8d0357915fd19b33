"""Log-likelihood of a continuation given a prompt (for lmms-eval's multiple-choice tasks).

One forward over prompt + continuation (a prefill of a fresh KV cache, every position's logits),
padded to a bucketed length so the number of compiled programs stays small.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np

from allava_jax.infer.buckets import bucket_length
from allava_jax.infer.engine import Engine, Prompt, make_batch
from allava_jax.models import cached


class Scorer:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._forward = jax.jit(self._log_probs)

    def _log_probs(self, params, tokens, images, image_mask, segment_ids, positions):
        cache = cached.init_cache(self.engine.config, tokens.shape[0], tokens.shape[1])
        logits, _ = cached.forward(self.engine.config, params, cache, tokens, images, image_mask, segment_ids, positions)
        return jax.nn.log_softmax(logits, axis=-1)

    def loglikelihood(self, prompt: Prompt, continuation: Sequence[int]) -> tuple[float, bool]:
        """(sum of log p(continuation | prompt), whether greedy decoding would produce it)."""
        continuation = list(continuation)
        if not continuation:
            return 0.0, True
        ids = prompt.ids + continuation
        if len(ids) > self.engine.max_len:
            raise ValueError(f"prompt + continuation has {len(ids)} tokens > {self.engine.max_len}")
        length = bucket_length(len(ids))
        b = make_batch([Prompt(ids, prompt.images)], 1, length, self.engine.config.vision)
        logp = np.asarray(self._forward(self.engine.params, b.tokens, b.images, b.image_mask, b.segment_ids, b.positions))[0]
        n = len(continuation)
        # Left padding: the continuation fills the last n slots, predicted by the n slots before them.
        rows = logp[length - n - 1 : length - 1]
        target = np.asarray(continuation)
        total = float(rows[np.arange(n), target].sum())
        return total, bool((rows.argmax(-1) == target).all())
