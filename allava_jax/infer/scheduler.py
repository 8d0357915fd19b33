"""Continuous batching: many requests share one KV cache and one decode loop.

The cache has ``max_batch`` rows ("slots") and ``max_len`` positions. The model's cache keeps one
write index for all rows, so every decode step writes all rows at the same position. A new
request is prefilled on its own (batched with the other newcomers) into a small cache and spliced
into a free row, right-aligned to the shared index; its row's old entries are dropped by zeroing
their segment ids. Keys carry their rotary positions already, so where a row sits in the cache
does not matter, only which slots share its segment. When a chunk of steps would run past the end, the cache
is shifted left past the oldest live row's first slot (``L + max_new <= max_len`` guarantees room
for at least one step). Every decode step reads the whole cache, so its length follows what the
live requests fill (a length bucket, grown on demand up to ``max_len`` and shrunk when mostly
empty), not ``max_len``: at 16 requests a 512-slot cache made each step 2.3x slower than 128.

Decoding runs ``decode_steps`` steps per dispatch inside one ``while_loop`` (``Engine.decode_chunk``,
as ``generate`` does), so the host round trip is paid once per chunk, not once per token. New
requests are admitted between chunks, and a chunk ends early, after the step in progress, when a
request waits and a slot is free for it (a host callback asked before each step), so a newcomer's
first token waits one decode step and its prefill, not a whole chunk. A chunk's tokens reach their
request as one ``Event`` (with their log-probabilities when the request asked for them); a chunk
computes log-probabilities only when some live request wants them.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from allava_jax.errors import UserError
from allava_jax.infer.buckets import bucket_batch, bucket_length
from allava_jax.infer.engine import Engine, Prompt, make_batch
from allava_jax.infer.sampling import MAX_TOP_LOGPROBS, SamplingArrays, SamplingParams, TokenLogprobs
from allava_jax.infer.stream import TextStream
from allava_jax.models.cached import SLOT_AXIS, init_cache

log = logging.getLogger(__name__)
DECODE_STEPS = 16  # decode steps per dispatch: fewer host round trips (a waiting newcomer cuts a chunk short)


@dataclasses.dataclass
class TokenLogprob:
    """One generated token, its log-probability and the most likely tokens in its place (raw model
    distribution, see ``sampling``), most likely first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


@dataclasses.dataclass
class Event:
    """What a request's consumer receives: new text for ``num_tokens`` new tokens (their
    log-probabilities if asked for), and at the end a finish reason and counts."""

    delta: str = ""
    num_tokens: int = 0
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None  # "stop" | "length" | "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclasses.dataclass(eq=False)
class Job:
    """One request in flight. ``emit`` is called from the scheduler thread."""

    prompt: Prompt
    sampling: SamplingParams
    emit: Callable[[Event], None]
    cancelled: bool = False
    stream: TextStream | None = None
    generated: int = 0
    position: int = 0  # position of the next token fed to the model
    start: int = 0  # first cache slot of the prompt's real tokens
    token: int = 0  # the last sampled token (fed at the next step)

    @property
    def wants_logprobs(self) -> bool:
        return self.sampling.logprobs is not None


def _cache_index(cache: Any) -> jax.Array:
    leaves = jax.tree_util.tree_flatten_with_path(cache)[0]
    return next(x for path, x in leaves if path[-1].key == "index")


def _logprob_entry(lps: Any, at: int | tuple[int, int], token: int, k: int | None) -> TokenLogprob | None:
    """Entry ``at`` (a row, or a row and step) of host-side ``TokenLogprobs`` with its ``k`` best
    alternatives (None if unasked)."""
    if lps is None or k is None:
        return None
    top = [(int(i), float(v)) for i, v in zip(lps.top_ids[at][:k], lps.top_logprobs[at][:k])]
    return TokenLogprob(token, float(lps.chosen[at]), top)


