"""A fault-injecting OpenAI-compatible server for tests and the benchmark (chat, images, batches).

Serves ``/v1/chat/completions``, ``/v1/images/generations`` (with ``GET /v1/images/files/{name}``
for ``url`` answers), ``/v1/files`` (upload, content) and ``/v1/batches`` (create, retrieve, list)
on 127.0.0.1. Chat answers are in the tagged format of our prompts with varied but well-formed
markdown, tag and numbering styles; image answers are small PNGs (at most 64 px a side, whatever
size is asked: tests stay cheap) as ``b64_json`` or as URLs. Faults, drawn per request from a
seeded generator: 429 with Retry-After, 500, a response slower than the client timeout, malformed
output (chat: truncated, wrong format; images: bad base64 or a missing URL, bytes that are not an
image, a truncated PNG, fewer images than asked, and with ``echo_key`` a PNG holding the key).
Counts requests per item (``X-Synth-Item-Id`` header online, ``custom_id`` in batches) and
delivered answers, so tests can assert that nothing finished is requested again.

Run standalone: ``python -m allava_jax.synth.fake_server --latency 1`` prints ``READY <base url>``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import email
import email.policy
import io
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Self
from urllib.parse import quote

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from PIL import Image, PngImagePlugin

NUMBER_STYLES = ("{n}. ", "{n}) ", "({n}) ", "Q{n}: ", "Question {n} - ", "[{n}] ", "**{n}.** ", "- ", "{n}.  ")
TAG_STYLES = ("<{t}>", "**<{t}>**", "< {T} >", "<{T}>", "`<{t}>`")
END_STYLES = ("</{t}>", "**</{t}>**", "</ {T} >", "</{T}>", "`</{t}>`")


@dataclass
class Faults:
    """Which faults to inject: ``rate`` of requests fault, never more than ``max_consecutive`` in a
    row for one item (so faults are transient); ``poison`` items always get malformed output."""

    rate: float = 0.0
    kinds: tuple[str, ...] = ("429", "500", "slow", "malformed")
    slow_s: float = 5.0
    retry_after_ms: int = 20
    max_consecutive: int = 2
    poison: frozenset = frozenset()
    echo_key: bool = False  # put the caller's key into error bodies and bad outputs (leak test)
    seed: int = 0


@dataclass
class FakeState:
    """What the server saw; read by tests."""

    faults: Faults = field(default_factory=Faults)
    latency: float = 0.0
    api_key: str | None = None  # if set, requests must carry it
    batch_delay: float = 0.5  # seconds before a batch completes
    counts: Counter = field(default_factory=Counter)  # online requests per item (chat and images)
    arrivals: list = field(default_factory=list)  # monotonic arrival time of each online request
    batch_counts: Counter = field(default_factory=Counter)  # batch lines per custom_id
    delivered: Counter = field(default_factory=Counter)  # 200 responses per item (online + batch)
    images_delivered: Counter = field(default_factory=Counter)  # images in those responses per item
    image_files: dict = field(default_factory=dict)  # name -> bytes served for url answers
    image_fetches: Counter = field(default_factory=Counter)  # GETs per image file name
    usage: dict = field(default_factory=dict)  # response id -> usage
    faults_injected: Counter = field(default_factory=Counter)
    files: dict = field(default_factory=dict)
    batches: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _streak: Counter = field(default_factory=Counter)
    _ids: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.faults.seed)

    def next_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._ids):06d}"


def _user_text(messages: list[dict]) -> str:
    parts = []
    for m in messages:
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts.extend(p.get("text", "") for p in c if p.get("type") == "text")
    return "\n".join(parts)


def _mode(text: str) -> str:
    return "laion" if "<questions>" in text else "vflan" if "<caption>" in text else "text"


def well_formed(mode: str, rng: random.Random) -> str:
    """A valid response in a random formatting style."""
    s = rng.randrange(len(TAG_STYLES))

    def part(tag: str, body: str) -> str:
        b, e = TAG_STYLES[s].format(t=tag, T=tag.upper()), END_STYLES[s].format(t=tag, T=tag.upper())
        pad = rng.choice(("\n", "\n\n", " \n"))
        return f"{b}{pad}{body}{pad}{e}"

    caption = ("The photo shows a red bicycle leaning against a white brick wall, with a woman in a blue "
               "coat walking past on the left and morning light casting long shadows.")
    chunks = []
    if mode == "text":
        chunks.append("Here is my answer.\n")
    if mode != "text":
        chunks.append(part("caption", caption))
    if mode == "laion":
        style = rng.choice(NUMBER_STYLES)
        qs = "\n".join(style.format(n=n) + f"What does detail number {n} suggest about the scene?" for n in range(1, 6))
        chunks.append(part("questions", qs))
    chunks.append(part("answer", "Looking closely at the bicycle and the shadows, the scene is early morning;\n"
                                 "1. the light is low\n2. the street is quiet\nSo the answer is: a morning commute."))
    text = rng.choice(("\n", "\n\n")).join(chunks)
    return f"```\n{text}\n```" if rng.random() < 0.15 else text


def malformed(mode: str, rng: random.Random, key: str | None) -> tuple[str, str]:
    """(text, finish_reason) of an unusable response."""
    good = well_formed(mode, rng)
    kind = rng.randrange(4)
    leak = f" [debug auth={key}]" if key else ""
    if kind == 0:  # truncated mid-answer
        return good[: good.lower().rfind("</answer") - 5] + leak, "length"
    if kind == 1 and mode == "laion":  # only three questions
        return (f"<caption>\nA cat.{leak}\n</caption>\n<questions>\n1. a?\n2. b?\n3. c?\n</questions>\n"
                "<answer>\nyes\n</answer>"), "stop"
    if kind == 2 and mode != "text":  # empty caption
        return f"<caption>\n\n</caption>\n<questions>\n1. a\n</questions>\n<answer>\nx{leak}\n</answer>", "stop"
    return f"I'm sorry, I can't follow that format.{leak}", "stop"


def _completion(state: FakeState, model: str, text: str, finish: str, prompt_tokens: int, item: str) -> dict:
    rid = state.next_id("chatcmpl")
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(text) // 4 + 1,
             "total_tokens": prompt_tokens + len(text) // 4 + 1}
    with state.lock:
        state.usage[rid] = usage
        state.delivered[item] += 1
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}],
            "usage": usage}


def _draw_fault(state: FakeState, item: str, kinds: tuple[str, ...]) -> str | None:
    f = state.faults
    with state.lock:
        if item in f.poison:
            return "malformed"
        if f.rate and state._streak[item] < f.max_consecutive and state.rng.random() < f.rate:
            kind = state.rng.choice(kinds)
            state._streak[item] += 1
            state.faults_injected[kind] += 1
            return kind
        state._streak[item] = 0
        return None


@dataclass
class Arrival:
    """One online request after its fault draw; ``answer`` is set when the fault answers for it."""

    fault: str | None
    key: str | None  # the caller's key when ``echo_key`` (to leak back), else None
    rng: random.Random
    answer: JSONResponse | None = None


IMAGE_CAP = 64  # pixels a side at most, whatever size is asked


def _pixels(size: str | None) -> tuple[int, int]:
    """The actual pixel size answered for a requested ``WxH`` (``auto``/missing: the cap)."""
    try:
        w, h = (int(v) for v in (size or "").split("x"))
    except ValueError:
        w = h = IMAGE_CAP
    return max(1, min(w, IMAGE_CAP)), max(1, min(h, IMAGE_CAP))


def fake_png(size: tuple[int, int], rng: random.Random, text: dict[str, str] | None = None) -> bytes:
    """A small two-colour PNG (so images of one answer differ), optionally with text chunks."""
    im = Image.new("RGB", size, tuple(rng.randrange(256) for _ in range(3)))
    im.paste(tuple(rng.randrange(256) for _ in range(3)), (0, 0, max(1, size[0] // 2), size[1]))
    info = PngImagePlugin.PngInfo()
    for k, v in (text or {}).items():
        info.add_text(k, v)
    buf = io.BytesIO()
    im.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def malformed_images(images: list[bytes], size: tuple[int, int], rng: random.Random,
                     key: str | None, leak_as_text: bool = False) -> list[bytes | str]:
    """An unusable image answer: one image spoilt (or one missing); a ``str`` is not-base64 text.

    ``leak_as_text`` (with a ``key``) always spoils it with text that holds the key, the answer
    whose excerpt the client journals and so must redact."""
    bad: list[bytes | str] = list(images)
    k = rng.randrange(len(bad))
    leak = f" auth={key}" if key else ""
    kind = rng.randrange(2) if key and leak_as_text else rng.randrange(5 if key else 4)
    if kind == 0:
        bad[k] = "%% not base64 %%" + leak
    elif kind == 1:
        bad[k] = ("this is not an image" + leak).encode()
    elif kind == 2:
        bad[k] = images[k][: len(images[k]) // 2]  # truncated PNG
    elif kind == 3:
        del bad[k]  # fewer images than asked
    else:
        bad[k] = fake_png(size, rng, {"debug-auth": key})  # a valid PNG that holds the caller's key
    return bad


def _image_datum(state: FakeState, image: bytes | str, response_format: str, base_url: str) -> dict:
    """``{"b64_json"}`` or ``{"url"}`` for one image; not-base64 text becomes a URL that 404s."""
    if response_format == "b64_json":
        return {"b64_json": image if isinstance(image, str) else base64.b64encode(image).decode("ascii")}
    name = state.next_id("img") + ".png"
    if isinstance(image, bytes):
        state.image_files[name] = image
        return {"url": f"{base_url}v1/images/files/{name}"}
    return {"url": f"{base_url}v1/images/files/missing-{name}?note={quote(image)}"}


def _err(status: int, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": "fake_error", "code": str(status)}},
                        status_code=status, headers=headers)


def _prompt_tokens(body: dict) -> int:
    return len(json.dumps(body.get("messages", ""))) // 40 + 50


def make_app(state: FakeState) -> FastAPI:
    """The FastAPI app over ``state``."""
    app = FastAPI()

    def key_of(request: Request) -> str | None:
        auth = request.headers.get("authorization", "")
        return auth[7:] if auth.startswith("Bearer ") else None

    def denied(request: Request) -> JSONResponse | None:
        if state.api_key is not None and key_of(request) != state.api_key:
            return _err(401, f"Incorrect API key provided: {key_of(request)}")
        return None

    async def arrive(request: Request, item: str) -> Arrival:
        """Count an online request, add the latency, draw its fault; 429/500 faults answer at once."""
        with state.lock:
            state.counts[item] += 1
            state.arrivals.append(time.monotonic())
        if state.latency:
            await asyncio.sleep(state.latency)
        fault = _draw_fault(state, item, state.faults.kinds)
        key = key_of(request) if state.faults.echo_key else None
        a = Arrival(fault, key, random.Random(f"{state.faults.seed}:{item}:{state.counts[item]}"))
        if fault == "429":
            a.answer = _err(429, "Rate limit reached, slow down",
                            {"retry-after-ms": str(state.faults.retry_after_ms), "retry-after": "1"})
        elif fault == "500":
            a.answer = _err(500, "The server had an error" + (f" (request auth {key})" if key else ""))
        elif fault == "slow":
            await asyncio.sleep(state.faults.slow_s)
        return a

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        if (d := denied(request)) is not None:
            return d
        body = await request.json()
        item = request.headers.get("x-synth-item-id") or str(hash(_user_text(body["messages"])))
        a = await arrive(request, item)
        if a.answer is not None:
            return a.answer
        mode = _mode(_user_text(body["messages"]))
        text, finish = malformed(mode, a.rng, a.key) if a.fault == "malformed" else (well_formed(mode, a.rng), "stop")
        return _completion(state, body.get("model", "fake"), text, finish, _prompt_tokens(body), item)

    @app.post("/v1/images/generations")
    async def generate_images(request: Request):
        if (d := denied(request)) is not None:
            return d
        body = await request.json()
        item = request.headers.get("x-synth-item-id") or str(hash(body.get("prompt", "")))
        a = await arrive(request, item)
        if a.answer is not None:
            return a.answer
        size = _pixels(body.get("size"))
        images = [fake_png(size, a.rng) for _ in range(int(body.get("n") or 1))]
        if a.fault == "malformed":
            # A poison item's every answer leaks the key as text, so that a leak test sees the
            # redaction path whatever the shared fault draws and the kill point were.
            images = malformed_images(images, size, a.rng, a.key, leak_as_text=item in state.faults.poison)
        data = [_image_datum(state, img, body.get("response_format") or "url", str(request.base_url)) for img in images]
        with state.lock:
            state.delivered[item] += 1
            state.images_delivered[item] += len(data)
        return {"created": int(time.time()), "data": data}

    @app.get("/v1/images/files/{name}")
    async def image_file(name: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        with state.lock:
            state.image_fetches[name] += 1
        if name not in state.image_files:
            return _err(404, "no such image")
        return Response(state.image_files[name], media_type="image/png")

    @app.post("/v1/files")
    async def upload(request: Request):
        if (d := denied(request)) is not None:
            return d
        raw = await request.body()
        msg = email.message_from_bytes(b"Content-Type: " + request.headers["content-type"].encode() + b"\r\n\r\n" + raw,
                                       policy=email.policy.HTTP)
        fields = {part.get_param("name", header="content-disposition"): part for part in msg.iter_parts()}
        content = fields["file"].get_payload(decode=True)
        fid = state.next_id("file")
        obj = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
               "filename": fields["file"].get_filename() or "upload.jsonl",
               "purpose": fields["purpose"].get_payload(decode=True).decode(), "status": "processed"}
        state.files[fid] = (obj, content)
        return obj

    @app.get("/v1/files/{fid}/content")
    async def file_content(fid: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        if fid not in state.files:
            return _err(404, "no such file")
        return Response(state.files[fid][1], media_type="application/octet-stream")

    def batch_view(b: dict) -> dict:
        return {k: v for k, v in b.items() if not k.startswith("_")}

    def finish_batch(b: dict) -> None:
        out, err = [], []
        lines = [json.loads(ln) for ln in state.files[b["input_file_id"]][1].decode().splitlines() if ln.strip()]
        for ln in lines:
            cid, body = ln["custom_id"], ln["body"]
            fault = _draw_fault(state, cid, ("error", "malformed"))
            rid = state.next_id("batch_req")
            if fault == "error":
                err.append({"id": rid, "custom_id": cid, "response": {"status_code": 500, "request_id": rid,
                            "body": {"error": {"message": "server error", "type": "server_error"}}}, "error": None})
                continue
            rng = random.Random(f"{state.faults.seed}:{cid}:{state.batch_counts[cid]}")
            mode = _mode(_user_text(body["messages"]))
            text, finish = malformed(mode, rng, None) if fault == "malformed" else (well_formed(mode, rng), "stop")
            comp = _completion(state, body.get("model", "fake"), text, finish, _prompt_tokens(body), cid)
            out.append({"id": rid, "custom_id": cid, "response": {"status_code": 200, "request_id": rid, "body": comp},
                        "error": None})
        for name, rows in (("output_file_id", out), ("error_file_id", err)):
            if rows:
                fid = state.next_id("file")
                data = ("\n".join(json.dumps(r) for r in rows) + "\n").encode()
                state.files[fid] = ({"id": fid, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                                     "filename": f"{name}.jsonl", "purpose": "batch_output", "status": "processed"}, data)
                b[name] = fid
        b.update(status="completed", completed_at=int(time.time()),
                 request_counts={"total": len(lines), "completed": len(out), "failed": len(err)})

    @app.post("/v1/batches")
    async def create_batch(request: Request):
        if (d := denied(request)) is not None:
            return d
        req = await request.json()
        fid = req["input_file_id"]
        if fid not in state.files:
            return _err(404, "no such input file")
        for ln in state.files[fid][1].decode().splitlines():
            if ln.strip():
                state.batch_counts[json.loads(ln)["custom_id"]] += 1
        bid = state.next_id("batch")
        b = {"id": bid, "object": "batch", "endpoint": req["endpoint"], "input_file_id": fid,
             "completion_window": req["completion_window"], "status": "validating", "created_at": int(time.time()),
             "metadata": req.get("metadata"), "output_file_id": None, "error_file_id": None,
             "request_counts": {"total": 0, "completed": 0, "failed": 0}, "_t0": time.monotonic()}
        state.batches[bid] = b
        return batch_view(b)

    @app.get("/v1/batches/{bid}")
    async def get_batch(bid: str, request: Request):
        if (d := denied(request)) is not None:
            return d
        b = state.batches.get(bid)
        if b is None:
            return _err(404, "no such batch")
        if b["status"] not in ("completed",):
            if time.monotonic() - b["_t0"] >= state.batch_delay:
                finish_batch(b)
            else:
                b["status"] = "in_progress"
        return batch_view(b)

    @app.get("/v1/batches")
    async def list_batches(request: Request, limit: int = 20, after: str | None = None):
        if (d := denied(request)) is not None:
            return d
        ids = sorted(state.batches, reverse=True)
        if after in ids:
            ids = ids[ids.index(after) + 1 :]
        page = [batch_view(state.batches[i]) for i in ids[:limit]]
        return {"object": "list", "data": page, "first_id": page[0]["id"] if page else None,
                "last_id": page[-1]["id"] if page else None, "has_more": len(ids) > limit}

    return app


class FakeServer:
    """Runs the app (``app_factory(state)``; the synthesis fake by default) with uvicorn in a
    background thread on a free 127.0.0.1 port."""

    def __init__(self, state: Any = None, app_factory: Callable[[Any], FastAPI] | None = None):
        self.state = state or FakeState()
        self._app_factory = app_factory or make_app
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        # log_config=None: uvicorn's dictConfig would close every logging handler of the host process
        # (absl's closes its stream with it), which breaks whoever runs the server in-process.
        config = uvicorn.Config(self._app_factory(self.state), log_level="critical", log_config=None,
                                timeout_graceful_shutdown=1, backlog=4096)
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]}, daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("fake server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main() -> None:
    p = argparse.ArgumentParser(description="fault-injecting OpenAI-compatible server on 127.0.0.1")
    p.add_argument("--latency", type=float, default=0.0, help="seconds added to every chat and images response")
    p.add_argument("--fault-rate", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    server = FakeServer(FakeState(faults=Faults(rate=args.fault_rate, seed=args.seed), latency=args.latency)).start()
    print(f"READY {server.url}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
