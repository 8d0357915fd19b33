"""KV-cache generation: jit-compiled prefill and decode over ``models.cached``.

A batch of prompts is left-padded to a bucketed length (segment id 0 on pads, per-row positions),
prefilled in one call, then decoded by a ``lax.while_loop`` that runs many steps per dispatch and
stops early once every row has hit EOS or its ``max_new_tokens``. Stop strings are checked on the
host between chunks of steps. The same compiled pieces (``prefill``, ``decode_chunk``) also drive the
server's continuous-batching scheduler.

The KV cache grows with the answers, as the server's does. Every decode step reads every slot of
the cache, so a cache sized for ``max_new_tokens`` up front made short answers after long image
prompts read (and allocate) several times the slots they fill. It starts at the length bucket that
holds the prompt and ``STOP_CHECK_STEPS`` more tokens, and doubles between chunks when full, up to
what the longest answer can need: one decode program per size reached, at most twice the filled
slots read.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback

from allava_jax.data.templates import stop_ids
from allava_jax.errors import UserError
from allava_jax.infer import media
from allava_jax.infer.buckets import bucket_batch, bucket_length
from allava_jax.infer.prompts import Turn, encode_generation_prompt
from allava_jax.infer.sampling import SamplingArrays, SamplingParams, TokenLogprobs, sample, token_logprobs
from allava_jax.infer.stream import decode, final_text, find_stop, stop_search_start
from allava_jax.models import LlavaConfig, cached, rice
from allava_jax.models.config import VisionConfig

log = logging.getLogger(__name__)
Array = jax.Array
STOP_CHECK_STEPS = 16  # decode steps between host-side stop-string checks


@dataclasses.dataclass
class Prompt:
    """One tokenised prompt: ids with image placeholder runs, and its images [M, S, S, 3] (a list
    of ``NativeImage`` for a rice tower), or None."""

    ids: list[int]
    images: np.ndarray | list | None = None

    @property
    def num_images(self) -> int:
        return 0 if self.images is None else len(self.images)


@dataclasses.dataclass
class Completion:
    """What one prompt produced. ``token_ids`` excludes EOS; ``text`` is cut at a stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str  # "stop" (EOS or stop string) | "length"
    prompt_tokens: int


@dataclasses.dataclass
class Batch:
    """Model inputs for a left-padded batch of prompts (numpy, bucketed shapes)."""

    tokens: np.ndarray  # [B, L] int32
    segment_ids: np.ndarray  # [B, L] int32, 0 on padding
    positions: np.ndarray  # [B, L] int32
    images: np.ndarray | dict | None  # [B, M, S, S, 3] float32, or a rice tower's packed rows
    image_mask: np.ndarray | None  # [B, M] bool (None for packed rows)
    lengths: np.ndarray  # [B] real prompt lengths (0 for batch padding rows)


def make_batch(prompts: Sequence[Prompt], batch: int, length: int, vision: VisionConfig | int) -> Batch:
    """Left-pad ``prompts`` into ``batch`` rows of ``length`` tokens. A rice tower's images become
    one packed row per prompt (``rice.pack_images``), its patch count and image slots bucketed
    like lengths so that new requests reuse compiled programs."""
    tokens = np.zeros((batch, length), np.int32)
    seg = np.zeros((batch, length), np.int32)
    pos = np.zeros((batch, length), np.int32)
    lengths = np.zeros((batch,), np.int32)
    m = max((p.num_images for p in prompts), default=0)
    packed = media.is_native(vision)
    size = vision if isinstance(vision, int) else vision.image_size
    images = np.zeros((batch, m, size, size, 3), np.float32) if m and not packed else None
    mask = np.zeros((batch, m), bool) if m and not packed else None
    if m and packed:
        rows = [[(im.patches, im.grid) for im in (p.images or [])] for p in prompts]
        rows += [[]] * (batch - len(rows))
        n_patches = bucket_length(max(sum(len(im.patches) for im in (p.images or [])) for p in prompts))
        # Blocks of up to 128 patches: XLA attention scores each against the images it touches.
        images = rice.pack_images(rows, rice.Buckets(patch_multiple=min(128, n_patches), max_images=bucket_batch(m)),
                                  vision.spatial_merge_size)
    for r, p in enumerate(prompts):
        n = len(p.ids)
        tokens[r, length - n :] = p.ids
        seg[r, length - n :] = 1
        pos[r, length - n :] = np.arange(n)
        lengths[r] = n
        if p.num_images and not packed:
            images[r, : p.num_images] = p.images
            mask[r, : p.num_images] = True
    return Batch(tokens, seg, pos, images, mask, lengths)