def _splice_rows(big: Any, small: Any, dsts: jax.Array, n: jax.Array) -> Any:
    """Rows 0..n-1 of ``small`` -> rows ``dsts[:n]`` of ``big`` (``_splice`` each), in one dispatch:
    a newcomer's first token waits for every splice of its batch."""
    return jax.lax.fori_loop(0, n, lambda j, b: _splice(b, small, j, dsts[j]), big)


def _splice(big: Any, small: Any, src: jax.Array, dst: jax.Array) -> Any:
    """Row ``src`` of ``small`` (length L) -> row ``dst`` of ``big`` at slots [index - L, index)."""
    index = _cache_index(big)

    def leaf(path, b, s):
        name = path[-1].key
        if name == "index":
            return b
        row = jax.lax.dynamic_index_in_dim(s, src, axis=0, keepdims=True).astype(b.dtype)
        if name == "segment_ids":  # forget the row's previous request entirely
            b = jax.lax.dynamic_update_index_in_dim(b, jnp.zeros(b.shape[1:], b.dtype), dst, axis=0)
        axis = SLOT_AXIS[name]
        start = [0] * b.ndim
        start[0], start[axis] = dst, index - s.shape[axis]
        return jax.lax.dynamic_update_slice(b, row, start)

    return jax.tree_util.tree_map_with_path(leaf, big, small)


