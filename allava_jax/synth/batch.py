"""The OpenAI Batch API route: upload, create, poll, download, parse; resumable from the journal.

Order of journal writes makes every crash point safe: the uploaded file id and its items are
journaled before the batch is created, the batch id right after. A run that finds a journaled file
without a batch id looks the batch up by ``input_file_id`` before creating one, so a crash between
create and journal never pays for the same items twice. Result lines already journaled for a batch
are skipped when a half-processed batch is processed again.
"""

from __future__ import annotations

import asyncio
import json
import logging

import openai

from .client import FATAL_ERRORS, FatalAPIError, error_reason
from .items import Item
from .work import ChatWork

log = logging.getLogger(__name__)
TERMINAL = ("completed", "failed", "expired", "cancelled")
ENDPOINT = "/v1/chat/completions"


async def _find_batch_for_file(client: openai.AsyncOpenAI, file_id: str, scan: int = 2000) -> str | None:
    """A batch created from ``file_id`` whose id never reached the journal (crash right after create)."""
    n = 0
    async for b in client.batches.list(limit=100):
        if b.input_file_id == file_id and b.status not in ("failed", "cancelled", "cancelling"):
            return b.id
        n += 1
        if n >= scan:
            break
    return None


async def _create(work: ChatWork, client: openai.AsyncOpenAI, file_id: str) -> None:
    b = await client.batches.create(input_file_id=file_id, endpoint=ENDPOINT, completion_window="24h",
                                    metadata={"created_by": "allava_jax.synth"})
    work.journal.append({"k": "batch", "file_id": file_id, "batch_id": b.id})
    log.info("created batch %s", b.id)


async def _submit(work: ChatWork, client: openai.AsyncOpenAI, items: list[Item]) -> str | None:
    """Upload and create batches for ``items`` in chunks; returns a stop reason if the budget ends it."""
    cfg, st = work.cfg, work.journal.state
    reserved = sum(e.get("est_cost", 0.0) for f, e in st.batch_files.items() if st.batches.get(f) not in st.closed)
    i, budget_hit = 0, False
    while i < len(items) and not budget_hit:
        lines, ids, size, est = [], [], 0, 0.0
        while i < len(items) and len(ids) < cfg.batch_size:
            item = items[i]
            try:
                req = await asyncio.to_thread(work.prepare, item)
            except Exception as e:  # noqa: BLE001 - unreadable image and the like: the item fails, the run goes on
                work.fail(item, f"input_error: {type(e).__name__}: {e}")
                i += 1
                continue
            line = json.dumps({"custom_id": item.id, "method": "POST", "url": ENDPOINT, "body": req.body})
            c = work.est_cost(req.est_prompt, batch=True)
            if ids and size + len(line) + 1 > cfg.batch_max_bytes:
                break
            if cfg.max_cost is not None and st.totals.cost + reserved + est + c > cfg.max_cost:
                budget_hit = True  # nothing more fits in the budget
                break
            lines.append(line)
            ids.append(item.id)
            size += len(line) + 1
            est += c
            i += 1
        if not ids:
            break
        f = await client.files.create(file=("synth_batch.jsonl", ("\n".join(lines) + "\n").encode(), "application/jsonl"),
                                      purpose="batch")
        work.journal.append({"k": "batch_file", "file_id": f.id, "ids": ids, "est_cost": est})
        reserved += est
        await _create(work, client, f.id)
    return f"--max-cost ${cfg.max_cost:g} reached" if budget_hit else None


def _body_of(line: dict) -> tuple[dict | None, str | None]:
    """(chat completion body, None) for a successful result line, else (None, error text)."""
    resp = line.get("response") or {}
    if resp.get("status_code") == 200 and isinstance(resp.get("body"), dict):
        return resp["body"], None
    err = line.get("error") or (resp.get("body") or {}).get("error") or {}
    return None, f"batch request error {resp.get('status_code', '')}: {err.get('code', '')} {err.get('message', '')}".strip()


async def _process(work: ChatWork, client: openai.AsyncOpenAI, batch: openai.types.Batch, file_entry: dict,
                   by_id: dict[str, Item]) -> None:
    """Journal every result of a finished batch, then close it."""
    st, bid = work.journal.state, batch.id
    seen: set[str] = set()
    for fid in (batch.output_file_id, batch.error_file_id):
        if not fid:
            continue
        text = (await client.files.content(fid)).text
        for raw_line in text.splitlines():
            if not raw_line.strip():
                continue
            line = json.loads(raw_line)
            cid = line.get("custom_id")
            item = by_id.get(cid)
            if item is None or cid not in file_entry["ids"]:
                log.warning("batch %s: result for unknown custom_id %r ignored", bid, cid)
                continue
            seen.add(cid)
            if (bid, cid) in st.batch_lines or cid in st.done:
                continue  # journaled before a crash
            body, err = _body_of(line)
            if body is None:
                work.journal.append({"k": "bad", "id": cid, "batch": bid, "reason": err, "raw": None})
                continue
            choice = (body.get("choices") or [{}])[0]
            work.handle(item, (choice.get("message") or {}).get("content"), choice.get("finish_reason"),
                        body.get("usage"), body.get("id"), batch_id=bid)
    for cid in file_entry["ids"]:
        if cid not in seen and (bid, cid) not in st.batch_lines and cid not in st.done:
            # A failed/expired batch without a line for the item: counts as an attempt, so it ends.
            work.journal.append({"k": "bad", "id": cid, "batch": bid,
                                 "reason": f"batch {batch.status} without a result", "raw": None})
    work.journal.append({"k": "batch_closed", "batch_id": bid, "status": batch.status})
    log.info("batch %s %s: processed", bid, batch.status)


async def run_batch(work: ChatWork, todo: list[Item], client: openai.AsyncOpenAI) -> str | None:
    """Submit, poll and process batches until every item is done or failed (or the budget stops it)."""
    st, cfg = work.journal.state, work.cfg
    by_id = {it.id: it for it in todo}
    # --retry-failed re-requests failures from earlier runs, not ones this run journals itself.
    earlier_failures = {i: st.failed[i] for i in by_id if i in st.failed}
    stop: str | None = None
    try:
        while True:
            for file_id in [f for f in st.batch_files if f not in st.batches]:
                found = await _find_batch_for_file(client, file_id)
                if found:
                    work.journal.append({"k": "batch", "file_id": file_id, "batch_id": found})
                    log.info("adopted batch %s created before a crash", found)
                else:
                    await _create(work, client, file_id)
            in_batches = st.open_batch_items()
            pending = []
            for it in todo:
                new_failure = it.id in st.failed and st.failed[it.id] is not earlier_failures.get(it.id)
                if st.finished(it.id, cfg.retry_failed) or new_failure or it.id in in_batches:
                    continue
                if work.attempts_left(it) == 0:
                    work.fail(it, f"unusable output after {cfg.max_attempts} attempts")
                    continue
                pending.append(it)
            if pending and stop is None:
                stop = await _submit(work, client, pending)
            open_ = {f: b for f, b in st.batches.items() if b not in st.closed}
            if not open_:
                return stop
            progressed = False
            for file_id, bid in open_.items():
                b = await client.batches.retrieve(bid)
                if b.status in TERMINAL:
                    await _process(work, client, b, st.batch_files[file_id], by_id)
                    progressed = True
            if not progressed:
                await asyncio.sleep(cfg.poll_interval)
    except FATAL_ERRORS as e:
        raise FatalAPIError(error_reason(e)) from None
