"""The OpenAI-compatible HTTP server: ``/v1/chat/completions`` (streaming and not), ``/v1/models``.

Request handlers only parse and validate (turning every problem into a 4xx with a clear message);
generation happens in the ``Scheduler`` thread, which batches all requests in flight into shared
decode steps. Image decoding runs in a worker thread so it never stalls the event loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from allava_jax.infer import openai_api as api
from allava_jax.infer.scheduler import Event, Scheduler

log = logging.getLogger(__name__)


def create_app(scheduler: Scheduler, model_name: str, limits: api.ServerLimits = api.ServerLimits()) -> FastAPI:
    app = FastAPI(title="allava-jax", docs_url=None, redoc_url=None)
    engine = scheduler.engine
    created = int(time.time())

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        log.info("rejected %s: %s", request.url.path, exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": sum(j is not None for j in scheduler.slots), "waiting": scheduler.waiting.qsize()}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "allava-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise api.ApiError(400, "the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise api.ApiError(400, "the request body must be a JSON object")
        if body.get("model") != model_name:
            raise api.ApiError(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")
        sampling = api.parse_sampling(body, limits)
        rounds, images = await run_in_threadpool(api.parse_messages, body.get("messages"), limits, engine.config.vision.image_size)
        prompt = api.build_prompt(engine, rounds, images)
        try:
            sampling = scheduler.check(prompt, sampling)
        except ValueError as e:
            raise api.ApiError(400, str(e), "messages", "context_length_exceeded") from None

        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Event] = asyncio.Queue()
        job = scheduler.submit(prompt, sampling, lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        cid = api.completion_id()
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return StreamingResponse(_sse(job, events, cid, model_name, include_usage), media_type="text/event-stream")
        try:
            parts = []
            while True:
                event = await events.get()
                parts.append(event.delta)
                if event.finish_reason:
                    break
        except asyncio.CancelledError:
            job.cancelled = True
            raise
        if event.finish_reason == "error":
            return JSONResponse({"error": {"message": event.error, "type": "server_error", "param": None, "code": None}}, status_code=500)
        return api.chat_completion(cid, model_name, "".join(parts), event.finish_reason, event.prompt_tokens, event.completion_tokens)

    return app


async def _sse(job, events: asyncio.Queue, cid: str, model: str, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""

    def line(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    try:
        yield line(api.chat_chunk(cid, model, {"role": "assistant", "content": ""}))
        while True:
            event = await events.get()
            if event.finish_reason == "error":
                yield line({"error": {"message": event.error, "type": "server_error"}})
                break
            if event.delta:
                yield line(api.chat_chunk(cid, model, {"content": event.delta}))
            if event.finish_reason:
                yield line(api.chat_chunk(cid, model, {}, event.finish_reason))
                if include_usage:
                    usage = {
                        "prompt_tokens": event.prompt_tokens,
                        "completion_tokens": event.completion_tokens,
                        "total_tokens": event.prompt_tokens + event.completion_tokens,
                    }
                    chunk = api.chat_chunk(cid, model, {}, None, usage)
                    chunk["choices"] = []
                    yield line(chunk)
                break
        yield "data: [DONE]\n\n"
    finally:  # client went away (or we finished): stop generating for it
        job.cancelled = True