class Scheduler:
    """Runs ``Engine`` steps in a background thread for requests submitted from any thread."""

    def __init__(self, engine: Engine, *, max_batch: int = 8, max_len: int | None = None,
                 decode_steps: int | None = None) -> None:
        decode_steps = DECODE_STEPS if decode_steps is None else decode_steps
        if decode_steps < 1:
            raise UserError(f"decode_steps must be >= 1, got {decode_steps}")
        self.engine = engine
        self.max_batch = max_batch
        self.decode_steps = decode_steps
        self.max_len = min(max_len or engine.max_len, engine.max_len)
        self.slots: list[Job | None] = [None] * max_batch
        self.waiting: "queue.Queue[Job]" = queue.Queue()
        self.index = 0
        self.cache = None
        self._splice_rows = jax.jit(_splice_rows, donate_argnums=(0,))
        self.capacity = 0  # slots of the cache now (a length bucket <= max_len)
        self._thread: threading.Thread | None = None
        self._running = False
        self.steps = 0  # decode steps run (each one serves every live request)
        self.dispatches = 0  # decode chunks dispatched (each runs up to ``decode_steps`` steps)
        self.compactions = 0  # times the full cache was shifted left past finished requests
        self.resizes = 0  # times the cache was grown or shrunk

    # ----- public ------------------------------------------------------------------------------

    def check(self, prompt: Prompt, sampling: SamplingParams) -> SamplingParams:
        """Validate lengths now (so the caller can answer 400); returns sampling with max_new clamped."""
        n = len(prompt.ids)
        if n >= self.max_len:
            raise UserError(f"prompt is too long: {n} tokens, the limit is {self.max_len - 1}")
        max_new = min(sampling.max_new_tokens, self.max_len - n)
        return dataclasses.replace(sampling, max_new_tokens=max_new, min_tokens=min(sampling.min_tokens, max_new))

    def submit(self, prompt: Prompt, sampling: SamplingParams, emit: Callable[[Event], None]) -> Job:
        job = Job(prompt, self.check(prompt, sampling), emit)
        self.waiting.put(job)
        return job

    def start(self) -> "Scheduler":
        self._running = True
        self._thread = threading.Thread(target=self._loop, name="allava-scheduler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._running = False
        if self._thread:
            self._thread.join(timeout=30)

    def warmup(self) -> None:
        """Compile the decode step and a text-only prefill before the first request arrives."""
        done = threading.Event()
        self.submit(Prompt([self.engine.eos_id]), SamplingParams(max_new_tokens=2), lambda e: e.finish_reason and done.set())
        done.wait(timeout=600)

    # ----- the loop ----------------------------------------------------------------------------

    def _loop(self) -> None:
        while self._running:
            try:
                self._admit()
                if not any(self.slots):
                    try:
                        job = self.waiting.get(timeout=0.05)
                    except queue.Empty:
                        continue
                    self.waiting.put(job)  # wake up: admit it on the next round
                    continue
                self._decode_chunk()
            except Exception as e:  # keep serving: fail the requests in flight, start clean
                log.exception("scheduler step failed")
                for i, job in enumerate(self.slots):
                    if job is not None:
                        job.emit(Event(finish_reason="error", error=f"{type(e).__name__}: {e}"))
                        self.slots[i] = None
                self.cache = None

    def _new_cache(self, capacity: int) -> None:
        self.cache = jax.jit(lambda: init_cache(self.engine.config, self.max_batch, capacity))()
        self.index, self.capacity = 0, capacity

    def _capacity_for(self, slots: int) -> int:
        """The cache length bucket that holds ``slots`` (decode reads every slot of the cache each
        step, so it is kept near what the live requests fill, not at ``max_len``)."""
        return self.engine.cache_slots(slots, self.max_len)

    def _relayout(self, d: int, capacity: int) -> None:
        """Shift the cache ``d`` slots left (negative: right) into ``capacity`` slots."""
        if d == 0 and capacity == self.capacity:
            return
        self.cache = self.engine.move_cache(self.cache, jnp.asarray(d, jnp.int32), capacity)
        self.compactions += d > 0
        self.resizes += capacity != self.capacity
        for job in self.slots:
            if job is not None:
                job.start -= d
        self.index -= d
        self.capacity = capacity

    def _admit(self) -> None:
        free = [i for i, job in enumerate(self.slots) if job is None]
        jobs: list[Job] = []
        while len(jobs) < len(free):
            try:
                job = self.waiting.get_nowait()
            except queue.Empty:
                break
            if not job.cancelled:
                jobs.append(job)
        if not jobs:
            return
        engine = self.engine
        b = bucket_batch(len(jobs), self.max_batch)
        length = min(bucket_length(max(len(j.prompt.ids) for j in jobs)), self.max_len)
        batch = make_batch([j.prompt for j in jobs], b, length, engine.config.vision)
        arrays = SamplingArrays.from_params([j.sampling for j in jobs], b)
        first, lps, small = engine.prefill(
            engine.params, batch.tokens, batch.images, batch.image_mask, batch.segment_ids, batch.positions, arrays, cache_len=length,
            logprobs=any(j.wants_logprobs for j in jobs),
        )
        if self.cache is None:
            self._new_cache(self._capacity_for(length + self.decode_steps))
        if self.index < length or self.index + self.decode_steps > self.capacity:
            # The new rows' prompts must end at the shared index: make room before it (and a chunk
            # after it), dropping what no live request needs.
            oldest = min((job.start for job in self.slots if job is not None), default=self.index)
            target = max(self.index - oldest, length)  # the index afterwards
            self._relayout(self.index - target, self._capacity_for(target + self.decode_steps))
        dsts = np.zeros(self.max_batch, np.int32)
        dsts[: len(jobs)] = free[: len(jobs)]
        self.cache = self._splice_rows(self.cache, small, dsts, np.int32(len(jobs)))
        first, lps = np.asarray(first), jax.device_get(lps)
        for j, (job, slot) in enumerate(zip(jobs, free)):
            n = len(job.prompt.ids)
            job.start, job.position, job.token = self.index - n, n, int(first[j])
            job.stream = TextStream(engine.tokenizer, job.sampling.stop, job.sampling.min_tokens)
            self.slots[slot] = job
            self._accept(slot, [job.token], [_logprob_entry(lps, j, job.token, job.sampling.logprobs)])

    def _decode_chunk(self) -> None:
        """Up to ``decode_steps`` decode steps for every live row in one dispatch, then hand out the
        tokens. A row that ends inside the chunk (stop token, length) stops there on the device; a
        stop string is found on the host, and the tokens after it are dropped."""
        oldest = min(job.start for job in self.slots if job is not None)
        fits = self._capacity_for(self.index - oldest + self.decode_steps)  # live entries + a chunk
        if self.index + self.decode_steps > self.capacity or fits < self.capacity // 2:
            self._relayout(oldest, fits)  # compact past finished requests; grow or shrink
        b, k = self.max_batch, self.decode_steps
        tokens, positions, generated = (np.zeros(b, np.int32) for _ in range(3))
        live, max_new = np.zeros(b, bool), np.ones(b, np.int32)
        params = [SamplingParams()] * b
        for i, job in enumerate(self.slots):
            if job is not None:
                tokens[i], positions[i], generated[i], params[i] = job.token, job.position, job.generated, job.sampling
                live[i], max_new[i] = True, job.sampling.max_new_tokens
        n_steps = min(k, self.capacity - self.index, int((max_new - generated)[live].max()))
        assert n_steps > 0, "a live request outgrew the cache"
        state = {
            "cache": self.cache, "token": tokens, "pos": positions, "live": live, "done": ~live,
            "generated": generated, "max_new": max_new, "out": np.zeros((b, k), np.int32), "step": np.int32(0),
        }
        if any(job is not None and job.wants_logprobs for job in self.slots):
            state.update(chosen=np.zeros((b, k), np.float32), top_ids=np.zeros((b, k, MAX_TOP_LOGPROBS), np.int32),
                         top_logprobs=np.zeros((b, k, MAX_TOP_LOGPROBS), np.float32))
        state = self.engine.decode_chunk(state, SamplingArrays.from_params(params, b), n_steps, self._newcomer_waits)
        self.cache = state.pop("cache")
        host = jax.device_get(state)
        ran = int(host["step"])
        self.index += ran
        self.steps += ran
        self.dispatches += 1
        lps = TokenLogprobs(host["chosen"], host["top_ids"], host["top_logprobs"]) if "chosen" in host else None
        for i, job in enumerate(self.slots):
            if job is None:
                continue
            ids = host["out"][i, :ran].tolist()
            entries = [_logprob_entry(lps, (i, t), ids[t], job.sampling.logprobs) for t in range(ran)]
            job.position += ran
            job.token = ids[-1]
            self._accept(i, ids, entries)

    def _newcomer_waits(self) -> bool:
        """Whether the running chunk should end now: a request waits and a slot is free for it
        (so its first token waits one decode step, not a whole chunk, as in vLLM's one-step
        scheduling; with every slot taken the chunk runs on). Only this thread changes the slots,
        and it waits for the chunk's results while the chunk asks."""
        return None in self.slots and not self.waiting.empty()

    def _accept(self, slot: int, tokens: list[int], logprobs: list[TokenLogprob | None]) -> None:
        """Hand sampled tokens to their request as one event; free the slot when the request is over.

        Every token counts as generated, a final stop token too (as in vLLM's usage); with
        ``ignore_eos`` stop tokens are ordinary (invisible, special) tokens. Tokens after the
        one that ends the request are dropped."""
        job = self.slots[slot]
        if job.cancelled:
            self.slots[slot] = None
            return
        delta, finish, taken = "", None, 0
        for token in tokens:
            taken += 1
            job.generated += 1
            if token in self.engine.stop_ids and not job.sampling.ignore_eos:
                finish = "stop"
                break
            delta += job.stream.push(token)
            if job.stream.stopped:
                finish = "stop"
            elif job.generated >= job.sampling.max_new_tokens:
                finish = "length"
            if finish:
                break
        entries = None if logprobs[0] is None else logprobs[:taken]
        if finish is None:
            job.emit(Event(delta, taken, entries))
            return
        delta += job.stream.finish()
        job.emit(Event(delta, taken, entries, finish, len(job.prompt.ids), job.generated))
        self.slots[slot] = None