class Engine:
    """A model ready to generate: params on device, compiled prefill/decode, a tokenizer.

    ``max_len`` bounds prompt + answer tokens (default: the model's max position embeddings).
    The image placeholder id is never sampled. Generation ends at any of ``stop_token_ids``.
    """

    def __init__(
        self, config: LlavaConfig, params: Any, tokenizer: Any, *, max_len: int | None = None,
        stop_token_ids: Sequence[int] | None = None,
    ) -> None:
        self.config = config
        # One buffer per layer's weight; split before the device copy, so host (numpy) params are
        # copied once and the stacked layers never sit on the device beside the split ones.
        self.params = jax.device_put(cached.split_layers(params))
        self.tokenizer = tokenizer
        # Any of these ends an answer (default: the chat template's, e.g. Phi-3's <|end|> and
        # <|endoftext|>); the first pads finished rows.
        self.stop_ids = tuple(int(t) for t in stop_token_ids or stop_ids(tokenizer, config.chat_template))
        self.eos_id = self.stop_ids[0]
        self._stop_array = np.asarray(self.stop_ids, np.int32)
        self.max_len = int(max_len or config.text.max_position_embeddings)
        self.suppress = (config.image_token_id,) if config.image_token_id < config.text.vocab_size else ()
        self.prefill = jax.jit(self._prefill, static_argnames=("cache_len", "logprobs"))
        self._decode_chunk = jax.jit(self._decode_loop, donate_argnums=(1,), static_argnames=("interrupt",))
        # Not donated: the cache's shape changes.
        self.move_cache = jax.jit(cached.move_cache, static_argnums=(2,))

    def prompt(self, rounds: Sequence[Turn], images: np.ndarray | list | None = None) -> Prompt:
        """A conversation (last answer open) and its images [M, S, S, 3] (``NativeImage``s for a
        rice tower: each takes its own number of placeholder tokens) as a ``Prompt``."""
        n = 0 if images is None else len(images)
        c = self.config
        counts = [im.num_tokens for im in images or []] if media.is_native(c.vision) else c.num_image_tokens
        ids = encode_generation_prompt(
            self.tokenizer, rounds, n, image_token_id=c.image_token_id, num_image_tokens=counts,
            template=c.chat_template,
        )
        return Prompt(ids, images)

    # ----- compiled pieces -------------------------------------------------------------------

    def _apply(self, params, cache, tokens, images, image_mask, segment_ids, positions):
        """Run ``tokens`` into the cache; logits [B, vocab] of the last position only (the only ones
        sampled from: a prefill's LM head over every prompt position cost more than its decoder)."""

        x, cache = cached.hidden(self.config, params, cache, tokens, images, image_mask, segment_ids, positions)
        return cached.head(self.config, params, x[:, -1:])[:, 0], cache

    def _pick(self, logits, sampling, position, generated, logprobs: bool) -> tuple[Array, TokenLogprobs | None]:
        """Sample from logits [B, V]; with ``logprobs``, also the raw distribution's log-probabilities."""
        token = sample(logits, sampling, position, generated, self.suppress, self.stop_ids)
        return token, token_logprobs(logits, token) if logprobs else None

    def _prefill(self, params, tokens, images, image_mask, segment_ids, positions, sampling, *, cache_len: int,
                 logprobs: bool = False):
        """Run the prompts into a fresh cache of ``cache_len`` slots; sample each row's first token.

        Returns (first tokens [B], their ``TokenLogprobs`` or None, cache)."""
        cache = cached.init_cache(self.config, tokens.shape[0], cache_len)
        logits, cache = self._apply(params, cache, tokens, images, image_mask, segment_ids, positions)
        none_yet = jnp.zeros(tokens.shape[:1], jnp.int32)
        return *self._pick(logits, sampling, positions[:, -1] + 1, none_yet, logprobs), cache

    def _step(self, params, cache, token, position, segment_id, sampling, generated, *, logprobs: bool = False):
        """One decode step for every row: feed ``token`` at ``position``, sample the next one.

        ``generated`` [B]: tokens each row has produced so far (for ``min_tokens``). Returns
        (next tokens [B], their ``TokenLogprobs`` or None, cache)."""
        logits, cache = self._apply(params, cache, token[:, None], None, None, segment_id[:, None], position[:, None])
        return *self._pick(logits, sampling, position + 1, generated, logprobs), cache

    def _decode_loop(self, params, state, sampling, n_steps, interrupt: Callable[[], bool] | None = None):
        """Up to ``n_steps`` decode steps inside one ``while_loop``; stops when all rows are done,
        or, after its first step, as soon as the host callback ``interrupt`` says so.

        ``state``: ``cache``, ``token`` / ``pos`` / ``live`` / ``done`` / ``generated`` /
        ``max_new`` per row, ``out`` [B, T] written at column ``step``, and with ``chosen`` /
        ``top_ids`` / ``top_logprobs`` ([B, T] and [B, T, K]) the tokens' log-probabilities too.
        Rows that are done keep feeding the first stop id and are masked by the caller."""
        limit = jnp.minimum(state["step"] + n_steps, state["out"].shape[1])
        want_logprobs = "chosen" in state
        first_step = state["step"]

        def ask() -> Array:
            return io_callback(lambda: np.bool_(interrupt()), jax.ShapeDtypeStruct((), jnp.bool_))

        def cond(s):
            go_on = (s["step"] < limit) & ~jnp.all(s["done"])
            if interrupt is None:
                return go_on
            return go_on & ~jax.lax.cond(s["step"] == first_step, lambda: jnp.bool_(False), ask)

        def body(s):
            nxt, lps, cache = self._step(
                params, s["cache"], s["token"], s["pos"], s["live"].astype(jnp.int32), sampling, s["generated"],
                logprobs=want_logprobs,
            )
            nxt = jnp.where(s["done"], self.eos_id, nxt)
            column = (0, s["step"])
            new = {"out": jax.lax.dynamic_update_slice(s["out"], nxt[:, None], column)}
            if want_logprobs:
                for name, value in zip(("chosen", "top_ids", "top_logprobs"), lps):
                    new[name] = jax.lax.dynamic_update_slice(s[name], value[:, None], column + (0,) * (value.ndim - 1))
            done = s["done"] | (self.is_stop(nxt) & ~sampling.ignore_eos) | (s["generated"] + 1 >= s["max_new"])
            return {**s, **new, "cache": cache, "token": nxt, "pos": s["pos"] + 1, "done": done,
                    "generated": s["generated"] + 1, "step": s["step"] + 1}

        return jax.lax.while_loop(cond, body, state)

    def decode_chunk(self, state: dict, sampling: SamplingArrays, n_steps: int,
                     interrupt: Callable[[], bool] | None = None) -> dict:
        """Run ``_decode_loop`` for up to ``n_steps`` steps in one dispatch (``state``'s cache is
        donated). ``interrupt`` (called from XLA's thread before every step after the first; each
        distinct function compiles once) ends the chunk early when it returns True."""
        return self._decode_chunk(self.params, state, sampling, jnp.asarray(n_steps, jnp.int32), interrupt=interrupt)

    # ----- batch generation ------------------------------------------------------------------

    def check_length(self, n_prompt: int, max_new_tokens: int) -> int:
        """Raise if a prompt leaves no room to generate; return the max_new_tokens that fits."""
        if n_prompt >= self.max_len:
            raise UserError(f"prompt has {n_prompt} tokens; this model allows at most {self.max_len - 1}")
        return min(max_new_tokens, self.max_len - n_prompt)

    def generate(
        self, prompts: Sequence[Prompt], sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams()
    ) -> list[Completion]:
        """Generate for a batch of prompts (any mix of lengths, with or without images)."""
        if isinstance(sampling, SamplingParams):
            sampling = [sampling] * len(prompts)
        if len(sampling) != len(prompts):
            raise ValueError("one SamplingParams per prompt")
        if not prompts:
            return []
        max_new = [self.check_length(len(p.ids), s.max_new_tokens) for p, s in zip(prompts, sampling)]
        b = bucket_batch(len(prompts))
        length = bucket_length(max(len(p.ids) for p in prompts))
        steps = bucket_length(max(max_new))
        full = length + steps  # cache slots the longest answer can need
        capacity = self.cache_slots(length + STOP_CHECK_STEPS, full)
        batch = make_batch(prompts, b, length, self.config.vision)
        arrays = SamplingArrays.from_params(sampling, b)
        first, _, cache = self.prefill(
            self.params,
            batch.tokens,
            batch.images,
            batch.image_mask,
            batch.segment_ids,
            batch.positions,
            arrays,
            cache_len=capacity,
        )
        live = batch.lengths > 0
        max_new_arr = np.asarray(max_new + [1] * (b - len(prompts)), np.int32)
        state = {
            "cache": cache,
            "token": first,
            "pos": jnp.asarray(batch.lengths),
            "live": jnp.asarray(live),
            "done": jnp.asarray(~live | (max_new_arr <= 1)) | (self.is_stop(first) & ~arrays.ignore_eos),
            "out": jnp.zeros((b, steps), jnp.int32).at[:, 0].set(first),
            "step": jnp.asarray(1, jnp.int32),
            "generated": jnp.ones((b,), jnp.int32),
            "max_new": jnp.asarray(max_new_arr),
        }
        has_stops = any(s.stop for s in sampling)
        chunk = STOP_CHECK_STEPS if has_stops else steps
        step = 1  # tokens out so far; the cache holds the prompt and all but the last of them
        while True:
            filled = length + step - 1
            if filled == capacity:
                capacity = self.cache_slots(2 * capacity, full)
                state["cache"] = self.move_cache(state["cache"], jnp.int32(0), capacity)
            state = self.decode_chunk(state, arrays, min(chunk, capacity - filled))
            done, step = np.asarray(state["done"]), int(state["step"])
            if done.all() or step >= steps:
                break
            if has_stops:  # rows whose text already holds a stop string need no more tokens
                out = np.asarray(state["out"])
                hit = [bool(s.stop) and not done[r] and self._has_stop(out[r, :step], s) for r, s in enumerate(sampling)]
                hit += [False] * (b - len(sampling))
                if any(hit):
                    state["done"] = state["done"] | jnp.asarray(hit)
                    if np.all(done | np.asarray(hit)):
                        break
        out = np.asarray(state["out"])
        return [self._completion(out[r, :step], prompts[r], sampling[r], max_new[r]) for r in range(len(prompts))]

    @staticmethod
    def cache_slots(needed: int, full: int) -> int:
        """Slots of a cache that must hold ``needed``: its length bucket, at most ``full`` (what
        the longest answer can need; the server's ``max_len``)."""
        return min(full, bucket_length(needed))

    def is_stop(self, tokens: jax.Array) -> jax.Array:
        """Which of ``tokens`` end an answer (traceable)."""
        return jnp.isin(tokens, self._stop_array)

    def until_stop(self, ids: Sequence[int], ignore_eos: bool = False) -> tuple[list[int], bool]:
        """``ids`` up to their first stop token, and whether there was one (all of them with ``ignore_eos``)."""
        ids = list(ids)
        end = None if ignore_eos else next((i for i, t in enumerate(ids) if t in self.stop_ids), None)
        return (ids, False) if end is None else (ids[:end], True)

    def _has_stop(self, ids: np.ndarray, sampling: SamplingParams) -> bool:
        """Whether a row's text so far holds one of its stop strings (past its ``min_tokens``)."""
        ids = self.until_stop(ids.tolist(), sampling.ignore_eos)[0]
        after = stop_search_start(self.tokenizer, ids, sampling.min_tokens)
        return find_stop(decode(self.tokenizer, ids), sampling.stop, after) >= 0

    def _completion(self, ids: np.ndarray, prompt: Prompt, sampling: SamplingParams, max_new: int) -> Completion:
        ids, hit_eos = self.until_stop(ids.tolist()[:max_new], sampling.ignore_eos)
        text, hit_stop = final_text(self.tokenizer, ids, sampling.stop, sampling.min_tokens)
        reason = "stop" if hit_eos or hit_stop else "length"
        return Completion(ids, text, reason, len(prompt.ids))
