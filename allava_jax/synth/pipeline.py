"""Run a synthesis: resume from the journal, call the model (online or Batch API), export outputs.

Online route: ``concurrency`` workers pull items from one queue (that is the concurrency limit),
pass the requests/min and tokens/min limiter, and call the SDK, which retries transient errors
itself. Unusable outputs are re-requested up to ``max_attempts`` per item, counted across runs.
What a request is and what makes its answer usable is the mode's :class:`work.Work`:
``work.ChatWork`` (laion, vflan, text: chat completions) or ``images.ImageWork`` (the Images API);
the loop, budget, limiter and error handling here are the same for all of them.
"""

from __future__ import annotations

import asyncio
import json
import logging

import openai

from .client import (
    FATAL_ERRORS,
    FatalAPIError,
    error_reason,
    is_retryable_later,
    make_client,
)
from .config import SynthConfig
from .images import IMAGES_MODE, ImageWork, check_images_config
from .items import Item
from allava_jax import storage
from allava_jax.files import atomic_write

from .journal import Journal
from .limits import RateLimiter
from .prompts import load_prompts
from .records import export
from .redact import redact
from .usage import Budget, Price, load_image_price, load_price
from .work import ChatWork, Progress, Work

log = logging.getLogger(__name__)
JOURNAL_FILE = "journal.jsonl"
RUN_FILE = "run.json"


async def _process(work: Work, item: Item, client: openai.AsyncOpenAI, limiter: RateLimiter,
                   budget: Budget) -> bool:
    """Request ``item`` until it is done or its attempts are used up; False if the budget stopped it."""
    cfg = work.cfg
    try:
        req = await asyncio.to_thread(work.prepare, item)
    except Exception as e:  # noqa: BLE001 - unreadable image and the like: nothing was paid, retrying will not help
        work.fail(item, redact(f"input_error: {type(e).__name__}: {e}"))
        return True
    reason, raw = f"unusable output after {cfg.max_attempts} attempts", None
    for _ in range(work.attempts_left(item)):
        est = work.request_cost(req)
        if not budget.reserve(est):
            return False
        try:  # the reservation holds until the response's cost is journaled
            try:
                await limiter.acquire(req.tokens)
                resp = await work.call(client, item, req)
            except FATAL_ERRORS as e:
                raise FatalAPIError(error_reason(e)) from None
            except openai.APIError as e:
                work.fail(item, error_reason(e), retryable=is_retryable_later(e))
                return True
            bad, text = await work.receive(client, item, resp)
        finally:
            budget.release(est)
        if bad is None:
            return True
        reason, raw = f"unusable output after {cfg.max_attempts} attempts; last: {bad}", text
    work.fail(item, reason, raw=raw)
    return True


async def run_online(work: Work, todo: list[Item], client: openai.AsyncOpenAI) -> str | None:
    """Process ``todo`` with ``cfg.concurrency`` workers; returns a stop reason or None."""
    queue = iter(todo)
    limiter = RateLimiter(work.cfg.rpm, work.cfg.tpm)
    budget = Budget(work.cfg.max_cost, lambda: work.journal.state.totals.cost)
    stopped: list[str] = []

    async def worker() -> None:
        for item in queue:  # a shared iterator: each item goes to exactly one worker
            if stopped or not await _process(work, item, client, limiter, budget):
                stopped.append("budget")
                return

    try:
        async with asyncio.TaskGroup() as tg:
            for _ in range(max(1, min(work.cfg.concurrency, len(todo)))):
                tg.create_task(worker())
    except* FatalAPIError as eg:
        raise eg.exceptions[0] from None
    return f"--max-cost ${work.cfg.max_cost:g} reached" if stopped else None


async def _run_route(work: Work, todo: list[Item], client: openai.AsyncOpenAI) -> str | None:
    """The online or batch route; closes the client's connections inside the event loop."""
    try:
        if work.cfg.batch:
            from .batch import run_batch
            return await run_batch(work, todo, client)
        return await run_online(work, todo, client)
    finally:
        await client.close()
        await work.aclose()


def _check_run_file(cfg: SynthConfig) -> None:
    """Refuse to mix modes in one output directory; remember the settings of the first run."""
    path = storage.as_path(cfg.out) / RUN_FILE
    info = {"mode": cfg.mode, "model": cfg.model, "seed": cfg.seed}
    if path.exists():
        old = json.loads(path.read_text())
        if old.get("mode") != cfg.mode:
            raise ValueError(f"{cfg.out} holds a {old.get('mode')!r} run; use another --out for {cfg.mode!r}")
        if old.get("model") != cfg.model:
            log.warning("%s was started with model %s; continuing with %s", cfg.out, old.get("model"), cfg.model)
    else:
        atomic_write(path, json.dumps(info, indent=1))


def _load_price(cfg: SynthConfig) -> tuple[Price | float | None, str]:
    """The mode's price (a token :class:`Price`, or USD per image), and the flags that set it."""
    if cfg.mode == IMAGES_MODE:
        return load_image_price(cfg.model, cfg.prices, cfg.price_image), "--price-image"
    return load_price(cfg.model, cfg.prices, cfg.price_in, cfg.price_out), "--price-in/--price-out"


def _checked_price(cfg: SynthConfig) -> Price | float | None:
    """Settings and price checked before anything is written or requested."""
    if cfg.mode == IMAGES_MODE:
        check_images_config(cfg)
    price, flags = _load_price(cfg)
    if price is None:
        if cfg.max_cost is not None:
            raise ValueError(f"--max-cost needs a price for {cfg.model!r}: pass {flags} or --prices")
        log.warning("no price known for %s: cost will show as 0 (pass %s)", cfg.model, flags)
    return price


def run(cfg: SynthConfig, items: list[Item]) -> dict:
    """Synthesize ``items`` into ``cfg.out``; returns a summary dict (also printed by the CLI)."""
    prompts = load_prompts(cfg.prompts_dir)
    price = _checked_price(cfg)
    storage.check_access(cfg.out, write=True)
    out = storage.as_path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with Journal(out / JOURNAL_FILE, flush_every_s=cfg.journal_flush_s) as journal:
        _check_run_file(cfg)
        work_class = ImageWork if cfg.mode == IMAGES_MODE else ChatWork
        work = work_class(cfg, prompts, journal, price)
        st = journal.state
        selected = items[: cfg.limit] if cfg.limit else items
        todo = [it for it in selected if not st.finished(it.id, cfg.retry_failed)]
        if cfg.dry_run:
            return {"dry_run": work.dry_run(todo, len(selected) - len(todo))}
        stop = None
        work.progress = Progress(len(selected), journal, cfg.progress)
        try:
            if todo:
                client = make_client(cfg.base_url, cfg.timeout, cfg.max_retries)
                stop = asyncio.run(_run_route(work, todo, client))
        finally:
            work.progress.close()
            counts = export(out, cfg.mode, items, st)
        t = st.totals
        pending = sum(1 for it in selected if not st.finished(it.id))
        return {"done": len(st.done), "failed": len(st.failed), "pending": pending, "stopped": stop,
                "requests": t.requests, "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens, "images": t.images, "cost": round(t.cost, 6),
                "files": counts}
