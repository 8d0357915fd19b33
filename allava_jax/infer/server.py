"""The OpenAI-compatible HTTP server: ``/v1/chat/completions`` (streaming and not), ``/v1/models``,
``/health`` and Prometheus ``/metrics``.

Request handlers only parse and validate (turning every problem into a 4xx with an OpenAI error
body); generation happens in the ``Scheduler`` thread, which batches all requests in flight into
shared decode steps, a request's ``n`` choices as ``n`` sequences. Image decoding runs in a worker
thread so it never stalls the event loop.

Streaming follows OpenAI's chunk format. There is no role-only chunk: each choice's first chunk
carries the role with its first text (vLLM's ``bench serve`` takes the first chunk as the first
token). ``stream_options.include_usage`` adds a last chunk with ``choices: []`` and the usage.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from allava_jax.infer import openai_api as api
from allava_jax.infer.engine import Prompt
from allava_jax.infer.metrics import CONTENT_TYPE, SequenceTimer, ServerMetrics
from allava_jax.infer.sampling import SamplingParams
from allava_jax.infer.scheduler import Event, Scheduler

log = logging.getLogger(__name__)


def create_app(scheduler: Scheduler, model_name: str, limits: api.ServerLimits = api.ServerLimits()) -> FastAPI:
    app = FastAPI(title="allava-jax", docs_url=None, redoc_url=None)
    engine = scheduler.engine
    metrics = ServerMetrics(scheduler, model_name)
    created = int(time.time())

    @app.exception_handler(api.ApiError)
    async def _api_error(request: Request, exc: api.ApiError) -> JSONResponse:
        log.info("rejected %s: %s", request.url.path, exc.message)
        return _api_error_response(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        """Unknown routes and wrong methods get an OpenAI error body too."""
        return _api_error_response(api.ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "active": sum(j is not None for j in scheduler.slots), "waiting": scheduler.waiting.qsize()}

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "allava-jax"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = await _json_object(request)
        if body.get("model") != model_name:
            raise api.ApiError(404, f"model {body.get('model')!r} does not exist; this server serves {model_name!r}", "model", "model_not_found")
        req = api.parse_request(body, limits)
        rounds, images = await run_in_threadpool(api.parse_messages, body.get("messages"), limits, engine.config.vision)
        prompt = api.build_prompt(engine, rounds, images)
        try:
            sampling = scheduler.check(prompt, req.sampling)
        except ValueError as e:
            raise api.ApiError(400, str(e), "messages", "context_length_exceeded") from None
        choices = Choices(scheduler, metrics, prompt, req.choices(sampling))
        reply = api.Reply(api.completion_id(), model_name, engine.tokenizer, req.tokens_as_ids)
        if req.stream:
            return StreamingResponse(_sse(choices, reply, req.include_usage), media_type="text/event-stream")
        return await _complete(choices, reply)

    return app


def _api_error_response(exc: api.ApiError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


async def _json_object(request: Request) -> dict:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise api.ApiError(400, "the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise api.ApiError(400, "the request body must be a JSON object")
    return body


class Choices:
    """The ``n`` sequences of one request in the scheduler, their events merged into one queue."""

    def __init__(self, scheduler: Scheduler, metrics: ServerMetrics, prompt: Prompt, samplings: list[SamplingParams]) -> None:
        loop = asyncio.get_running_loop()
        self.prompt_tokens = len(prompt.ids)
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.jobs = [scheduler.submit(prompt, s, self._emitter(loop, i, metrics.track(self.prompt_tokens)))
                     for i, s in enumerate(samplings)]

    def _emitter(self, loop: asyncio.AbstractEventLoop, index: int, timer: SequenceTimer) -> Callable[[Event], None]:
        def emit(event: Event) -> None:  # runs in the scheduler thread
            timer.observe(event)
            loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))

        return emit

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished (or one failed)."""
        live = len(self.jobs)
        while live:
            index, event = await self.queue.get()
            yield index, event
            if event.finish_reason == "error":
                return
            live -= bool(event.finish_reason)

    def cancel(self) -> None:
        """Stop generating for this request (the client went away, or it is over)."""
        for job in self.jobs:
            job.cancelled = True


def _server_error(event: Event) -> dict:
    return {"error": {"message": event.error, "type": "server_error", "param": None, "code": None}}


async def _complete(choices: Choices, reply: api.Reply) -> Any:
    """Wait for every choice; one ``chat.completion``."""
    n = len(choices.jobs)
    texts: list[list[str]] = [[] for _ in range(n)]
    logprobs: list[list | None] = [None] * n
    finishes: list[str] = [""] * n
    completion_tokens = 0
    try:
        async for i, event in choices.events():
            if event.finish_reason == "error":
                return JSONResponse(_server_error(event), status_code=500)
            texts[i].append(event.delta)
            if event.logprobs is not None:
                logprobs[i] = (logprobs[i] or []) + event.logprobs
            if event.finish_reason:
                finishes[i] = event.finish_reason
                completion_tokens += event.completion_tokens
    finally:
        choices.cancel()
    return reply.completion(["".join(t) for t in texts], finishes, logprobs, choices.prompt_tokens, completion_tokens)


async def _sse(choices: Choices, reply: api.Reply, include_usage: bool) -> AsyncIterator[str]:
    """Server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``."""

    def line(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    started: set[int] = set()
    completion_tokens = 0
    try:
        async for i, event in choices.events():
            if event.finish_reason == "error":
                yield line(_server_error(event))
                break
            if not (event.delta or event.logprobs or event.finish_reason):
                continue  # a token whose text is held back (stop-string prefix, trailing space)
            delta = {"content": event.delta} if event.delta or event.logprobs or i not in started else {}
            if i not in started:
                delta = {"role": "assistant", **delta}
                started.add(i)
            completion_tokens += event.completion_tokens
            yield line(reply.chunk([reply.chunk_choice(i, delta, event.finish_reason, event.logprobs)], with_usage=include_usage))
        else:
            if include_usage:
                yield line(reply.chunk([], api.usage(choices.prompt_tokens, completion_tokens), with_usage=True))
        yield "data: [DONE]\n\n"
    finally:  # client went away (or we finished): stop generating for it
        choices.cancel()
